"""Dynamic length-bucketed batching of user sequences under a token budget (SpeedyFeed section 4.2.2).

A *unit* is what the loss trains on: with the autoregressive loss, a user sequence cut into chunks of at
most ``max_history`` target clicks, each chunk led (``chunk_context``) by up to ``max_history`` earlier clicks
that are context only, so a target at the start of a chunk still sees its history; without it, one click
with the window of at most ``max_history`` clicks before it (the click is the only target). With
``targets="impressions"`` only clicks made in an impression of the log are targets (scored against that
impression's non-clicked news, as the typical workflow and evaluation are); history clicks without an impression
are context, and a unit without a target is not formed.

A click is scored from the user state before the first click of its impression: clicks of one impression
are adjacent in a sequence (ordered by candidate position) but happened together, so none is context for
another, as in evaluation, where an impression is scored from the history alone. Units are shuffled per epoch with
the seed and dealt to ranks round-robin, so the global order does not depend on the number of ranks.

Each unit is routed to a length bucket by the longest of its news (clicks and sampled negatives); a
bucket pads to its current longest news, and is flushed when the distinct news it holds, times that
length, reach the token budget. Nothing is dropped: units alone over the budget become batches of
their own, and every bucket is flushed at the end of the epoch. Batches are prepared in a background
thread, a bounded number ahead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from speedyrec.engine.hashing import hash64
from speedyrec.engine.loss import TargetIndex
from speedyrec.engine.negatives import sample_negatives
from speedyrec.engine.prefetch import prefetch
from speedyrec.engine.ragged import Ragged, ragged_positions


@dataclass
class SequenceSet:
    """Click sequences and where each click's negatives come from."""

    clicks: Ragged  # per sequence, news ids in time order
    click_pool: np.ndarray  # int64 [len(clicks.values)]: the click's row in ``pools``, -1 = no impression
    pools: Ragged  # candidate negatives per impression (its non-clicked news)
    num_news: int

    def negative_pools(self, clicks: np.ndarray) -> Ragged:
        """The impression pool of each of the given clicks (indices into ``clicks.values``); empty for a click
        from a history without impression, which then gets random negatives only."""
        pool_rows = self.click_pool[clicks]
        pools = self.pools.take(np.maximum(pool_rows, 0))
        if (pool_rows < 0).any():
            lens = np.where(pool_rows < 0, 0, pools.lengths())
            pools = Ragged.from_lengths(lens, pools.values[np.repeat(pool_rows >= 0, pools.lengths())])
        return pools


@dataclass
class SequenceBatch:
    news: np.ndarray  # int64 [U] news ids to embed, sorted by token length (distinct when dedup is on)
    lengths: np.ndarray  # int64 [U] token length of each row of ``news``
    clicks: torch.Tensor  # int64 [B, L]: rows of ``news``, -1 = padding (right-padded)
    negatives: torch.Tensor  # int64 [B, L, K]: rows of ``news`` (-1 where clicks is -1)
    targets: torch.Tensor  # bool [B, L]: positions whose click is a training target
    state_pos: torch.Tensor  # int64 [B, L]: the click is scored from the user state before this position
    target_index: TargetIndex  # the same two, as flat positions [T] (what the loss uses: no mask on the device)
    tokens: object  # what ``prepare_tokens(news, width)`` returned (width None: pad to the longest)
    width: int  # token width the batch was sized with
    units: np.ndarray  # int64 [B]: the unit (``DynamicBatcher.units``) of each row
    counters: dict = field(default_factory=dict)

    @property
    def num_targets(self) -> int:
        return len(self.target_index)


@dataclass
class Units:
    start: np.ndarray  # int64: first click (index into clicks.values) of the unit's window
    length: np.ndarray  # int64: clicks in the window
    targets_from: np.ndarray  # int64: position in the window of the first target (0 = all are targets)


def make_units(seqs: SequenceSet, max_history: int, autoregressive: bool, chunk_context: bool = False,
               target_mask: np.ndarray | None = None) -> Units:
    """The units of one epoch. ``target_mask`` (bool per click of ``seqs.clicks.values``; None = every click):
    the clicks that may be targets; the others are context only, and a unit without a target is left out."""
    starts, lengths = seqs.clicks.offsets[:-1], seqs.clicks.lengths()
    if autoregressive:
        n_chunks = -(-lengths // max_history)
        seq = np.repeat(np.arange(len(lengths)), n_chunks)
        k = np.arange(len(seq)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
        first_target = starts[seq] + k * max_history
        length = np.minimum(max_history, lengths[seq] - k * max_history)
        context = np.minimum(k * max_history, max_history) if chunk_context else np.zeros(len(seq), dtype=np.int64)
        units = Units(first_target - context, length + context, context.astype(np.int64))
    else:  # one unit per click: the click and the (at most) max_history clicks before it in its sequence
        click = np.arange(int(seqs.clicks.offsets[-1]), dtype=np.int64)
        seq = seqs.clicks.row_ids()
        pos = click - starts[seq]
        hist = np.minimum(pos, max_history)
        units = Units(click - hist, hist + 1, hist)
    if target_mask is None:
        return units
    keep = unit_targets(units, target_mask) > 0
    return Units(units.start[keep], units.length[keep], units.targets_from[keep])


def unit_targets(units: Units, target_mask: np.ndarray | None) -> np.ndarray:
    """Targets per unit: its clicks from ``targets_from`` on that ``target_mask`` allows (None: all of them)."""
    if target_mask is None:
        return units.length - units.targets_from
    before = np.concatenate([[0], np.cumsum(target_mask, dtype=np.int64)])
    return before[units.start + units.length] - before[units.start + units.targets_from]


class DynamicBatcher:
    def __init__(self, seqs: SequenceSet, news_lengths: np.ndarray, prepare_tokens: Callable[[np.ndarray, int], object],
                 *, token_budget: int, buckets: int, dynamic: bool, dedup: bool, autoregressive: bool,
                 max_history: int, negatives: int, batch_size: int, fixed_width: int, seed: int, rank: int,
                 world: int, prefetch_depth: int = 4, pin: bool = False, fill_cdf: np.ndarray | None = None,
                 chunk_context: bool = False, targets: str = "all", stream: int = 0):
        self.seqs = seqs
        self.news_lengths = np.asarray(news_lengths, dtype=np.int64)
        self.prepare_tokens = prepare_tokens
        self.token_budget, self.buckets, self.dynamic, self.dedup = token_budget, buckets, dynamic, dedup
        self.negatives, self.batch_size, self.fixed_width = negatives, batch_size, fixed_width
        self.seed, self.rank, self.world = seed, rank, world
        # what tells this batcher's random draws from another's over the same click positions: a rank that holds
        # only its own users' sequences (rank=0, world=1 here) passes its rank, so that ranks draw apart
        self.stream = stream
        self.prefetch_depth, self.pin = prefetch_depth, pin
        self.fill_cdf = fill_cdf
        # targets "impressions": only clicks with an impression (whose negatives are its non-clicked news) are
        # targets; clicks of histories without one are context (engine.targets)
        if targets not in ("all", "impressions"):
            raise ValueError(f"targets must be 'all' or 'impressions', got {targets!r}")
        self.target_mask = seqs.click_pool >= 0 if targets == "impressions" else None
        self.units = make_units(seqs, max_history, autoregressive, chunk_context, self.target_mask)
        self.targets_per_epoch = int(unit_targets(self.units, self.target_mask).sum())
        self.sequences_dropped = 0  # units of finished epochs that never reached a batch (must stay 0)

    def __len__(self) -> int:
        return len(self.units.start)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's units for the epoch, in training order."""
        order = np.random.default_rng([self.seed, epoch, 11]).permutation(len(self))
        return order[self.rank :: self.world]

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[SequenceBatch]:
        gen = self._batches(epoch)
        for _ in range(skip):
            next(gen, None)
        return prefetch(gen, depth=self.prefetch_depth, pin=self.pin)

    # -- batch formation -------------------------------------------------------------------------------
    def _unit_news(self, units: np.ndarray, epoch: int):
        """For a block of units: their clicks (flat, unit by unit), which clicks are targets, the
        negatives of the targets [T, K], each unit's length and longest news, the random fills per target, and
        for every click the position (in its unit) of the first click of its impression run."""
        u = self.units
        starts, lengths = u.start[units], u.length[units]
        click_idx = ragged_positions(starts, starts + lengths)  # global click indices, unit by unit
        clicks = self.seqs.clicks.values[click_idx].astype(np.int64)
        pos_in_unit = np.arange(len(click_idx)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        is_target = pos_in_unit >= np.repeat(u.targets_from[units], lengths)
        if self.target_mask is not None:
            is_target &= self.target_mask[click_idx]
        state_pos = impression_run_starts(self.seqs.click_pool[click_idx], pos_in_unit)
        t_idx = click_idx[is_target]
        pools = self.seqs.negative_pools(t_idx)
        negs, fills = sample_negatives(pools, self.negatives, clicks[is_target], self.seqs.num_news,
                                        seed=int(hash64(self.seed, epoch, self.stream) if self.stream
                                                 else hash64(self.seed, epoch)),
                                        row_keys=t_idx, fill_cdf=self.fill_cdf)
        news_len = self.news_lengths[clicks].copy()
        news_len[is_target] = np.maximum(news_len[is_target], self.news_lengths[negs].max(axis=1))
        heads = np.cumsum(lengths) - lengths
        longest = np.maximum.reduceat(news_len, heads) if len(units) else np.zeros(0, dtype=np.int64)
        return clicks, is_target, negs, lengths, longest, fills, state_pos

    def _batches(self, epoch: int) -> Iterator[SequenceBatch]:
        order = self.shard(epoch)
        emitted = 0
        for batch in self._form_batches(order, epoch):
            emitted += batch.counters["sequences_trained"]
            yield batch
        self.sequences_dropped += len(order) - emitted

    def _form_batches(self, order: np.ndarray, epoch: int) -> Iterator[SequenceBatch]:
        block = 512
        if not self.dynamic:
            for s in range(0, len(order), self.batch_size):
                units = order[s : s + self.batch_size]
                clicks, is_target, negs, lengths, _, fills, state_pos = self._unit_news(units, epoch)
                yield self._assemble(units, clicks, is_target, negs, lengths, int(fills.sum()), self.fixed_width,
                                     state_pos)
            return
        # A bucket holds its units' clicks, target flags, negatives and fills (slices of the block they came
        # from), so flushing it reuses the negatives sampled here.
        pending: list[list[tuple]] = [[] for _ in range(self.buckets)]
        distinct = [0] * self.buckets
        width = [0] * self.buckets
        touched: list[list[np.ndarray]] = [[] for _ in range(self.buckets)]
        bounds = None
        seen = np.zeros((self.buckets, self.seqs.num_news), dtype=bool)  # distinct news held, per bucket

        def flush(b: int) -> SequenceBatch:
            for t in touched[b]:
                seen[b, t] = False
            parts = pending[b]
            batch = self._assemble(np.array([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                   np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]),
                                   np.array([len(p[1]) for p in parts]), sum(p[4] for p in parts), width[b],
                                   np.concatenate([p[5] for p in parts]))
            pending[b], distinct[b], width[b], touched[b] = [], 0, 0, []
            return batch

        for s in range(0, len(order), block):
            units = order[s : s + block]
            clicks, is_target, negs, lengths, longest, fills, state_pos = self._unit_news(units, epoch)
            if bounds is None:  # bucket edges: quantiles of the longest news of the first block (a random sample)
                bounds = np.unique(np.quantile(longest, np.linspace(0, 1, self.buckets + 1)[1:-1])) if self.buckets > 1 else np.zeros(0)
            bucket_of = np.searchsorted(bounds, longest, side="left")
            ends = np.cumsum(lengths)
            t_ends = np.cumsum(np.add.reduceat(is_target.astype(np.int64), ends - lengths)) if len(units) else ends
            for j, unit in enumerate(units):
                b = int(bucket_of[j])
                lo, hi = (ends[j] - lengths[j]), ends[j]
                t_lo, t_hi = (t_ends[j - 1] if j else 0), t_ends[j]
                ids = np.concatenate([clicks[lo:hi], negs[t_lo:t_hi].ravel()])
                if self.dedup:
                    ids = np.unique(ids)
                    new = ids[~seen[b, ids]]
                else:
                    new = ids
                w = max(width[b], int(longest[j]))
                if pending[b] and (distinct[b] + len(new)) * w > self.token_budget:
                    yield flush(b)
                    new, w = ids, int(longest[j])
                pending[b].append((int(unit), clicks[lo:hi], is_target[lo:hi], negs[t_lo:t_hi], int(fills[t_lo:t_hi].sum()),
                                   state_pos[lo:hi]))
                distinct[b] += len(new)
                width[b] = w
                if self.dedup:
                    seen[b, new] = True
                    touched[b].append(new)
                if distinct[b] * width[b] >= self.token_budget:
                    yield flush(b)
        for b in range(self.buckets):  # leftovers at the end of the epoch are trained too
            if pending[b]:
                yield flush(b)

    def _assemble(self, units: np.ndarray, clicks: np.ndarray, is_target: np.ndarray, negs: np.ndarray,
                  lengths: np.ndarray, n_fill: int, width: int, state_pos: np.ndarray) -> SequenceBatch:
        """The batch of the given units from their clicks (flat), target flags, target negatives [T, K] and lengths."""
        b, l, k = len(units), int(lengths.max(initial=1)), self.negatives
        occ = np.concatenate([clicks, negs.ravel()])
        if self.dedup:
            news, inverse = np.unique(occ, return_inverse=True)
        else:
            news, inverse = occ, np.arange(len(occ))
        order = np.argsort(self.news_lengths[news], kind="stable")  # by length, for chunked encoding
        rank_of = np.empty(len(news), dtype=np.int64)
        rank_of[order] = np.arange(len(news))
        rows = rank_of[inverse]
        news = news[order]
        n = len(clicks)
        row_in_unit = np.repeat(np.arange(b), lengths)
        col = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        click_rows = np.full((b, l), -1, dtype=np.int64)
        click_rows[row_in_unit, col] = rows[:n]
        neg_rows = np.full((b, l, k), -1, dtype=np.int64)
        neg_rows[row_in_unit[is_target], col[is_target]] = rows[n:].reshape(-1, k)
        targets = np.zeros((b, l), dtype=bool)
        targets[row_in_unit, col] = is_target
        state_rows = np.zeros((b, l), dtype=np.int64)
        state_rows[row_in_unit, col] = state_pos
        tokens = self.prepare_tokens(news, None if self.dynamic else width)
        counters = {"sequences_trained": b, "negatives_random": n_fill}
        return SequenceBatch(news, self.news_lengths[news], torch.from_numpy(click_rows), torch.from_numpy(neg_rows),
                             torch.from_numpy(targets), torch.from_numpy(state_rows),
                             TargetIndex.from_host(targets, state_rows), tokens, width,
                             np.asarray(units, dtype=np.int64), counters)


def impression_run_starts(pools: np.ndarray, pos_in_unit: np.ndarray) -> np.ndarray:
    """For clicks laid out unit by unit (``pools``: each click's impression, -1 = none; ``pos_in_unit``), the
    position in its unit of the first click of its run of same-impression clicks (a click without an
    impression is a run of its own; a run cut by a unit's start begins there)."""
    n = len(pools)
    idx = np.arange(n)
    first = (pos_in_unit == 0) | (pools < 0)
    first[1:] |= pools[1:] != pools[:-1]
    head = np.maximum.accumulate(np.where(first, idx, 0)) if n else idx
    return pos_in_unit - (idx - head)
