"""The global news-embedding cache (SpeedyFeed section 4.1.2), as tensors.

Rows are news ids: ``emb`` [num_news, D] and ``stamp`` [num_news], the optimizer step whose parameters
produced the row (never the time its batch was prepared). A read at step t is allowed only if
``t - stamp <= gamma``; among the fresh rows, each is read with probability p_t = 1 - exp(-beta t) (Eq. 2),
decided by hashing (seed, step, news id) so that every rank makes the same decision about a news.

Each row carries, in an extra column, when it was written by a second clock: the optimizer's own count of steps
(``OptimizerClock``, a post-step hook on the optimizer), not the training loop's step counter that the stamps use.
The column travels with the vector through every index and routing operation, so the age of a served row is read
from the row itself and from that clock, independently of the stamps that decided the hit: a row served from the
wrong place, never written, or stamped by a wrong step counter (micro-batches counted as steps, a counter not
restored on resume) shows up as an age that disagrees with the stamps' or exceeds gamma.

Across ranks the cache is one cache. Replicated: every rank holds all rows and applies every rank's
writes. Sharded (when a replica would exceed ``max_bytes``): rank r holds the ids with id % world == r;
lookups and writes are collective calls that route rows to their owners.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from speedyrec.engine.distributed import DistInfo, all_gather_rows, all_true
from speedyrec.engine.hashing import hash_uniform
from speedyrec.engine.host_sync import to_device

NEVER = np.iinfo(np.int64).min // 2
UNWRITTEN = -1e9  # the step column of a row never written: served, it would show an age of about 1e9


@dataclass
class CacheLookup:
    hit: np.ndarray  # bool [U]: served from the cache
    emb: torch.Tensor  # [hit.sum(), D], detached
    # float64 [hit.sum()] on the cache's device: optimizer steps since each served row was written, read from the row
    # itself and the optimizer's clock (left on the device: the step never waits for it)
    ages: torch.Tensor
    stamp_ages: np.ndarray  # int64 [hit.sum()]: the same ages by the stamps that decided the hits


class OptimizerClock:
    """Optimizer steps taken, counted by a post-step hook on the optimizer itself and, after a resume, restarted from
    the step counts the optimizer's state restored (Adam keeps one per parameter): evidence about the cache's ages
    read from this clock cannot share a mistake with the training loop's step counter."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.steps = 0
        optimizer.register_step_post_hook(self._tick)

    def _tick(self, optimizer, args, kwargs) -> None:
        self.steps += 1

    def restart_from_state(self) -> None:
        """After ``optimizer.load_state_dict``: the most steps any parameter's state records (one read)."""
        steps = [float(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        self.steps = int(max(steps, default=0.0))

    def __call__(self) -> int:
        return self.steps


class EmbeddingCache:
    def __init__(self, num_items: int, dim: int, *, gamma: int, beta: float, seed: int, dist: DistInfo,
                 device: torch.device, max_bytes: int = 4 << 30):
        self.gamma, self.beta, self.seed = gamma, beta, seed
        self.dist = dist
        self.world = dist.world
        # every rank must agree (a sharded lookup is a collective): shard when a replica exceeds any rank's budget
        self.sharded = dist.world > 1 and not all_true(num_items * dim * 4 <= max_bytes, device)
        rows = -(-num_items // self.world) if self.sharded else num_items
        self.dim = dim
        self.emb = torch.zeros((rows, dim + 1), dtype=torch.float32, device=device)  # last column: writing step
        self.emb[:, dim] = UNWRITTEN
        self.stamp = np.full(rows, NEVER, dtype=np.int64)
        self.num_items = num_items

    def state_dict(self, step: int) -> dict:
        """The rows that can still be served after ``step`` (written within gamma steps); older rows never will
        be, so leaving them out changes nothing a resumed run reads."""
        live = np.flatnonzero(step - self.stamp <= self.gamma)
        rows = torch.from_numpy(live).to(self.emb.device)
        return {"rows": live, "emb": self.emb.index_select(0, rows).cpu(), "stamp": self.stamp[live].copy(),
                "shape": tuple(self.emb.shape), "sharded": self.sharded}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["shape"]) != tuple(self.emb.shape) or state["sharded"] != self.sharded:
            raise ValueError(f"the checkpoint's cache has shape {tuple(state['shape'])} (sharded {state['sharded']}), "
                             f"this run's {tuple(self.emb.shape)} (sharded {self.sharded})")
        self.emb[:, : self.dim].zero_()
        self.emb[:, self.dim] = UNWRITTEN
        self.stamp[:] = NEVER
        rows = torch.from_numpy(state["rows"]).to(self.emb.device)
        self.emb.index_copy_(0, rows, state["emb"].to(self.emb.device))
        self.stamp[state["rows"]] = state["stamp"]

    def lookup_probability(self, step: int) -> float:
        return 1.0 - math.exp(-self.beta * step)

    def _local(self, ids: np.ndarray) -> np.ndarray:
        return ids // self.world if self.sharded else ids

    def _decide(self, ids: np.ndarray, stamps: np.ndarray, step: int) -> np.ndarray:
        fresh = step - stamps <= self.gamma
        draw = hash_uniform(self.seed, step, ids) < self.lookup_probability(step)
        return fresh & draw

    def lookup(self, ids: np.ndarray, step: int, now: int | None = None) -> CacheLookup:
        """Which of the (unique) news ``ids`` to read from the cache at ``step``, and their rows; ``now``: the
        optimizer clock's reading, which the served ages are measured with (None: ``step``).

        Collective in sharded mode: every rank must call it at every step (with empty ids if need be).
        """
        ids = np.asarray(ids, dtype=np.int64)
        now = step if now is None else now
        if not self.sharded:
            stamps = self.stamp[ids]
            hit = self._decide(ids, stamps, step)
            rows = to_device(ids[hit], self.emb.device)
            return self._served(hit, self.emb.index_select(0, rows), now, step - stamps[hit])
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
        pos_parts, emb_parts, stamp_parts = [], [], []
        for o in range(self.world):
            start = int(all_sizes[o][: self.dist.rank].sum())
            n = int(all_sizes[o][self.dist.rank])
            m = meta[o][start : start + n].cpu().numpy()
            pos_parts.append(m[:, 0])
            stamp_parts.append(m[:, 1])
            emb_parts.append(embs[o][start : start + n])
        pos = np.concatenate(pos_parts)
        hit[pos] = True
        order = np.argsort(pos)
        stamp_ages = step - np.concatenate(stamp_parts)[order]
        return self._served(hit, torch.cat(emb_parts)[to_device(order, device)], now, stamp_ages)

    def _served(self, hit: np.ndarray, rows: torch.Tensor, now: int, stamp_ages: np.ndarray) -> CacheLookup:
        """Split served rows [H, D + 1] into vectors and ages (by the column's clock)."""
        return CacheLookup(hit, rows[:, : self.dim], now - rows[:, self.dim].double(), np.asarray(stamp_ages))

    def write(self, ids: np.ndarray, emb: torch.Tensor, step: int, everyone_has_all: bool = False,
              now: int | None = None) -> None:
        """Store fresh embeddings of ``ids`` computed with the parameters of ``step``; the rows' age column gets
        ``now``, the optimizer clock's reading (None: ``step``).

        ``everyone_has_all``: every rank passes the same global set of rows (global dedup gathers them
        anyway), so no communication is needed. Otherwise this is a collective call. A news that several ranks
        encoded is written once, from the lowest rank: an index write with repeated indices has no defined winner
        on CUDA (and ranks' encodings differ by their dropout), so replicas would drift apart.
        """
        ids = np.asarray(ids, dtype=np.int64)
        emb = emb.detach().float()
        if self.world > 1 and not everyone_has_all:
            device = self.emb.device
            parts = all_gather_rows(torch.from_numpy(ids).to(device))
            ids = torch.cat(parts).cpu().numpy()
            emb = torch.cat(all_gather_rows(emb.to(device), [len(x) for x in parts]))
        _, first = np.unique(ids, return_index=True)  # rank order: the first occurrence is the lowest rank's
        if len(first) < len(ids):
            ids, emb = ids[first], emb.index_select(0, to_device(first, emb.device))
        if self.sharded:
            mine = ids % self.world == self.dist.rank
            ids, emb = ids[mine], emb.index_select(0, to_device(np.flatnonzero(mine), emb.device))
        local = self._local(ids)
        emb = emb.to(self.emb.device)
        written = float(step if now is None else now)
        rows = torch.cat([emb, torch.full((len(emb), 1), written, dtype=emb.dtype, device=emb.device)], dim=1)
        self.emb.index_copy_(0, to_device(local, self.emb.device), rows)
        self.stamp[local] = step


class DeferredGradients:
    """The gradients that served cache rows received, kept per news until the news is next encoded.

    A row served from the cache is a constant to the step that reads it: the encoder gets no gradient from it,
    so at equal epochs a cached run trains the encoder on fewer rows than an uncached one. Here each served row
    is a leaf whose gradient (of the step's summed loss) is added to its news' entry; the next step that encodes
    the news afresh adds <fresh vector, entry> to its loss (with value 0, see ``SpeedyFeedWorkflow.step``), so the
    encoder receives those gradients at the fresh vector, at most gamma steps late, and the entry is cleared. Per
    rank: a rank applies what its own steps accumulated, wherever the fresh vector was encoded (global dedup
    gathers it with gradients). Memory: a float32 [num_news, D] buffer per rank.
    """

    def __init__(self, num_items: int, dim: int, device: torch.device):
        self.grad = torch.zeros((num_items, dim), dtype=torch.float32, device=device)
        self.pending = np.zeros(num_items, dtype=bool)

    def add(self, ids: np.ndarray, grad: torch.Tensor) -> None:
        """Accumulate the gradients [len(ids), D] of served rows ``ids`` (a backward hook calls it)."""
        self.grad.index_add_(0, to_device(ids, self.grad.device), grad.detach().float().to(self.grad.device))
        self.pending[ids] = True

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Positions in ``ids`` (news encoded afresh this step) with pending gradients, and those gradients
        [len(positions), D]; their entries are cleared."""
        pos = np.flatnonzero(self.pending[ids])
        rows = to_device(ids[pos], self.grad.device)
        grad = self.grad.index_select(0, rows)
        self.grad.index_fill_(0, rows, 0.0)
        self.pending[ids[pos]] = False
        return pos, grad

    def state_dict(self) -> dict:
        rows = np.flatnonzero(self.pending)
        return {"rows": rows, "grad": self.grad.index_select(0, torch.from_numpy(rows).to(self.grad.device)).cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.grad.zero_()
        self.pending[:] = False
        rows = np.asarray(state["rows"], dtype=np.int64)
        self.grad.index_copy_(0, torch.from_numpy(rows).to(self.grad.device), state["grad"].to(self.grad.device))
        self.pending[rows] = True
