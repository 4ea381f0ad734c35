"""Centralized news encoding (SpeedyFeed Algorithm 1, lines 2-9).

All news of a batch (histories, positives, negatives) were gathered and deduplicated when the batch
was formed; here each is either read from the cache (detached) or encoded (with gradients), in chunks
of similar length, and the results form one table whose rows the loss dispatches by index.

With ``global_dedup`` the ranks also deduplicate among themselves: every news missing from the cache
anywhere in the global batch is encoded by exactly one rank that holds it, and the embeddings are
exchanged with an autograd-aware all-gather, so a rank's loss gradient flows back to the rank that
encoded the news and the encoder's gradient equals the single-process gradient of the global batch.

Evidence about the cache, in the step's counters: the age of every served row (read from the row), and with
``audit`` > 0 an audit that re-encodes up to ``audit`` of the step's hits with the current parameters and
measures how far the served vectors drifted from what a miss would have computed (cosine), beside the cosine
of two fresh encodings of the same rows (the dropout noise floor). The audit runs without gradients on a
forked random stream, so it changes nothing the training sees.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from speedyrec.engine.cache import DeferredGradients, EmbeddingCache
from speedyrec.engine.distributed import DistInfo, all_gather_rows, all_gather_with_grad
from speedyrec.engine.hashing import hash64
from speedyrec.engine.host_sync import to_device

# encode_rows(tokens, rows) -> (embeddings [len(rows), D], valid tokens, padded tokens)
EncodeRows = Callable[[object, np.ndarray], tuple[torch.Tensor, int, int]]


@dataclass
class EncodedTable:
    table: torch.Tensor  # [U, D], row i is the embedding of batch news i
    counters: dict
    # <fresh rows, their deferred cache-hit gradients>: add (deferred - deferred.detach()) to the step's loss
    deferred: torch.Tensor | None = None


CPU_CHUNK_TOKENS = 2048
GPU_CHUNK_TOKENS = 65536


def auto_chunk_tokens(device: torch.device) -> int:
    """``engine.chunk_tokens=0``: the padded tokens per encoder call on this device.

    On a CPU a chunk's cost is its arithmetic, and small chunks pad little (length-sorted, each padded to its
    longest row): 2048, the value the CPU benchmarks were measured with. On a GPU a chunk's cost is first its
    kernel launches: on a lent H200 (bert-base shape, 12 layers, 10 frozen, ``engine.token_budget=120000``, ~78k
    real tokens a step) 2048-token chunks made 43 encoder calls a step, each layer call took ~2.6 ms of host time
    against ~0.1 ms of GPU arithmetic, and a step took 2.3 s where its arithmetic is ~30 ms (profile in
    docs/operations.md). 65536 tokens make 1-2 calls a step there; the extra padding of wider chunks costs GPU
    arithmetic, which is ~25x cheaper than the launches it saves at these sizes.
    """
    return GPU_CHUNK_TOKENS if device.type == "cuda" else CPU_CHUNK_TOKENS


def length_chunks(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Split positions of ascending ``lengths`` into consecutive chunks, each padded to its longest row.

    A chunk closes before the row that would take its padded size (rows x longest) over ``max_tokens``,
    or, once it is half full, before a row longer than the ones it holds: chunk edges then fall where the
    length changes, which keeps padding low without many tiny chunks. A chunk holds at least one row.
    """
    chunks, start, n = [], 0, len(lengths)
    while start < n:
        nxt = np.arange(start + 1, n)
        over = (nxt + 1 - start) * lengths[nxt] > max_tokens
        step_up = (lengths[nxt] > lengths[nxt - 1]) & ((nxt - start) * lengths[nxt - 1] >= max_tokens // 2)
        stops = np.flatnonzero(over | step_up)
        end = int(nxt[stops[0]]) if len(stops) else n
        chunks.append(np.arange(start, end))
        start = end
    return chunks


def width_groups(lengths: np.ndarray, max_groups: int) -> list[np.ndarray]:
    """Split positions of ascending ``lengths`` into at most ``max_groups`` consecutive groups, each padded to its
    longest row, with the least padding in total (dynamic programming over the distinct lengths)."""
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        return []
    vals, counts = np.unique(lengths, return_counts=True)
    m = len(vals)
    rows = np.concatenate([[0], np.cumsum(counts)])  # rows with a length below vals[j]
    toks = np.concatenate([[0], np.cumsum(vals * counts)]).astype(np.float64)
    best = np.full(m + 1, np.inf)
    best[0] = 0.0
    back = []
    for _ in range(min(max_groups, m)):
        new, arg = best.copy(), np.arange(m + 1)  # a group may stay unused
        for b in range(1, m + 1):  # the last group holds distinct lengths a..b-1, padded to vals[b - 1]
            a = np.arange(b)
            cost = best[a] + vals[b - 1] * (rows[b] - rows[a]) - (toks[b] - toks[a])
            i = int(np.argmin(cost))
            if cost[i] < new[b]:
                new[b], arg[b] = cost[i], i
        back.append(arg)
        best = new
    edges, b = [m], m
    for arg in reversed(back):
        if arg[b] != b:
            b = int(arg[b])
            edges.append(b)
        if b == 0:
            break
    edges = sorted(set(edges))
    return [np.arange(rows[a], rows[b]) for a, b in zip(edges[:-1], edges[1:])]


class CentralizedEncoder:
    def __init__(self, encode_rows: EncodeRows, dim: int, dist_info: DistInfo, *, cache: EmbeddingCache | None,
                 global_dedup: bool, chunk_tokens: int | None, seed: int = 0, audit: int = 0,
                 deferred: DeferredGradients | None = None):
        """``chunk_tokens``: encode misses sorted by length in chunks of at most this many padded tokens;
        None encodes them in one call, in batch order (the fixed-padding ablation). ``deferred``: keep the
        gradients of served cache rows and hand them to the news' next fresh encoding."""
        self.encode_rows = encode_rows
        self.dim = dim
        self.dist = dist_info
        self.cache = cache
        self.global_dedup = global_dedup and dist_info.world > 1
        self.chunk_tokens = chunk_tokens
        self.seed = seed
        self.audit = audit
        self.deferred = deferred
        # the optimizer's own step count (cache.OptimizerClock), which the served rows' ages are measured with;
        # None: the step argument (a caller without an optimizer, e.g. a test)
        self.clock: Callable[[], int] | None = None

    def _encode(self, tokens, rows: np.ndarray, lengths: np.ndarray, device) -> tuple[torch.Tensor, int, int]:
        """Embeddings of the given rows, encoded in chunks of similar length ([len(rows), D])."""
        if len(rows) == 0:
            return torch.zeros((0, self.dim), device=device), 0, 0
        if self.chunk_tokens is None:
            return self.encode_rows(tokens, rows)
        order = np.argsort(lengths[rows], kind="stable")
        parts, valid, padded = [], 0, 0
        for chunk in length_chunks(lengths[rows][order], self.chunk_tokens):
            emb, v, p = self.encode_rows(tokens, rows[order[chunk]])
            parts.append(emb)
            valid, padded = valid + v, padded + p
        out = torch.cat(parts)
        inv = torch.empty(len(rows), dtype=torch.long, device=out.device)
        inv[to_device(order, out.device)] = torch.arange(len(rows), device=out.device)
        return out[inv], valid, padded

    def __call__(self, news: np.ndarray, lengths: np.ndarray, tokens, step: int) -> EncodedTable:
        """news [U] ids of the batch, lengths [U] their token lengths, tokens the prepared inputs."""
        device = self.dist.device
        u = len(news)
        counters = {"cache_lookups": 0, "cache_hits": 0}
        hit = np.zeros(u, dtype=bool)
        hit_emb = None
        now = step if self.clock is None else self.clock()
        if self.cache is not None:
            look = self.cache.lookup(news, step, now)
            hit, hit_emb = look.hit, look.emb
            # ages by the optimizer's clock (device tensors, read when the trainer logs) beside the stamps' own
            counters.update(cache_lookups=u, cache_hits=int(hit.sum()), served_age_sum=look.ages.sum(),
                            served_stamp_age_sum=int(look.stamp_ages.sum()))
            if len(look.stamp_ages):
                counters["served_age_max"] = look.ages.max()
            if self.audit and hit.any():
                counters.update(self._audit(news, hit, hit_emb, lengths, tokens, step))
            if self.deferred is not None and hit.any() and torch.is_grad_enabled():
                hit_ids = news[hit]
                hit_emb = hit_emb.detach().requires_grad_(True)  # a leaf: its gradient is kept for later
                hit_emb.register_hook(lambda g: self.deferred.add(hit_ids, g))
        miss_rows = np.flatnonzero(~hit)
        if self.global_dedup:
            miss_emb, encoded, valid, padded, written = self._global_misses(news, miss_rows, lengths, tokens, step)
        else:
            miss_emb, valid, padded = self._encode(tokens, miss_rows, lengths, device)
            encoded, written = len(miss_rows), None
        counters.update(news_encoded=encoded, valid_tokens=valid, padded_tokens=padded)
        table = torch.zeros((u, self.dim), dtype=miss_emb.dtype, device=device)
        table = table.index_copy(0, to_device(miss_rows, device), miss_emb)
        if hit_emb is not None and hit.any():
            table = table.index_copy(0, to_device(np.flatnonzero(hit), device), hit_emb.to(table.dtype))
        if self.cache is not None:
            if written is not None:
                self.cache.write(written[0], written[1], step, everyone_has_all=True, now=now)
            else:
                self.cache.write(news[miss_rows], miss_emb, step, now=now)
        deferred = None
        if self.deferred is not None and len(miss_rows) and table.requires_grad:
            pos, grad = self.deferred.take(news[miss_rows])
            counters["deferred_grad_rows"] = len(pos)
            if len(pos):
                fresh = table.index_select(0, to_device(miss_rows[pos], device))
                deferred = (fresh.float() * grad.to(device)).sum()
        return EncodedTable(table, counters, deferred)

    def _audit(self, news, hit, hit_emb, lengths, tokens, step) -> dict:
        """Re-encode a hashed sample of this step's hits; cosine of cached vs fresh and of fresh vs fresh."""
        device = self.dist.device
        hit_rows = np.flatnonzero(hit)  # hit_emb holds their vectors in this order
        pick = np.sort(np.argsort(hash64(self.seed + 7919, step, news[hit_rows]), kind="stable")[: self.audit])
        rows = hit_rows[pick]
        devices = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            fresh, _, _ = self._encode(tokens, rows, lengths, device)
            again, _, _ = self._encode(tokens, rows, lengths, device)
        cached = hit_emb[to_device(pick, hit_emb.device)].to(device).float()
        drift = F.cosine_similarity(cached, fresh.float(), dim=-1)
        noise = F.cosine_similarity(again.float(), fresh.float(), dim=-1)
        return {"audit_rows": len(rows), "audit_cos_sum": drift.sum(), "audit_cos_min": drift.min(),
                "audit_noise_cos_sum": noise.sum()}

    def _global_misses(self, news, miss_rows, lengths, tokens, step):
        """Encode each globally missing news on one rank that holds it; share embeddings with autograd."""
        device = self.dist.device
        world, rank = self.dist.world, self.dist.rank
        my_ids = news[miss_rows]
        all_ids = [t.cpu().numpy() for t in all_gather_rows(torch.from_numpy(my_ids).to(device))]
        owner_of = assign_owners(all_ids, self.seed, step)
        owned = owner_of[rank] == rank
        emb_own, valid, padded = self._encode(tokens, miss_rows[owned], lengths, device)
        sizes = [int((owner_of[r] == r).sum()) for r in range(world)]
        global_emb = all_gather_with_grad(emb_own, sizes)  # gradients return to the encoding rank
        global_ids = np.concatenate([all_ids[r][owner_of[r] == r] for r in range(world)])
        order = np.argsort(global_ids)
        pos = order[np.searchsorted(global_ids[order], my_ids)]
        mine = global_emb[to_device(pos, device)]
        return mine, len(emb_own), valid, padded, (global_ids, global_emb)


def assign_owners(ids_per_rank: list[np.ndarray], seed: int, step: int) -> list[np.ndarray]:
    """For every rank's (distinct) missing ids, the rank that will encode each: one of the ranks holding
    the id, picked by hashing (seed, step, id), so all ranks compute the same assignment."""
    world = len(ids_per_rank)
    ids = np.concatenate(ids_per_rank) if world else np.zeros(0, dtype=np.int64)
    ranks = np.concatenate([np.full(len(a), r) for r, a in enumerate(ids_per_rank)])
    order = np.lexsort((ranks, ids))
    ids_s, ranks_s = ids[order], ranks[order]
    starts = np.flatnonzero(np.r_[True, ids_s[1:] != ids_s[:-1]]) if len(ids_s) else np.zeros(0, dtype=np.int64)
    holders = np.diff(np.r_[starts, len(ids_s)])
    pick = (hash64(seed, step, ids_s[starts]) % holders.astype(np.uint64)).astype(np.int64)
    owner_group = ranks_s[starts + pick]
    owner_sorted = np.repeat(owner_group, holders)
    owner = np.empty_like(owner_sorted)
    owner[order] = owner_sorted
    out, off = [], 0
    for a in ids_per_rank:
        out.append(owner[off : off + len(a)])
        off += len(a)
    return out
