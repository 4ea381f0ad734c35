"""The SpeedyFeed workflow: the engine's dynamic batches, centralized encoding with the global cache,
and the autoregressive user loss, wired to our news recommender."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import psutil
import torch

from speedyrec.data.behaviors import Behaviors, user_share
from speedyrec.data.dataset import Dataset
from speedyrec.engine.batching import DynamicBatcher, SequenceBatch, SequenceSet
from speedyrec.engine.cache import DeferredGradients, EmbeddingCache
from speedyrec.engine.distributed import DistInfo, all_reduce_sum
from speedyrec.engine.encode import CentralizedEncoder, EncodeRows
from speedyrec.engine.loss import TargetIndex, click_cross_entropy, inbatch_logits, target_scores
from speedyrec.engine.ragged import Ragged
from speedyrec.engine.trainer import StepOutput
from speedyrec.models.news_inputs import NewsInputs, NewsTokens


def build_sequences(train: Behaviors, num_news: int) -> SequenceSet:
    """Each user's clicks in time order, with each impression's non-clicks kept as that click's negatives.

    MIND-style logs: the user's history field (from their first impression) followed by the clicks of
    their impressions in time order. Logs whose histories are the earlier clicks of the log itself
    (SpeedyRec format) contribute their impression clicks only, so no click counts twice.
    """
    rows = np.arange(len(train))
    cand_rows = train.candidates.row_ids()
    clicked = train.labels == 1
    # click elements: (user, row, position) for every clicked candidate; rows are time-sorted
    c_user = train.user[cand_rows[clicked]]
    c_key = cand_rows[clicked]
    c_pos = np.flatnonzero(clicked) - train.candidates.offsets[cand_rows[clicked]]
    c_news = train.candidates.values[clicked]
    c_pool = c_key
    parts_user, parts_key, parts_pos, parts_news, parts_pool = [c_user], [c_key], [c_pos], [c_news], [c_pool]
    if not train.history_is_prefix and len(train):
        order = np.lexsort((rows, train.user))  # by user, then time (rows are time-sorted)
        first = order[np.r_[True, train.user[order][1:] != train.user[order][:-1]]]
        hist = train.history.take(first)
        h_rows = hist.row_ids()
        parts_user.append(train.user[first][h_rows])
        parts_key.append(np.full(len(h_rows), -1, dtype=np.int64))
        parts_pos.append(np.arange(len(h_rows)) - hist.offsets[h_rows])
        parts_news.append(hist.values)
        parts_pool.append(np.full(len(h_rows), -1, dtype=np.int64))
    user = np.concatenate(parts_user)
    key = np.concatenate(parts_key)
    pos = np.concatenate(parts_pos)
    order = np.lexsort((pos, key, user))
    user_sorted = user[order]
    _, counts = np.unique(user_sorted, return_counts=True)
    clicks = Ragged.from_lengths(counts, np.concatenate(parts_news)[order].astype(np.int32))
    click_pool = np.concatenate(parts_pool)[order].astype(np.int64)
    return SequenceSet(clicks, click_pool, train.non_clicked(), num_news)


def cache_replica_budget(device: torch.device) -> int:
    """Bytes a full replica of the embedding cache may take before the cache is sharded across ranks:
    a tenth of the free GPU memory, or a quarter of the available RAM shared by this machine's ranks."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(psutil.virtual_memory().available * 0.25 / max(local_ranks, 1))


# objective(table [U, W], news [U], clicks [B, L], negatives [B, L, K], targets: TargetIndex) -> (loss sum, counters)
# (see engine.loss.target_scores); counters may be device tensors (the trainer reads them when it logs)
Objective = Callable[[torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor, TargetIndex], tuple[torch.Tensor, dict]]


class SpeedyFeedWorkflow:
    """Batches, centralized encoding with the cache, and a loss on the batch's news table.

    By default the table holds ``model``'s news vectors and the loss is its autoregressive click loss. A
    recipe may encode rows its own way (``encode_rows(tokens, rows) -> (vectors [R, dim], valid, padded)``,
    e.g. M teachers at once, dim = M * D) and supply its own ``objective`` on the table.
    """

    def __init__(self, cfg, data: Dataset, inputs: NewsInputs, model, dist: DistInfo, *,
                 encode_rows: EncodeRows | None = None, dim: int | None = None, objective: Objective | None = None):
        ec = cfg.engine
        self.cfg = cfg
        self.model = model
        self.dist = dist
        self.device = dist.device
        self.step_no = 0
        self.inputs = inputs
        store = inputs.store
        # several ranks: each builds and keeps the sequences of its own users only (a fixed share, balanced by
        # clicks), shuffled within the rank every epoch; the epoch's totals are summed over ranks
        train = user_share(data.train, dist.rank, dist.world) if dist.active else data.train
        self.seqs = build_sequences(train, store.num_news)
        del train
        news_lengths = self.inputs.lengths(np.arange(store.num_news))
        fixed_width = inputs.max_len
        self.batcher = DynamicBatcher(
            self.seqs, news_lengths, self.inputs.prepare, token_budget=ec.token_budget, buckets=ec.buckets,
            dynamic=ec.dynamic_batching, dedup=ec.dedup, autoregressive=ec.autoregressive,
            max_history=cfg.data.max_history, negatives=ec.negatives, batch_size=cfg.train.batch_size,
            fixed_width=fixed_width, seed=cfg.train.seed, rank=0, world=1, stream=dist.rank,
            prefetch_depth=ec.prefetch, pin=self.device.type == "cuda", fill_cdf=self._fill_cdf(ec, store.num_news),
            chunk_context=ec.chunk_context, targets=ec.targets)
        dim = dim or cfg.model.dim
        cache = None
        if ec.cache and ec.cache_gamma > 0:
            cache = EmbeddingCache(store.num_news, dim, gamma=ec.cache_gamma, beta=ec.cache_beta,
                                   seed=cfg.train.seed, dist=dist, device=self.device,
                                   max_bytes=cache_replica_budget(self.device))
        self.objective = objective or self.click_loss
        deferred = (DeferredGradients(store.num_news, dim, self.device)
                    if cache is not None and ec.cache_deferred_grad else None)
        self.encoder = CentralizedEncoder(encode_rows or self._encode_rows, dim, dist, cache=cache,
                                          global_dedup=ec.global_dedup,
                                          chunk_tokens=ec.chunk_tokens if ec.dynamic_batching else None,
                                          seed=cfg.train.seed, audit=ec.cache_audit, deferred=deferred)
        self.unknown_clicks = int(data.train.unknown_clicks.sum())
        self._totals = [self.batcher.targets_per_epoch, len(self.batcher)]
        if dist.active:
            t = torch.tensor(self._totals, dtype=torch.float64, device=self.device)
            all_reduce_sum(t)
            self._totals = [int(x) for x in t.tolist()]

    def _fill_cdf(self, ec, num_news: int) -> np.ndarray | None:
        """Random negatives' distribution: uniform, or click popularity^0.75 (word2vec's smoothing)."""
        if ec.random_negatives == "uniform":
            return None
        counts = np.bincount(self.seqs.clicks.values, minlength=num_news).astype(np.float64)
        if self.dist.active:  # the whole log's popularity, not this rank's users'
            t = torch.from_numpy(counts).to(self.device)
            all_reduce_sum(t)
            counts = t.cpu().numpy()
        return np.cumsum((counts + 1.0) ** 0.75)

    @property
    def clicks_in_data(self) -> int:
        """Training targets of one epoch: every click of every user sequence (history included; with
        engine.targets=impressions the impression clicks only), plus clicks on unknown news, which cannot be
        trained (counted apart)."""
        return self._totals[0] + self.unknown_clicks

    @property
    def sequences_in_data(self) -> int:
        """Units (sequence chunks, or single-click instances without the autoregressive loss) per epoch."""
        return self._totals[1]

    @property
    def sequences_dropped(self) -> int:
        return self.batcher.sequences_dropped

    def batches(self, epoch: int, skip: int = 0):
        return self.batcher.epoch(epoch, skip)

    def after_step(self, step: int) -> None:
        self.step_no = step

    def state_dict(self) -> dict:
        """What a checkpoint must hold for an exact resume: the embedding cache's live rows and the deferred
        cache gradients not yet handed over."""
        cache, deferred = self.encoder.cache, self.encoder.deferred
        state = {"cache": cache.state_dict(self.step_no)} if cache is not None else {}
        if deferred is not None:
            state["deferred"] = deferred.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.encoder.cache is not None and "cache" in state:
            self.encoder.cache.load_state_dict(state["cache"])
        if self.encoder.deferred is not None and "deferred" in state:
            self.encoder.deferred.load_state_dict(state["deferred"])

    def _encode_rows(self, tokens: NewsTokens, rows: np.ndarray):
        # without dynamic batching every news keeps the fixed padded width, as in the typical workflow
        return self.inputs.encode(self.model, tokens, rows, trim=self.cfg.engine.dynamic_batching)

    def step(self, batch: SequenceBatch | None) -> StepOutput:
        if batch is None:  # this rank is out of batches: still take part in the collectives
            empty = np.zeros(0, dtype=np.int64)
            enc = self.encoder(empty, empty, None, self.step_no)
            loss = enc.table.sum() * 0.0 if enc.table.requires_grad else None
            return StepOutput(loss, 0, {})
        tokens = batch.tokens.to(self.device)
        with self.inputs.word_vocabulary(self.model, tokens):
            enc = self.encoder(batch.news, batch.lengths, tokens, self.step_no)
        clicks, negatives = (t.to(self.device, non_blocking=True) for t in (batch.clicks, batch.negatives))
        loss, extra = self.objective(enc.table, batch.news, clicks, negatives, batch.target_index.to(self.device))
        if enc.deferred is not None:  # the served rows' gradients reach the encoder; the loss value is unchanged
            loss = loss + (enc.deferred - enc.deferred.detach())
        n = batch.num_targets
        counters = {"clicks_trained": n, **batch.counters, **enc.counters, **extra}
        return StepOutput(loss, n, counters)

    def click_loss(self, table, news, clicks, negatives, targets: TargetIndex) -> tuple[torch.Tensor, dict]:
        """The model's autoregressive click loss, summed over the targets; with ``engine.inbatch_negatives``
        against every news of the batch its user did not click. Counts the negatives scored."""
        user = self.model.user_encoder
        scores = target_scores(table, clicks, negatives, targets, user.prefix_states, user.empty)
        if self.cfg.engine.inbatch_negatives:
            logits = inbatch_logits(table, clicks, targets, scores)
            scored = torch.isfinite(logits[:, 1:]).sum()  # masked entries are -inf; read when the trainer logs
        else:  # K negatives per target, known without a device sync
            logits = scores.logits
            scored = logits.shape[0] * (logits.shape[1] - 1)
        return click_cross_entropy(logits).sum(), {"negatives_scored": scored}
