"""Components every recipe needs: data, tokenizer, token store, model and the run context that holds them, built
rank-safely; and the PLM as teachers and students use it (its first N layers, the first K frozen). Recipes import
this module; nothing here (or in any other component) imports a recipe.

Work that writes shared files (synthetic data, trained vocabularies, token stores) runs on rank 0
first; the other ranks wait at a barrier and then read what it wrote.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from speedyrec.config import Config, ConfigError, budgeted_segments
from speedyrec.data.dataset import Dataset, cache_dir_of, ensure_synthetic, load_dataset
from speedyrec.data.token_store import TokenStore, build_or_load_field, text_digest, tokenizer_digest
from speedyrec.engine.distributed import DistInfo, barrier, broadcast_bytes, sees_rank0_directory
from speedyrec.engine.encode import auto_chunk_tokens
from speedyrec.engine.precision import resolve_amp
from speedyrec.models.backbone import (EncoderSpec, build_backbone, load_hf_tokenizer, parse_encoder_spec,
                                       train_wordpiece_tokenizer)
from speedyrec.models.recommender import NewsEncoder, NewsRecommender

log = logging.getLogger("speedyrec")


def rank0_first(dist: DistInfo, fn, directory: Path | None = None):
    """Run fn on the ranks that build into ``directory`` first, then on the others (which find its files ready).
    The builders are rank 0 and, where ``directory`` is node-local (a rank does not see the files rank 0 writes
    there), the first rank of every other node, so that each node builds its own copy once."""
    builder = dist.is_main
    if directory is not None and dist.active and not sees_rank0_directory(directory, dist.device, "cache"):
        builder = dist.local_rank == 0
    if builder:
        out = fn()
        barrier()
    else:
        barrier()
        out = fn()
    return out


def build_dataset(cfg: Config, dist: DistInfo) -> Dataset:
    if cfg.data.format == "synthetic":
        # every rank calls it: the builders generate, the others find the set complete
        rank0_first(dist, lambda: ensure_synthetic(cfg.data), cache_dir_of(cfg.data))
    if cfg.data.format == "speedyrec" or cfg.data.strict:  # no parse cache: every rank parses, all at once
        ds = load_dataset(cfg.data)
    else:  # the builders parse (and keep the parsed logs in the cache), the other ranks read them from it
        ds = rank0_first(dist, lambda: load_dataset(cfg.data), cache_dir_of(cfg.data))
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
    if not dist.active:
        return EncoderParts(spec, train_wordpiece_tokenizer(texts, cfg.model.vocab_size, cache), None)
    # WordPiece training is not deterministic (the same texts give another vocabulary in another process): rank 0
    # trains (or reads its cache) and every rank uses its file, written into its own cache where that is node-local
    payload = None
    if dist.is_main:
        train_wordpiece_tokenizer(texts, cfg.model.vocab_size, cache)
        payload = cache.read_bytes()
    payload = broadcast_bytes(payload, dist.device)
    if not dist.is_main and not (cache.is_file() and cache.read_bytes() == payload):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(payload)
        os.replace(tmp, cache)
    barrier()
    return EncoderParts(spec, train_wordpiece_tokenizer(texts, cfg.model.vocab_size, cache), None)


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

    fields = rank0_first(dist, build, cache)
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if cls_id is None or sep_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a CLS (or BOS), SEP (or EOS) and PAD token")
    return TokenStore(fields, cls_id, sep_id, tokenizer.pad_token_id)


def segments_of(cfg) -> list[str] | None:
    """The BusLM segment layout when the engine uses it, else None (one concatenated sequence)."""
    if cfg.train.workflow != "speedyfeed" or not cfg.engine.buslm:
        return None
    return budgeted_segments(cfg)


def news_encoding(cfg) -> dict:
    """How the click stages feed a news to its encoder: BusLM's segments (None: one concatenated sequence) and
    refined text (its top-k BM25 words; 0: the raw text). Teachers and the students that learn from them must agree
    on it; model files record it."""
    return {"segments": segments_of(cfg), "refine_topk": cfg.engine.refine_topk if cfg.engine.refine else 0}


def buslm_encoder(news_encoder: NewsEncoder) -> torch.nn.Module:
    """A BusLM encoder sharing ``news_encoder``'s transformer, token pooling and projection, with a new segment
    pooling drawn without moving the global random state: whatever is initialised after it starts as it would
    without BusLM."""
    from speedyrec.models.buslm import BusLMNewsEncoder

    with torch.random.fork_rng(devices=[]):  # built on the CPU, then moved to the projection's device
        return BusLMNewsEncoder.from_news_encoder(news_encoder)


def apply_buslm(model: NewsRecommender, cfg) -> NewsRecommender:
    """``model`` with its news encoder run as BusLM (:func:`buslm_encoder`) when the config encodes news in
    segments; unchanged otherwise. Applied after a plain news encoder's weights are loaded (a snapshot's segment
    pooling, if any, pooled post-training's body segments: the click stages' starts fresh)."""
    if segments_of(cfg) is not None:
        model.news_encoder = buslm_encoder(model.news_encoder)
    return model


def build_model(cfg: Config, parts: EncoderParts, dist: DistInfo) -> NewsRecommender:
    torch.manual_seed(cfg.train.seed)
    backbone = parts.backbone or build_backbone(parts.spec, parts.tokenizer, cfg.model)
    if cfg.engine.refine and not hasattr(backbone, "embed"):
        raise ConfigError("engine.refine adds a frequency embedding to the token embeddings and needs a BERT-family "
                          f"encoder run layer by layer; {type(backbone).__name__} is not one")
    model = NewsRecommender(backbone, cfg.model.dim, cfg.model.attention_dim, frequency_embedding=cfg.engine.refine)
    model = apply_buslm(model, cfg).to(dist.device)
    if dist.active:  # every rank starts from rank 0's parameters
        for t in list(model.parameters()) + list(model.buffers()):
            torch_dist.broadcast(t.data, src=0)
    return model


def make_out_dir(cfg: Config) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Context:
    """What every recipe of a run reads; a pipeline builds it once for all its stages."""

    cfg: Config
    dist: DistInfo
    root: Path  # out_dir
    data: Dataset
    parts: EncoderParts
    store: TokenStore  # the clicks stages' fields (data.title_tokens, ...)

    def stage_dir(self, stage: str) -> Path:
        d = self.root / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def from_dir(self, stage: str) -> Path:
        """Where an earlier stage's outputs are read: ``distill.from_dir`` (default out_dir) / stage."""
        base = Path(self.cfg.distill.from_dir) if self.cfg.distill.from_dir else self.root
        return base / stage

    def bank_dir(self) -> Path:
        return Path(self.cfg.distill.bank_dir) if self.cfg.distill.bank_dir else cache_dir_of(self.cfg.data) / "banks"

    def field_store(self, field: str, max_tokens: int) -> TokenStore:
        """A store of one text field cut to ``max_tokens`` (post-training's titles and bodies)."""
        cache, dist = cache_dir_of(self.cfg.data), self.dist
        tok = self.parts.tokenizer
        digest = tokenizer_digest(tok)
        ft = rank0_first(dist, lambda: build_or_load_field(cache, field, self.data.news.text[field], tok, max_tokens,
                                                           digest)[0], cache)
        return TokenStore({field: ft}, self.store.cls_id, self.store.sep_id, self.store.pad_id)


# stages whose train.amp=auto takes bf16 on a CPU with native bf16: measured to keep quality (benchmarks.precision);
# the distillation stages keep float32 on CPUs, as their benchmarks were measured
CPU_BF16_STAGES = ("finetune",)


def build_context(cfg: Config, dist: DistInfo) -> Context:
    cfg.train.amp, why = resolve_amp(cfg.train.amp, dist.device, cpu_auto=cfg.stage in CPU_BF16_STAGES,
                                     dist_active=dist.active)
    if dist.is_main:
        log.info("precision: %s (%s)", "bf16 autocast" if cfg.train.amp == "bf16" else "float32", why)
    if cfg.engine.chunk_tokens == 0:
        cfg.engine.chunk_tokens = auto_chunk_tokens(dist.device)
    root = make_out_dir(cfg)
    data = build_dataset(cfg, dist)
    parts = build_tokenizer(cfg, data, dist)
    store = build_token_store(cfg, data, parts.tokenizer, dist)
    return Context(cfg, dist, root, data, parts, store)


# -- the PLM as teachers and students use it (layer by layer) --------------------------------------------
def build_plm_backbone(ctx: Context, layers: int, freeze_layers: int) -> torch.nn.Module:
    """The configured PLM with its first ``layers`` layers (0 = all), the first ``freeze_layers`` frozen.

    The seed is reset first, so a randomly initialised encoder is the same base in every stage of a run, and a
    student's N layers are the teachers' first N."""
    if ctx.parts.spec.kind == "custom":
        raise ConfigError(f"stage={ctx.cfg.stage} needs a BERT-family encoder run layer by layer (teachers share "
                          f"and cache their frozen layers); model.encoder={ctx.cfg.model.encoder} is a custom class")
    mc = dataclasses.replace(ctx.cfg.model, layers=layers, freeze_layers=freeze_layers)
    torch.manual_seed(ctx.cfg.train.seed)
    bb = build_backbone(ctx.parts.spec, ctx.parts.tokenizer, mc)
    if not hasattr(bb, "frozen_layers"):
        raise ConfigError(f"stage={ctx.cfg.stage} needs a BERT-family encoder run layer by layer; "
                          f"{ctx.cfg.model.encoder} is run through its own forward")
    return bb


def plm_layers(ctx: Context) -> int:
    """Transformer layers of the configured PLM (a teacher has them all)."""
    spec = ctx.parts.spec
    if spec.kind == "random":
        return int(spec.shape["layers"])
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(spec.name).num_hidden_layers)


def build_news_encoder(ctx: Context, layers: int, freeze_layers: int) -> NewsEncoder:
    mc = ctx.cfg.model
    return NewsEncoder(build_plm_backbone(ctx, layers, freeze_layers), mc.dim, mc.attention_dim)


def build_recommender(ctx: Context, layers: int, freeze_layers: int, seed: int) -> NewsRecommender:
    """A news recommender on the PLM, with the frequency embedding of refined text under engine.refine (its news
    encoder reads one sequence: BusLM is :func:`apply_buslm`); ``seed`` initialises its pooling, projection and
    user encoder."""
    mc = ctx.cfg.model
    backbone = build_plm_backbone(ctx, layers, freeze_layers)
    torch.manual_seed(seed)
    return NewsRecommender(backbone, mc.dim, mc.attention_dim, frequency_embedding=ctx.cfg.engine.refine)
