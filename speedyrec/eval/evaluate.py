"""Evaluation on dev impressions: news vectors computed once and shared, users scored, metrics reduced."""
from __future__ import annotations

import time

import numpy as np
import torch

from speedyrec.data.behaviors import Behaviors
from speedyrec.data.ragged import Ragged
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.engine.distributed import DistInfo, all_gather_rows, all_reduce_sum
from speedyrec.engine.trainer import autocast_context
from speedyrec.eval.metrics import impression_metrics, metric_sums, metrics_from_sums


@torch.no_grad()
def encode_news(model, inputs: NewsInputs, news: np.ndarray, dist: DistInfo, batch_size: int, amp: str) -> torch.Tensor:
    """Vectors of the given news [N, D] on every rank; each rank encodes a slice, in length-sorted batches."""
    share = np.array_split(np.arange(len(news)), dist.world)[dist.rank]
    mine = news[share]
    order = np.argsort(inputs.lengths(mine), kind="stable")  # similar lengths together: little padding
    d = model.news_encoder.proj.out_features
    out = torch.zeros((len(mine), d), dtype=torch.float32, device=dist.device)
    for s in range(0, len(mine), batch_size):
        sel = order[s : s + batch_size]
        tokens = inputs.prepare(mine[sel]).to(dist.device)
        with autocast_context(dist.device, amp):
            emb, _, _ = inputs.encode(model, tokens)
        out[torch.from_numpy(sel).to(dist.device)] = emb.float()
    return torch.cat(all_gather_rows(out), dim=0)


@torch.no_grad()
def evaluate(model, inputs: NewsInputs, dev: Behaviors, dist: DistInfo, *, max_history: int, batch_size: int = 256,
             max_impressions: int = 0, amp: str = "auto") -> dict:
    """AUC, MRR, nDCG@5, nDCG@10 averaged over dev impressions with both clicked and non-clicked news."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    if max_impressions:
        dev = dev.take(np.arange(min(max_impressions, len(dev))))
    hist_pad = dev.history.padded(max_history, fill=-1, keep="last")
    needed = np.unique(np.concatenate([hist_pad[hist_pad >= 0], dev.candidates.values]).astype(np.int64))
    table = encode_news(model, inputs, needed, dist, batch_size, amp)  # [U, D]
    slot = lambda idx: np.searchsorted(needed, idx)  # news index -> row of table
    share = np.array_split(np.arange(len(dev)), dist.world)[dist.rank]
    sums = np.zeros(6)
    for s in range(0, len(share), 1024):
        rows = share[s : s + 1024]
        h = hist_pad[rows]
        mask = torch.from_numpy(h >= 0).to(dist.device)
        hv = table[torch.from_numpy(slot(np.maximum(h, 0))).to(dist.device)]
        with autocast_context(dist.device, amp):
            users = model.user_encoder(hv, mask).float()  # [R, D]
        sub = dev.candidates.take(rows)
        lab = _labels_of(dev, rows)
        cv = table[torch.from_numpy(slot(sub.values.astype(np.int64))).to(dist.device)]
        owner = torch.from_numpy(sub.row_ids()).to(dist.device)
        scores = (cv * users[owner]).sum(-1).cpu().numpy()
        sums += metric_sums(impression_metrics(scores, lab, sub.offsets))
    total = torch.from_numpy(sums).to(dist.device)
    all_reduce_sum(total)
    result = metrics_from_sums(total.cpu().numpy())
    result["news_encoded"] = len(needed)
    result["seconds"] = time.perf_counter() - t0
    model.train(was_training)
    return result


def _labels_of(beh: Behaviors, rows: np.ndarray) -> np.ndarray:
    return Ragged(beh.candidates.offsets, beh.labels).take(rows).values
