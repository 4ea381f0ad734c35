"""Components every recipe needs: data, tokenizer, token store and model, built rank-safely.

Work that writes shared files (synthetic data, trained vocabularies, token stores) runs on rank 0
first; the other ranks wait at a barrier and then read what it wrote.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from speedyrec.config import Config, ConfigError
from speedyrec.data.dataset import Dataset, cache_dir_of, ensure_synthetic, load_dataset
from speedyrec.data.token_store import TokenStore, build_or_load_field, text_digest, tokenizer_digest
from speedyrec.engine.distributed import DistInfo, barrier
from speedyrec.models.backbone import (EncoderSpec, build_backbone, load_hf_tokenizer, parse_encoder_spec,
                                       train_wordpiece_tokenizer)
from speedyrec.models.recommender import NewsRecommender

log = logging.getLogger("speedyrec")


def rank0_first(dist: DistInfo, fn):
    """Run fn on rank 0, then on the other ranks (which find its files ready)."""
    if dist.is_main:
        out = fn()
        barrier()
    else:
        barrier()
        out = fn()
    return out


def build_dataset(cfg: Config, dist: DistInfo) -> Dataset:
    if cfg.data.format == "synthetic":
        rank0_first(dist, lambda: ensure_synthetic(cfg.data) if dist.is_main else None)
    ds = load_dataset(cfg.data)
    if dist.is_main:
        ds.faults.warn()
        log.info("data: %d news, %d train impressions (%d clicks), %d dev impressions, from %s",
                 len(ds.news), len(ds.train), ds.train.clicks(), len(ds.dev), ds.root)
    return ds


@dataclass
class EncoderParts:
    spec: EncoderSpec
    tokenizer: object
    backbone: torch.nn.Module | None  # built already for user classes


def build_tokenizer(cfg: Config, ds: Dataset, dist: DistInfo) -> EncoderParts:
    spec = parse_encoder_spec(cfg.model.encoder) if dist.is_main else _quiet_spec(cfg.model.encoder)
    if spec.kind == "custom":
        backbone = build_backbone(spec, None, cfg.model)
        tok = getattr(backbone, "tokenizer", None)
        if tok is None:
            raise ConfigError(f"model.encoder={spec.name}: the class must set a `tokenizer` attribute")
        return EncoderParts(spec, tok, backbone)
    if spec.kind == "hf":
        return EncoderParts(spec, load_hf_tokenizer(spec.name), None)
    texts = ds.news.text["title"] + ds.news.text["abstract"]
    cache = cache_dir_of(cfg.data) / "tokenizers" / f"wordpiece-{text_digest(texts)[:16]}-{cfg.model.vocab_size}.json"
    tok = rank0_first(dist, lambda: train_wordpiece_tokenizer(texts, cfg.model.vocab_size, cache))
    return EncoderParts(spec, tok, None)


def _quiet_spec(text: str) -> EncoderSpec:
    logging.disable(logging.WARNING)
    try:
        return parse_encoder_spec(text)
    finally:
        logging.disable(logging.NOTSET)


def training_news_mask(ds: Dataset) -> np.ndarray:
    """The news that occur in the training log (histories and candidates): the corpus content refinement's
    IDF is fitted on; dev-only news are refined with it unchanged."""
    used = np.zeros(len(ds.news), dtype=bool)
    used[ds.train.history.values] = True
    used[ds.train.candidates.values] = True
    return used


def build_token_store(cfg: Config, ds: Dataset, tokenizer, dist: DistInfo) -> TokenStore:
    lengths = {"title": cfg.data.title_tokens, "abstract": cfg.data.abstract_tokens, "body": cfg.data.body_tokens}
    cache = cache_dir_of(cfg.data)
    digest = tokenizer_digest(tokenizer)
    refine = {"topk": cfg.engine.refine_topk, "fit": training_news_mask(ds)} if cfg.engine.refine else None

    def build():
        fields = {}
        for name, max_tokens in lengths.items():
            if max_tokens > 0:
                fields[name], built = build_or_load_field(cache, name, ds.news.text[name], tokenizer, max_tokens,
                                                          digest, refine)
                if built and dist.is_main:
                    log.info("tokenized field %s of %d news (max %d tokens%s)", name, len(ds.news), max_tokens,
                             f", refined to the top {cfg.engine.refine_topk} BM25 words" if refine else "")
        return fields

    fields = rank0_first(dist, build)
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if cls_id is None or sep_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a CLS (or BOS), SEP (or EOS) and PAD token")
    return TokenStore(fields, cls_id, sep_id, tokenizer.pad_token_id)


def build_model(cfg: Config, parts: EncoderParts, dist: DistInfo) -> NewsRecommender:
    torch.manual_seed(cfg.train.seed)
    backbone = parts.backbone or build_backbone(parts.spec, parts.tokenizer, cfg.model)
    if cfg.engine.refine and not hasattr(backbone, "embed"):
        raise ConfigError("engine.refine adds a frequency embedding to the token embeddings and needs a BERT-family "
                          f"encoder run layer by layer; {type(backbone).__name__} is not one")
    model = NewsRecommender(backbone, cfg.model.dim, cfg.model.attention_dim, frequency_embedding=cfg.engine.refine)
    if cfg.train.workflow == "speedyfeed" and cfg.engine.buslm:
        from speedyrec.models.buslm import BusLMNewsEncoder

        model.news_encoder = BusLMNewsEncoder.from_news_encoder(model.news_encoder)
    model = model.to(dist.device)
    if dist.active:  # every rank starts from rank 0's parameters
        for t in list(model.parameters()) + list(model.buffers()):
            torch_dist.broadcast(t.data, src=0)
    return model


def make_out_dir(cfg: Config) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out
