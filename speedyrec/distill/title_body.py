"""The title-body matching task of Tiny-NewsRec's domain-specific post-training (and of Stage I distillation).

A news body is the anchor, its own title the positive and N titles of other news of the same batch the
negatives, so negatives cost no extra encoding. The score is the dot product of the body and title
vectors; the loss is InfoNCE (cross-entropy over the 1 + N titles). Across ranks a global batch is
split; titles are gathered with autograd so every body sees negatives from the whole global batch and
the gradients equal the single-process ones. Titles are one sequence each; a body is one sequence too, or with
``posttrain.body_segments`` S BusLM segments (a longer body for the cost of S short ones) encoded by the model's
``body_encoder``, which shares the title encoder's transformer, token pooling and projection.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch
from torch import nn

from speedyrec.build import buslm_encoder, training_news_mask
from speedyrec.data.faults import DataError
from speedyrec.engine.distributed import DistInfo, all_gather_with_grad
from speedyrec.engine.prefetch import prefetch
from speedyrec.eval.evaluate import encode_news
from speedyrec.models.news_inputs import NewsInputs, NewsTokens

log = logging.getLogger("speedyrec.distill")

HOLDOUT_SEED = 20231  # the held-out news are a property of the data, the same whatever train.seed


@dataclass
class TitleBodyData:
    titles: NewsInputs  # the title field alone, cut to posttrain.title_tokens
    bodies: NewsInputs  # the body field alone, in the layout of body_layout
    train_news: np.ndarray  # int64: news with a title and a body, not held out
    holdout: np.ndarray  # int64: news kept out of training for the retrieval accuracy
    news_without_body: int  # news skipped for an empty title or body (counted, reported)
    news_outside_train: int = 0  # posttrain.news=train: news left out because the training log never shows them
    body_field: str = "body"  # the field read as the body (posttrain.body_field resolved)


def body_layout(body_field: str, pt) -> tuple[int, list[str] | None]:
    """How a body is read: (tokens its field is cut to, specials included; BusLM segments, or None for one sequence).
    With posttrain.body_segments = S the field holds S x (posttrain.body_tokens - 2) content tokens, which
    TokenStore.segments cuts into S segments of posttrain.body_tokens each, [CLS] and [SEP] included."""
    if not pt.body_segments:
        return pt.body_tokens, None
    return pt.body_segments * (pt.body_tokens - 2) + 2, [body_field] * pt.body_segments


def body_encoder_of(encoder: nn.Module, segments: int) -> nn.Module:
    """What encodes bodies: ``encoder`` itself, or with ``segments`` (posttrain.body_segments) a BusLM encoder sharing
    its transformer, token pooling and projection, with a segment pooling of its own."""
    return buslm_encoder(encoder) if segments else encoder


def body_reader(model):
    """``model`` as it encodes bodies (NewsInputs.encode reads its ``news_encoder``): itself, or a view of its
    ``body_encoder`` where it has one."""
    body = getattr(model, "body_encoder", None)
    return model if body is None else SimpleNamespace(news_encoder=body)


def build_title_body_data(ctx) -> TitleBodyData:
    pt = ctx.cfg.posttrain
    titles = NewsInputs(ctx.field_store("title", pt.title_tokens))
    body_field = pt.body_field
    if body_field == "auto":
        body_field = "body" if any(ctx.data.news.text["body"]) else "abstract"
        if body_field == "abstract" and ctx.dist.is_main:
            log.warning("post-training: no news has a body (no bodies.tsv): titles are matched with abstracts "
                        "(posttrain.body_field=auto)")
    body_tokens, segments = body_layout(body_field, pt)
    bodies = NewsInputs(ctx.field_store(body_field, body_tokens), segments)
    every = np.arange(titles.store.num_news)
    eligible = every[(titles.store.lengths(every) > 2) & (bodies.store.lengths(every) > 2)]
    skipped = len(every) - len(eligible)
    outside = 0
    if pt.news == "train":  # only what the training log shows: no dev or test candidate's text
        seen = training_news_mask(ctx.data)
        outside = int((~seen[eligible]).sum())
        eligible = eligible[seen[eligible]]
        if ctx.dist.is_main:
            log.info("post-training: %d news outside the training log left out (posttrain.news=train)", outside)
    if len(eligible) < pt.holdout + pt.negatives + 1:
        where = " and appear in the training log (posttrain.news=train)" if pt.news == "train" else ""
        raise DataError(f"post-training needs news with both a title and a {body_field}: {len(eligible)} of "
                        f"{len(every)} have both{where}, fewer than posttrain.holdout={pt.holdout} + "
                        "posttrain.negatives + 1 (bodies come from bodies.tsv, or DocFeatures.tsv in the SpeedyRec "
                        "layout; posttrain.body_field=abstract reads abstracts instead)")
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(eligible)
    if skipped and ctx.dist.is_main:
        log.warning("post-training: %d of %d news have an empty title or body and are skipped", skipped, len(every))
    return TitleBodyData(titles, bodies, np.sort(perm[pt.holdout:]), np.sort(perm[: pt.holdout]), skipped, outside,
                         body_field)


@dataclass
class TitleBodyBatch:
    news: np.ndarray  # int64 [B]: the global batch
    sizes: list[int]  # rows of the global batch per rank
    mine: np.ndarray  # int64 [b]: this rank's positions in the global batch
    candidates: torch.Tensor  # int64 [b, 1 + N]: positions in the global batch, the own title first
    titles: NewsTokens  # this rank's news
    bodies: NewsTokens


class TitleBodyBatches:
    """Epochs of shuffled global batches of ``batch_size`` news (nearly equal sizes, none dropped)."""

    def __init__(self, news: np.ndarray, data: TitleBodyData, batch_size: int, negatives: int, seed: int,
                 dist: DistInfo, pin: bool = False):
        self.news, self.data = news, data
        self.batch_size, self.negatives, self.seed = batch_size, negatives, seed
        self.rank, self.world, self.pin = dist.rank, dist.world, pin

    def steps_per_epoch(self) -> int:
        return -(-len(self.news) // self.batch_size)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[TitleBodyBatch]:
        order = np.random.default_rng([self.seed, epoch, 23]).permutation(self.news)
        parts = np.array_split(order, self.steps_per_epoch())
        gen = (self._batch(news, epoch, k) for k, news in enumerate(parts) if k >= skip)
        return prefetch(gen, depth=2, pin=self.pin)

    def _batch(self, news: np.ndarray, epoch: int, k: int) -> TitleBodyBatch:
        b = len(news)
        keys = np.random.default_rng([self.seed, epoch, k, 29]).random((b, b))
        np.fill_diagonal(keys, 2.0)  # never the own title
        negs = np.argsort(keys, axis=1)[:, : min(self.negatives, b - 1)]
        cand = np.concatenate([np.arange(b)[:, None], negs], axis=1)
        split = np.array_split(np.arange(b), self.world)
        mine = split[self.rank]
        return TitleBodyBatch(news, [len(s) for s in split], mine, torch.from_numpy(cand[mine]),
                              self.data.titles.prepare(news[mine]), self.data.bodies.prepare(news[mine]))


@dataclass
class EncodedPairs:
    titles: torch.Tensor  # [b, D] this rank's title vectors
    bodies: torch.Tensor  # [b, D]
    all_titles: torch.Tensor  # [B, D] the global batch's title vectors (autograd across ranks)
    logits: torch.Tensor  # [b, 1 + N] body . title of each candidate, the own title first
    counters: dict


def encode_pairs(model, data: TitleBodyData, batch: TitleBodyBatch, device: torch.device,
                 encode=None) -> EncodedPairs:
    """Encode this rank's titles and bodies with ``model`` and score every body against its candidates.
    ``encode(inputs, model, tokens) -> (vectors, valid, padded)``: another way to encode them (default
    ``inputs.encode(model, tokens)``)."""
    encode = encode or (lambda inputs, m, tokens: inputs.encode(m, tokens))
    h_t, vt, pt = encode(data.titles, model, batch.titles.to(device))
    h_b, vb, pb = encode(data.bodies, body_reader(model), batch.bodies.to(device))
    all_t = all_gather_with_grad(h_t, batch.sizes)
    cand = batch.candidates.to(device)
    logits = torch.einsum("bd,bcd->bc", h_b, all_t[cand]).float()
    counters = {"news_trained": len(batch.mine), "valid_tokens": vt + vb, "padded_tokens": pt + pb}
    return EncodedPairs(h_t, h_b, all_t, logits, counters)


def retrieval_accuracy(title_vec: torch.Tensor, body_vec: torch.Tensor, negatives: int) -> dict:
    """How often a held-out body scores its own title highest: among all held-out titles, and among its title
    and ``negatives`` random others (the training task's difficulty). title_vec, body_vec [H, D]."""
    sims = body_vec.float() @ title_vec.float().t()  # [H, H]
    h = len(sims)
    own = sims.diagonal()
    acc_all = float((sims.argmax(dim=1) == torch.arange(h, device=sims.device)).float().mean())
    keys = np.random.default_rng(HOLDOUT_SEED).random((h, h))
    np.fill_diagonal(keys, 2.0)
    negs = torch.from_numpy(np.argsort(keys, axis=1)[:, : min(negatives, h - 1)]).to(sims.device)
    acc_n = float((own > sims.gather(1, negs).max(dim=1).values).float().mean())
    return {"retrieval_acc": acc_all, f"retrieval_acc_{min(negatives, h - 1) + 1}": acc_n, "holdout_news": h}


def retrieval_of(entry: dict) -> dict:
    """The retrieval figures of a metrics entry (a snapshot's carries its name, step and loss too)."""
    return {k: v for k, v in entry.items() if k.startswith("retrieval_acc") or k == "holdout_news"}


def describe_retrieval(m: dict) -> str:
    """A retrieval result in words: its title among all held-out titles, and among the training task's candidates."""
    if not m:
        return "n/a (no held-out news)"
    n = next(k for k in m if k.startswith("retrieval_acc_"))
    return f"{m['retrieval_acc']:.3f} top-1 of {m['holdout_news']}, {m[n]:.3f} top-1 of {n.rsplit('_', 1)[1]}"


@torch.no_grad()
def model_retrieval(model, data: TitleBodyData, dist: DistInfo, negatives: int, batch_size: int, amp: str) -> dict:
    """Retrieval accuracy of ``model``'s news encoder on the held-out news."""
    if len(data.holdout) < 2:
        return {}
    was = model.training
    model.eval()
    t = encode_news(model, data.titles, data.holdout, dist, batch_size, amp)
    b = encode_news(body_reader(model), data.bodies, data.holdout, dist, batch_size, amp)
    model.train(was)
    return retrieval_accuracy(t, b, negatives)
