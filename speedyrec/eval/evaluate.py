"""Evaluation on dev impressions: news vectors computed once and shared, users scored, metrics reduced."""
from __future__ import annotations

import time

import numpy as np
import torch

from speedyrec.data.behaviors import Behaviors
from speedyrec.data.ragged import Ragged
from speedyrec.models.backbone import eval_mode
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.engine.distributed import DistInfo, all_gather_rows, all_reduce_sum
from speedyrec.engine.runlog import progress
from speedyrec.engine.precision import autocast_context
from speedyrec.eval.metrics import impression_metrics, metric_sums, metrics_from_sums


@torch.no_grad()
def encode_news(model, inputs: NewsInputs, news: np.ndarray, dist: DistInfo, batch_size: int, amp: str,
                encode_fn=None) -> torch.Tensor:
    """Vectors of the given news [N, W] on every rank; each rank encodes a slice, in length-sorted batches.

    ``encode_fn(tokens) -> [R, W]`` replaces the model's own news encoder (e.g. M stacked teachers)."""
    if encode_fn is None:
        encode_fn = lambda tokens: inputs.encode(model, tokens)[0]
    share = np.array_split(np.arange(len(news)), dist.world)[dist.rank]
    mine = news[share]
    order = np.argsort(inputs.lengths(mine), kind="stable")  # similar lengths together: little padding
    parts = []
    bar = progress(len(news), "encoding dev news", "news", enabled=dist.is_main)
    for s in range(0, len(mine), batch_size):
        rows = mine[order[s : s + batch_size]]
        tokens = inputs.prepare(rows).to(dist.device)
        with autocast_context(dist.device, amp):
            parts.append(encode_fn(tokens).float())
        bar.update(len(rows) * dist.world)  # the ranks' shares are within one news of each other
    bar.close()
    width = parts[0].shape[1] if parts else _encoded_width(model, encode_fn, inputs, news, dist, amp)
    out = torch.zeros((len(mine), width), dtype=torch.float32, device=dist.device)
    if parts:
        out[torch.from_numpy(order).to(dist.device)] = torch.cat(parts)
    return torch.cat(all_gather_rows(out), dim=0)


def _encoded_width(model, encode_fn, inputs: NewsInputs, news: np.ndarray, dist: DistInfo, amp: str) -> int:
    """The output width, for a rank whose share is empty (it still takes part in the gather)."""
    if model is not None and hasattr(model, "news_encoder"):
        return model.news_encoder.proj.out_features
    with autocast_context(dist.device, amp):
        return encode_fn(inputs.prepare(news[:1]).to(dist.device)).shape[1]


@torch.no_grad()
def evaluate(model, inputs: NewsInputs, dev: Behaviors, dist: DistInfo, *, max_history: int, batch_size: int = 256,
             max_impressions: int = 0, amp: str = "auto") -> dict:
    """AUC, MRR, nDCG@5, nDCG@10 averaged over dev impressions with both clicked and non-clicked news."""
    return evaluate_models([model], inputs, dev, dist, max_history=max_history, batch_size=batch_size,
                           max_impressions=max_impressions, amp=amp)[0]


@torch.no_grad()
def evaluate_models(models: list, inputs: NewsInputs, dev: Behaviors, dist: DistInfo, *, max_history: int,
                    batch_size: int = 256, max_impressions: int = 0, amp: str = "auto", encode_fn=None,
                    ensemble: list[int] | None = None) -> list[dict]:
    """:func:`evaluate` for M models; with ``encode_fn(tokens) -> [R, M * D]`` (a stack of their news
    encoders), every dev news is encoded once for all of them. With ``ensemble`` (indices into ``models``), one
    more result follows the models': the metrics of the mean of those models' scores for each candidate."""
    with eval_mode(*models):
        return _evaluate_models(models, inputs, dev, dist, max_history, batch_size, max_impressions, amp, encode_fn,
                                ensemble)


def _evaluate_models(models, inputs, dev, dist, max_history, batch_size, max_impressions, amp, encode_fn,
                     ensemble=None) -> list[dict]:
    t0 = time.perf_counter()
    if max_impressions:
        dev = dev.take(np.arange(min(max_impressions, len(dev))))
    hist_pad = dev.history.padded(max_history, fill=-1, keep="last")
    needed = np.unique(np.concatenate([hist_pad[hist_pad >= 0], dev.candidates.values]).astype(np.int64))
    if encode_fn is None:
        tables = [encode_news(m, inputs, needed, dist, batch_size, amp) for m in models]  # [U, D] each
    else:
        stacked = encode_news(None, inputs, needed, dist, batch_size, amp, encode_fn)
        tables = list(stacked.view(len(needed), len(models), -1).unbind(1))
    encode_seconds = time.perf_counter() - t0
    share = np.array_split(np.arange(len(dev)), dist.world)[dist.rank]  # the impressions this rank scores
    labels, offsets = _labels_of(dev, share), dev.candidates.take(share).offsets
    results, scores = [], []
    for m, table in zip(models, tables):
        t1 = time.perf_counter()
        scores.append(_scores(m.user_encoder, table, needed, hist_pad, dev, share, dist.device, amp))
        result = _metrics(scores[-1], labels, offsets, dist)
        result["news_encoded"] = len(needed)
        result["seconds"] = encode_seconds / len(models) + time.perf_counter() - t1
        results.append(result)
    if ensemble:
        results.append({**_metrics(np.mean([scores[i] for i in ensemble], axis=0), labels, offsets, dist),
                        "members": len(ensemble)})
    return results


def _scores(user_encoder, table: torch.Tensor, needed: np.ndarray, hist_pad: np.ndarray, dev: Behaviors,
            share: np.ndarray, device, amp: str) -> np.ndarray:
    """Scores of the candidates of the impressions ``share``, in candidate order (float32)."""
    slot = lambda idx: np.searchsorted(needed, idx)  # news index -> row of table
    parts = [np.zeros(0, dtype=np.float32)]
    for s in range(0, len(share), 1024):
        rows = share[s : s + 1024]
        h = hist_pad[rows]
        users = user_vectors(user_encoder, table, np.where(h >= 0, slot(np.maximum(h, 0)), -1), device, amp)
        sub = dev.candidates.take(rows)
        cv = table[torch.from_numpy(slot(sub.values.astype(np.int64))).to(device)]
        owner = torch.from_numpy(sub.row_ids()).to(device)
        parts.append((cv * users[owner]).sum(-1).float().cpu().numpy())
    return np.concatenate(parts)


def _metrics(scores: np.ndarray, labels: np.ndarray, offsets: np.ndarray, dist: DistInfo) -> dict:
    """AUC, MRR, nDCG@5, nDCG@10 over all ranks' impressions, from this rank's candidate scores and labels."""
    sums = metric_sums(impression_metrics(scores, labels, offsets)) if len(offsets) > 1 else np.zeros(6)
    total = torch.from_numpy(sums).to(dist.device)
    all_reduce_sum(total)
    return metrics_from_sums(total.cpu().numpy())


def user_vectors(user_encoder, table: torch.Tensor, hist: np.ndarray, device, amp: str, chunk: int = 1024) -> torch.Tensor:
    """User vectors [R, D] (float32) from histories ``hist`` [R, H] of rows of ``table`` (-1: no click there)."""
    parts = []
    for s in range(0, len(hist), chunk):
        h = hist[s : s + chunk]
        mask = torch.from_numpy(h >= 0).to(device)
        hv = table[torch.from_numpy(np.maximum(h, 0)).to(device)]
        with autocast_context(device, amp):
            parts.append(user_encoder(hv, mask).float())
    return torch.cat(parts) if parts else torch.zeros((0, table.shape[1]), device=device)


def _labels_of(beh: Behaviors, rows: np.ndarray) -> np.ndarray:
    return Ragged(beh.candidates.offsets, beh.labels).take(rows).values
