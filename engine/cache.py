"""The global news-embedding cache (SpeedyFeed section 4.1.2), as tensors.

Rows are news ids: ``emb`` [num_news, D] and ``stamp`` [num_news], the optimizer step whose parameters
produced the row (never the time its batch was prepared). A read at step t is allowed only if
``t - stamp <= gamma``; among the fresh rows, each is read with probability p_t = 1 - exp(-beta t) (Eq. 2),
decided by hashing (seed, step, news id) so that every rank makes the same decision about a news.

Across ranks the cache is one cache. Replicated: every rank holds all rows and applies every rank's
writes. Sharded (when a replica would exceed ``max_bytes``): rank r holds the ids with id % world == r;
lookups and writes are collective calls that route rows to their owners.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from speedyrec.engine.distributed import DistInfo, all_gather_rows
from speedyrec.engine.hashing import hash_uniform

NEVER = np.iinfo(np.int64).min // 2


@dataclass
class CacheLookup:
    hit: np.ndarray  # bool [U]: served from the cache
    emb: torch.Tensor  # [hit.sum(), D], detached
    stale_reads: int  # served rows older than gamma (must stay 0)


class EmbeddingCache:
    def __init__(self, num_items: int, dim: int, *, gamma: int, beta: float, seed: int, dist: DistInfo,
                 device: torch.device, max_bytes: int = 4 << 30):
        self.gamma, self.beta, self.seed = gamma, beta, seed
        self.dist = dist
        self.world = dist.world
        self.sharded = dist.world > 1 and num_items * dim * 4 > max_bytes
        rows = -(-num_items // self.world) if self.sharded else num_items
        self.emb = torch.zeros((rows, dim), dtype=torch.float32, device=device)
        self.stamp = np.full(rows, NEVER, dtype=np.int64)
        self.num_items = num_items

    def lookup_probability(self, step: int) -> float:
        return 1.0 - math.exp(-self.beta * step)

    def _local(self, ids: np.ndarray) -> np.ndarray:
        return ids // self.world if self.sharded else ids

    def _decide(self, ids: np.ndarray, stamps: np.ndarray, step: int) -> np.ndarray:
        fresh = step - stamps <= self.gamma
        draw = hash_uniform(self.seed, step, ids) < self.lookup_probability(step)
        return fresh & draw

    def lookup(self, ids: np.ndarray, step: int) -> CacheLookup:
        """Which of the (unique) news ``ids`` to read from the cache at ``step``, and their rows.

        Collective in sharded mode: every rank must call it at every step (with empty ids if need be).
        """
        ids = np.asarray(ids, dtype=np.int64)
        if not self.sharded:
            stamps = self.stamp[ids]
            hit = self._decide(ids, stamps, step)
            rows = torch.from_numpy(ids[hit]).to(self.emb.device)
            return CacheLookup(hit, self.emb.index_select(0, rows), int((step - stamps[hit] > self.gamma).sum()))
        # sharded: everyone sees every request; owners answer theirs; everyone sees every answer
        device = self.emb.device
        requests = [r.cpu().numpy() for r in all_gather_rows(torch.from_numpy(ids).to(device))]
        answers_emb = []
        answers_meta = []
        for req in requests:
            mine = np.flatnonzero(req % self.world == self.dist.rank)
            stamps = self.stamp[self._local(req[mine])]
            hit = self._decide(req[mine], stamps, step)
            rows = torch.from_numpy(self._local(req[mine][hit])).to(device)
            answers_meta.append(np.stack([mine[hit], stamps[hit]], axis=1))
            answers_emb.append(self.emb.index_select(0, rows))
        meta = all_gather_rows(torch.from_numpy(np.concatenate(answers_meta)).to(device))
        embs = all_gather_rows(torch.cat(answers_emb))
        # owner o's answer block lists, per requester in order, (position in request, stamp)
        sizes = torch.tensor([len(a) for a in answers_meta], device=device)
        all_sizes = all_gather_rows(sizes)
        hit = np.zeros(len(ids), dtype=bool)
        pos_parts, emb_parts, stale = [], [], 0
        for o in range(self.world):
            start = int(all_sizes[o][: self.dist.rank].sum())
            n = int(all_sizes[o][self.dist.rank])
            m = meta[o][start : start + n].cpu().numpy()
            pos_parts.append(m[:, 0])
            emb_parts.append(embs[o][start : start + n])
            stale += int((step - m[:, 1] > self.gamma).sum())
        pos = np.concatenate(pos_parts)
        hit[pos] = True
        order = np.argsort(pos)
        emb = torch.cat(emb_parts)[torch.from_numpy(order).to(device)]
        return CacheLookup(hit, emb, stale)

    def write(self, ids: np.ndarray, emb: torch.Tensor, step: int, everyone_has_all: bool = False) -> None:
        """Store fresh embeddings of ``ids`` computed with the parameters of ``step``.

        ``everyone_has_all``: every rank passes the same global set of rows (global dedup gathers them
        anyway), so no communication is needed. Otherwise this is a collective call.
        """
        ids = np.asarray(ids, dtype=np.int64)
        emb = emb.detach().float()
        if self.world > 1 and not everyone_has_all:
            device = self.emb.device
            ids = torch.cat(all_gather_rows(torch.from_numpy(ids).to(device))).cpu().numpy()
            emb = torch.cat(all_gather_rows(emb.to(device)))
        if self.sharded:
            mine = ids % self.world == self.dist.rank
            ids, emb = ids[mine], emb[torch.from_numpy(mine).to(emb.device)]
        local = self._local(ids)
        self.emb.index_copy_(0, torch.from_numpy(local).to(self.emb.device), emb.to(self.emb.device))
        self.stamp[local] = step
