"""The typical workflow, as Microsoft Recommenders trains news recommenders: the honest baseline.

One training instance per click: the impression's user history cut or padded to ``max_history`` (50)
news, the clicked news and ``negatives`` (4) non-clicked news of the same impression, every news padded
to the fixed maximum length of its fields, cross-entropy over the 1 + 4 candidates. Batches are dense
tensors encoded in one call with the same encoder and attention kernels as the fast path.

``targets="sequence"`` trains it on SpeedyFeed's targets instead, so the two workflows can be compared on
identical targets: every click of every user sequence (the history field's clicks included), its history the
(at most ``max_history``) clicks before its impression in that sequence, its negatives from its impression
first and random news where it has none, drawn by the engine's sampler with the same keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from speedyrec.data.behaviors import Behaviors
from speedyrec.data.token_store import TokenStore
from speedyrec.engine.batching import impression_run_starts
from speedyrec.engine.prefetch import prefetch
from speedyrec.engine.ragged import Ragged, ragged_positions
from speedyrec.engine.trainer import StepOutput
from speedyrec.engine.hashing import hash64
from speedyrec.engine.negatives import sample_negatives


@dataclass
class TypicalBatch:
    history: torch.Tensor  # int64 [B, L] news indices, -1 = padding
    candidates: torch.Tensor  # int64 [B, 1 + K], the clicked news first
    input_ids: torch.Tensor  # int64 [B * (L + 1 + K), T]
    mask: torch.Tensor  # bool, same shape
    counters: dict


class TypicalWorkflow:
    def __init__(self, train: Behaviors, store: TokenStore, model, *, max_history: int, negatives: int,
                 batch_size: int, seed: int, rank: int, world: int, device: torch.device,
                 targets: str = "impressions"):
        self.train = train
        self.store = store
        self.pools = train.non_clicked()  # per impression: its non-clicks, the negatives' pool
        self.model = model
        self.max_history = max_history
        self.negatives = negatives
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.device = device
        self.width = self.store.max_len
        self.seqs = None
        if targets == "sequence":
            from speedyrec.workflows.speedyfeed import build_sequences

            self.seqs = build_sequences(train, store.num_news)
            n = len(self.seqs.clicks.values)
            seq_start = np.repeat(self.seqs.clicks.offsets[:-1], self.seqs.clicks.lengths())
            pos = np.arange(n) - seq_start
            context_end = seq_start + impression_run_starts(self.seqs.click_pool, pos)  # history ends here
            self.hist_start = np.maximum(seq_start, context_end - max_history)
            self.hist_end = context_end
            self.pools = self.seqs.pools
            self.click_pos = np.arange(n)  # instance -> click of the sequences
            return
        labels = train.labels
        self.click_pos = np.flatnonzero(labels == 1)  # instance -> position in candidates.values
        self.click_row = np.searchsorted(train.candidates.offsets, self.click_pos, side="right") - 1

    @property
    def clicks_in_data(self) -> int:
        """Training targets of one epoch: every click of the training impressions (of the user sequences with
        targets="sequence"), clicks on unknown news included."""
        return len(self.click_pos) + int(self.train.unknown_clicks.sum())

    def steps_per_epoch(self) -> int:
        return -(-len(self.click_pos) // self.batch_size)

    def _global_batch(self, epoch: int, b: int, order: np.ndarray) -> TypicalBatch:
        inst = order[b * self.batch_size : (b + 1) * self.batch_size]
        if self.seqs is not None:
            positives, pools, histories, pos = self._sequence_instances(inst)
        else:
            rows, pos = self.click_row[inst], self.click_pos[inst]
            positives = self.train.candidates.values[pos].astype(np.int64)
            pools, histories = self.pools.take(rows), self.train.history.take(rows)
        negs, fills = sample_negatives(pools, self.negatives, positives, self.store.num_news,
                                       seed=int(hash64(self.seed, epoch)), row_keys=pos)
        # this rank's share of the global batch (sampling above is independent of the world size)
        share = np.array_split(np.arange(len(inst)), self.world)[self.rank]
        hist = histories.take(share).padded(self.max_history, fill=-1, keep="last").astype(np.int64)
        cand = np.concatenate([positives[share, None], negs[share]], axis=1)
        news = np.concatenate([hist, cand], axis=1).reshape(-1)
        tok = self.store.concat(news, width=self.width)
        real = news >= 0
        valid = int(tok.mask[real].sum())
        counters = {"clicks_trained": len(share), "news_encoded": len(news), "valid_tokens": valid,
                    "padded_tokens": tok.mask.size - valid,
                    "negatives_random": int(fills[share].sum()), "negatives_scored": len(share) * self.negatives}
        return TypicalBatch(torch.from_numpy(hist), torch.from_numpy(cand), torch.from_numpy(tok.input_ids),
                            torch.from_numpy(tok.mask), counters)

    def _sequence_instances(self, inst: np.ndarray):
        """Positives, negative pools, histories and sampling keys of sequence clicks ``inst``."""
        seqs = self.seqs
        positives = seqs.clicks.values[inst].astype(np.int64)
        pools = seqs.negative_pools(inst)
        starts, ends = self.hist_start[inst], self.hist_end[inst]
        histories = Ragged.from_lengths(ends - starts, seqs.clicks.values[ragged_positions(starts, ends)])
        return positives, pools, histories, inst

    def batches(self, epoch: int, skip: int = 0) -> Iterator[TypicalBatch]:
        order = np.random.default_rng([self.seed, epoch, 7]).permutation(len(self.click_pos))
        gen = (self._global_batch(epoch, b, order) for b in range(skip, self.steps_per_epoch()))
        return prefetch(gen, depth=4, pin=self.device.type == "cuda")

    def step(self, batch: TypicalBatch | None) -> StepOutput:
        if batch is None or batch.history.shape[0] == 0:
            return StepOutput(None, 0)
        dev = self.device
        hist, cand = batch.history.to(dev, non_blocking=True), batch.candidates.to(dev, non_blocking=True)
        b, l = hist.shape
        vec = self.model.news_encoder(batch.input_ids.to(dev, non_blocking=True), batch.mask.to(dev, non_blocking=True))
        vec = vec.view(b, l + cand.shape[1], -1)
        user = self.model.user_encoder(vec[:, :l], hist >= 0)
        scores = self.model.score(user, vec[:, l:]).float()
        loss = F.cross_entropy(scores, torch.zeros(b, dtype=torch.long, device=dev), reduction="sum")
        return StepOutput(loss, b, batch.counters)

