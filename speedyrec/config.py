"""Run configuration: nested dataclasses, a YAML file, and dotted ``key=value`` overrides.

Every key a user can set lives here. Unknown keys are an error that names the key and the
nearest valid one; keys of features that do not exist yet are accepted by the parser but
rejected by :func:`check_implemented` with "not implemented yet".
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("finetune", "posttrain", "distill_posttrain", "finetune_teachers", "distill_finetune", "pipeline", "newsbert")
IMPLEMENTED_STAGES = STAGES
TITLE_BODY_STAGES = ("posttrain", "distill_posttrain")  # the stages that train on titles and bodies, not clicks


class ConfigError(ValueError):
    """A configuration a user wrote is invalid; the message names the key."""


@dataclass
class DataConfig:
    dir: str = ""  # empty: the embedded synthetic default, generated on first use
    format: str = "synthetic"  # mind | speedyrec | synthetic
    strict: bool = False  # stop at the first bad row with file:line and the reason
    cache_dir: str = ""  # tokenized stores, parsed logs; empty: $SPEEDYREC_CACHE or ~/.cache/speedyrec
    title_tokens: int = 30  # maximum tokens per field, special tokens included; 0 = field unused
    abstract_tokens: int = 0
    body_tokens: int = 0
    max_history: int = 50  # clicks the user encoder sees (typical truncation, speedyfeed chunk, evaluation)
    dev_fraction: float = 0.1  # single-split layout: the last fraction of impressions by time is dev
    max_line_bytes: int = 8 << 20  # longer lines are counted as overlong and skipped
    synthetic_users: int = 2000
    synthetic_seed: int = 0
    synthetic_head_share: float = 0.6  # share of clicks on the most popular news ...
    synthetic_head_fraction: float = 0.1  # ... this fraction of the news
    synthetic_history_mean: float = 0.0  # mean user history length; 0 = the calibrated ~32 of the real MIND slice


@dataclass
class ModelConfig:
    # HF hub name, local path, "auto" (the pretrained MiniLM when installed, else random BERT of its
    # shape), "random[:hidden=H,layers=L,heads=A,intermediate=I]", or "package.module:Class".
    encoder: str = "auto"
    layers: int = 0  # keep the first N transformer layers; 0 = all
    # freeze the embeddings and the first K layers; -1 = all but the top 2 of a pretrained encoder (Tiny-NewsRec's
    # finetuning), nothing of a random one
    freeze_layers: int = -1
    dim: int = 256  # news and user embedding size
    attention_dim: int = 200  # hidden size of the additive attention poolings
    vocab_size: int = 8000  # WordPiece vocabulary trained on the corpus for a random encoder
    dropout: float = -1.0  # dropout of the transformer (hidden and attention); -1 = the encoder's own


@dataclass
class TrainConfig:
    workflow: str = "speedyfeed"  # typical | speedyfeed
    epochs: int = 1
    max_steps: int = 0  # stop after this many optimizer steps; 0 = no limit
    max_seconds: float = 0.0  # stop once the training loop has run this long (quality at equal time); 0 = no limit
    seed: int = 0
    batch_size: int = 32  # typical workflow: training instances (clicks) per step, over all ranks
    negatives: int = 4  # typical workflow: impression negatives per click
    # typical workflow's targets: the impressions' clicks (Recommenders), or every click of the user sequences
    # with the engine's negatives (speedyfeed's targets, for comparisons on identical targets)
    typical_targets: str = "impressions"
    # attention poolings, projections, user encoder / the pretrained transformer. -1 = auto: 4x the base rates
    # (4e-4 / 2e-4) for stage=finetune with the speedyfeed workflow (chosen by benchmarks.speedup's sweep; +1 AUC
    # point on the main job), the base rates (1e-4 / 5e-5) for the typical workflow and the distillation stages
    # (their benchmarks were measured with them)
    lr: float = -1.0
    encoder_lr: float = -1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # click stages (finetune, finetune_teachers, distill_finetune, newsbert): constant, or linear decay to zero
    # over the run (train.epochs of clicks, or train.max_steps when set); post-training and Stage I stay constant.
    # auto: linear for stage=finetune (benchmarks.tune: a steadier, higher end of training), constant for the
    # distillation stages and the pipeline (their results in benchmarks/ were measured with it)
    lr_schedule: str = "auto"
    grad_accum: int = 1
    grad_clip: float = 1.0
    # bf16 autocast | off (float32) | auto: bf16 where every rank's device computes bf16 natively (CUDA with bf16;
    # for stage=finetune also a CPU with avx512_bf16 or amx_bf16), else off; resolved when the run starts
    amp: str = "auto"
    # stage=finetune: torch.compile the news and user encoders (dynamic shapes). Off: measured by
    # benchmarks.precision on this CPU, it trains slower than eager and costs tens of seconds to compile
    compile: bool = False
    resume: str = ""  # checkpoint path, or "auto" for the newest in out_dir
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 3  # keep the newest N checkpoints (0 = all)
    # a checkpoint that cannot be written (a full disk): error (the run stops, naming the file and the cause) |
    # warn (the run goes on without it); either way the earlier checkpoints stay whole
    checkpoint_errors: str = "error"
    log_every: int = 20
    # hand freed heap memory back to the system (glibc malloc_trim) every this many optimizer steps; 0 = never.
    # Varying batch shapes fragment the heap, whose resident size otherwise grows with the epoch (benchmarks.scaling)
    heap_trim_every: int = 50


DEFAULT_SEGMENTS = ("title", "abstract", "body")


@dataclass
class EngineConfig:
    dedup: bool = True
    global_dedup: bool = False
    dynamic_batching: bool = True
    token_budget: int = 20000  # per batch: distinct news x the bucket's padded length
    buckets: int = 2
    # encode a batch's news in length-sorted chunks of at most this many padded tokens; 0 = auto, by the device:
    # 2048 on a CPU, 65536 on a GPU (speedyrec.engine.encode.auto_chunk_tokens says why)
    chunk_tokens: int = 0
    random_negatives: str = "uniform"  # when an impression has too few non-clicks: uniform | popularity
    cache: bool = True
    cache_beta: float = 2e-3
    cache_gamma: int = 20
    cache_audit: int = 0  # per step, re-encode up to this many cache hits and report their drift (cosine)
    # keep the gradients served cache rows receive and give them to the news' next fresh encoding (at most gamma
    # steps late), so the cache does not take training signal from the encoder
    cache_deferred_grad: bool = False
    autoregressive: bool = True
    # a chunk of a long user's sequence starts with up to data.max_history earlier clicks as context (not targets)
    chunk_context: bool = True
    # negatives per click (impression non-clicks first, random otherwise). 0 = auto: 4 for stage=finetune
    # (benchmarks.tune: +0.95 AUC points at the end of training, at half the targets per second), 1 for the
    # distillation stages (their results in benchmarks/ were measured with it)
    negatives: int = 0
    # which clicks are training targets: all (every click of a user's sequence, SpeedyFeed's autoregressive loss;
    # a history click without an impression gets random negatives) | impressions (only clicks made in an impression,
    # scored against its non-clicked news, as evaluation scores them; history clicks are context) | auto:
    # impressions for stage=finetune with the speedyfeed workflow (benchmarks.speedup, 3 seeds: 12x sooner to the
    # typical workflow's best AUC and +0.9 points above it, where every-click targets never reach it), all for the
    # distillation stages (their benchmarks were measured with it)
    targets: str = "auto"
    # stage=finetune: score each click also against every news of the rank's batch its user did not click (no
    # extra encoding; the count depends on the batch, so on engine.token_budget and the number of ranks)
    inbatch_negatives: bool = False
    # BusLM: a news's fields encoded as segments joined by a bus (speedyfeed workflow). Every click stage reads news
    # this way (finetune, the teachers, the teacher bank, Stage II's student, NewsBERT, the plain student);
    # posttrain and Stage I encode a title and a body each as one sequence, and the click stages start from them
    buslm: bool = False
    # one BusLM segment per entry; a field named k times is cut into k consecutive segments (long bodies). The
    # default takes those of its fields that have a token budget (data.<field>_tokens > 0), in this order; a list
    # given otherwise must name only fields with a budget
    segments: list = field(default_factory=lambda: list(DEFAULT_SEGMENTS))
    # content refinement: each field cut to its top refine_topk BM25 words, with a learned word-count embedding;
    # every click stage alike (posttrain and Stage I read the raw text)
    refine: bool = False
    refine_topk: int = 32
    prefetch: int = 4  # batches prepared ahead by the loader thread
    # frozen layers' output computed once per news and reused (false: recomputed at every step, the conventional way)
    frozen_cache: bool = True
    # where the frozen-prefix caches live: one copy per node, mapped by all its ranks, so node-local scratch (not the
    # shared out_dir); "" = the system's temporary folder. Size per cache: real tokens of all news x hidden x 2
    # bytes under bf16 autocast (4 in float32), plus 4 bytes per news (speedyrec.models.frozen_prefix)
    frozen_cache_dir: str = ""


@dataclass
class EvalConfig:
    batch_size: int = 256  # news per encoder call when building the evaluation news table
    max_impressions: int = 0  # 0 = all dev impressions
    # every click stage (finetune, finetune_teachers, distill_finetune, newsbert, the pipeline's): evaluate every N
    # optimizer steps as well as at the end; 0 = only at the end. A stage's points go to its dev_curve.json
    every: int = 0
    every_seconds: float = 0.0  # ... or every this many seconds of training (evaluation time excluded)
    # stop training after this many periodic evaluations without a new best dev AUC (the teachers' mean AUC in
    # finetune_teachers, the student's in newsbert); 0 = never stop early
    patience: int = 0


@dataclass
class PosttrainConfig:
    """Tiny-NewsRec's domain-specific post-training of the teacher PLM: InfoNCE, a news body as anchor, its
    title as positive and in-batch titles of other news as negatives. Stage I distillation reads the same
    data settings."""

    teachers: int = 4  # M: snapshots kept
    train_layers: int = 3  # the top layers trained (paper: 3 of 12; here 3 of MiniLM's 6)
    # paper: 24 and 512 tokens. A body costs its length in every trained layer at every step; 2 CPU cores
    # afford 64 (8x less than 512), and a news body states its topic in its first sentences.
    title_tokens: int = 24
    body_tokens: int = 64
    # S >= 1: a body is its first S x body_tokens tokens read as S BusLM segments of body_tokens each (8 x 64 = the
    # paper's 512), joined by the bus: attention costs S x 64^2 instead of 512^2; 0 = one sequence of body_tokens
    body_segments: int = 0
    # the field read as a news's body: body | abstract | auto (the body where the data has bodies: bodies.tsv, or
    # DocFeatures.tsv in the SpeedyRec layout; else the abstract, as MIND's news.tsv holds no body; the log says)
    body_field: str = "auto"
    negatives: int = 9  # N other titles per body, drawn from the batch (no extra encoding)
    batch_size: int = 32
    lr: float = 1e-4  # attention pooling and projection
    encoder_lr: float = 3e-5  # the trained transformer layers (paper: 1e-6 over ~10k steps of UniLM)
    snapshot_after: int = 120  # steps before the first snapshot (the loss has flattened by then)
    snapshot_every: int = 40  # K: steps between snapshots (paper: 500)
    holdout: int = 500  # news kept out of training, for the title-retrieval accuracy of every snapshot
    # which news post-training (and Stage I) reads: all = every news with a title and a body, the dev and test
    # candidates' text included (self-supervised, no labels are read, but transductive: the evaluation news' text
    # shapes the teachers); train = only news the training log shows (its histories and impressions)
    news: str = "all"


@dataclass
class DistillConfig:
    """Tiny-NewsRec's two distillation stages (I: post-training, II: finetuning)."""

    student_layers: int = 2  # N: the student is the first N layers of the PLM (paper: 1, 2 or 4)
    from_dir: str = ""  # where earlier stages wrote their outputs (out_dir/<stage>/); empty = out_dir
    stage1_teachers: int = 0  # teachers in Stage I: 0 = all M snapshots; 1 = the last one (the earlier paper)
    # Stage I's embedding loss maps each teacher's vectors with a learned W_i h + b_i (the later paper's Eq.);
    # false: plain MSE between teacher and student vectors (the earlier paper; both have model.dim dimensions)
    stage1_projections: bool = True
    stage1_epochs: int = 2  # Stage I passes over the post-training news
    stage1_lr: float = 1e-4  # Stage I: pooling, projection and the teacher projections
    stage1_encoder_lr: float = 5e-5  # Stage I: the student's transformer
    temperature: float = 1.0  # T_DP
    temperature_ft: float = 1.0  # T_FT
    ce_weight_dp: float = 1.0  # weight of the student's own InfoNCE in Stage I (the earlier paper's beta_1)
    bank_dir: str = ""  # where teacher banks are kept, by teacher checksum; empty = <data.cache_dir>/banks
    bank: bool = True  # Stage II reads the teachers' news vectors from the bank (false: teachers run online, naively)
    ce_weight_ft: float = 1.0  # weight of the student's own click CE in Stage II (the earlier paper's beta_2 = 0.1)
    emb_weight: float = 1.0  # weight of the embedding (projected-MSE) losses, both stages
    # weight of the distillation loss (soft labels: the teachers' weighted scores), both stages. A weight of 0 drops
    # its term, uncomputed (the paper's Figure 4); with distill_weight and emb_weight both 0 a stage reads no teacher
    distill_weight: float = 1.0
    learn_omega: bool = False  # the earlier paper: teacher weights softmax(-omega * CE) with a learned omega > 0
    # how both stages weigh the teachers: per_sample (softmax(-CE) per sample, as the papers) | uniform (1/M each,
    # benchmarks.student_gap's control for what the per-sample weighting earns)
    weighting: str = "per_sample"
    # the teachers after post-training: 0 = every one (posttrain.teachers); M = the first M snapshots, the ones a
    # posttrain.teachers=M run keeps: finetune_teachers finetunes them and both distillation stages read them and
    # their finetuned teachers (benchmarks.teacher_count post-trains and finetunes the most teachers once, and links
    # them for every smaller M)
    teachers: int = 0
    student_init: str = "stage1"  # stage1 (Stage I's student) | plm (the first model.layers layers of the PLM)
    # weight of TinyBERT's intermediate losses in both stages (TinyBERT-MT, Tiny-NewsRec's Table 4): the student's
    # embeddings', layers' outputs and attention scores against each teacher's mapped layer (i -> i * K), weighted per
    # sample; 0 = off. The bank holds no hidden states: every news the student encodes runs the M teachers' PLMs too
    intermediate_weight: float = 0.0


@dataclass
class TeachersConfig:
    """``finetune_teachers``: the post-trained teachers finetuned on clicks, together, on the engine."""

    finetune_layers: int = 2  # the top layers trained (paper: 2); 0: only pooling, projection and user encoder train
    plain: bool = False  # also finetune the PLM without post-training (the paper's PLM-NR (FT))
    # the earlier paper: the last snapshot finetuned M times, instead of M snapshots. The snapshot holds the
    # transformer, pooling and projection, so teacher i differs from the others only in its user encoder's
    # initialisation (seed train.seed + i) and in the dropout masks it draws; all M share the data order, because
    # they train in one pass of the engine (the paper's seeds changed the order too)
    seeds: bool = False
    # where the teachers start: posttrain (the M post-training snapshots) | plm (M = posttrain.teachers copies of
    # the plain PLM, no post-training, teacher i initialised with seed train.seed + i: MT-BERT's teachers)
    init: str = "posttrain"


@dataclass
class NewsBertConfig:
    """NewsBERT: teacher and student trained jointly, sharing pooling, projection and user encoder."""

    momentum: float = 0.15  # beta: g_s <- (1 - beta) g_s + beta * mean gradient of the teacher block
    teacher_layers: int = 0  # the teacher's layers (0 = all); a multiple of the student's model.layers
    # auto (the last post-training snapshot if out_dir has one, else the PLM) | plm | posttrain | finetuned (the
    # teachers of finetune_teachers, every layer trained from there: MT-BERT's, with teachers.init=plm)
    teacher_init: str = "auto"
    # M teachers trained jointly with the student, sharing its pooling, projection and user encoder, weighted per
    # target by softmax(-CE) (Tiny-NewsRec's Table 4): the last M snapshots (NewsBERT-MT) or M finetuned teachers
    teachers: int = 1
    hidden_weight: float = 1.0  # weight of the hidden-state and embedding MSE losses


@dataclass
class PipelineConfig:
    baselines: bool = False  # also train the plain teacher, the plain student and NewsBERT's student
    newsbert: bool = True  # with baselines: NewsBERT's student too (its teacher's layers split into student blocks)
    # another pipeline's out_dir whose post-training and finetuned teachers are reused (linked, not trained
    # again): students of other sizes or settings learn from the same teachers
    teachers_from: str = ""
    # false: Stage II ablated (the paper's Figure 3): Stage I's student is finetuned on clicks without teachers, as
    # the plain student is, in out_dir/student_stage1 (the teachers are finetuned only for pipeline.baselines)
    stage2: bool = True


@dataclass
class Config:
    out_dir: str = "runs/default"
    stage: str = "finetune"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    posttrain: PosttrainConfig = field(default_factory=PosttrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    newsbert: NewsBertConfig = field(default_factory=NewsBertConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _number(text: str) -> Any:
    """A number in any form a person types (4e-4, 1E3, 2_000, 0.5); the text itself when it is none."""
    t = text.strip()
    for conv in (int, float):
        try:
            v = conv(t)
        except ValueError:
            continue
        return v if math.isfinite(v) else text
    return text


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp) or tp
    if isinstance(value, str) and tp is not str:
        value = yaml.safe_load(value) if value != "" else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        value = _number(value)  # YAML 1.1 reads 4e-4 (no dot) as a string
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if tp is str:
        return "" if value is None else str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return list(value)
    raise AssertionError(f"no coercion for {tp}")


def _set(cfg: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown_key(dotted)
        hints = typing.get_type_hints(type(obj))
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hints[part]):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{dotted}' is a section; set its keys, e.g. '{dotted}.<key>=...'")
                for k, v in value.items():
                    _set(cfg, f"{dotted}.{k}", v)
            else:
                setattr(obj, part, _coerce(dotted, value, hints[part]))
        else:
            obj = getattr(obj, part)


def flat_config(d: dict) -> dict:
    """A config dict as {dotted key: value} (a list value, e.g. engine.segments, stays one value)."""
    return dict(_flatten(d))


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in d.items():
        key = prefix + str(k)
        if isinstance(v, dict) and key in SECTIONS:
            items += _flatten(v, key + ".")
        else:
            items.append((key, v))
    return items


SECTIONS = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)}


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Build a Config from an optional YAML file and ``key=value`` overrides (later wins)."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(raw).__name__}")
        for key, value in _flatten(raw):
            _set(cfg, key, value)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value)
    resolve_auto(cfg)
    validate(cfg)
    return cfg


BASE_LR, BASE_ENCODER_LR = 1e-4, 5e-5  # train.lr and train.encoder_lr at multiple 1
# values a run resolves only when it starts, by the machine and the model (what config.yaml then records)
RUNTIME_RESOLVED = {"train.amp": "auto", "model.freeze_layers": -1, "engine.chunk_tokens": 0}
SPEEDYFEED_LR_MULTIPLE = 4  # train.lr=-1 (auto) for stage=finetune with the speedyfeed workflow


def resolve_auto(cfg: Config) -> None:
    """Replace the ``auto`` values that depend on the stage by what they mean for it (the saved config.yaml
    then says what the run used)."""
    mult = SPEEDYFEED_LR_MULTIPLE if cfg.stage == "finetune" and cfg.train.workflow == "speedyfeed" else 1
    if cfg.train.lr == -1:
        cfg.train.lr = BASE_LR * mult
    if cfg.train.encoder_lr == -1:
        cfg.train.encoder_lr = BASE_ENCODER_LR * mult
    if cfg.train.lr_schedule == "auto":
        cfg.train.lr_schedule = "linear" if cfg.stage == "finetune" else "constant"
    if cfg.engine.negatives == 0:
        cfg.engine.negatives = 4 if cfg.stage == "finetune" else 1
    if cfg.engine.targets == "auto":
        cfg.engine.targets = "impressions" if cfg.stage == "finetune" and cfg.train.workflow == "speedyfeed" else "all"


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        near = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}; got '{value}'{hint}")


def validate(cfg: Config) -> None:
    """Check values a user can get wrong; raise ConfigError naming the key."""
    _choice("stage", cfg.stage, STAGES)
    _choice("data.format", cfg.data.format, ("mind", "speedyrec", "synthetic"))
    _choice("train.workflow", cfg.train.workflow, ("typical", "speedyfeed"))
    _choice("train.amp", cfg.train.amp, ("auto", "bf16", "off"))
    _choice("train.typical_targets", cfg.train.typical_targets, ("impressions", "sequence"))
    _choice("train.lr_schedule", cfg.train.lr_schedule, ("auto", "constant", "linear"))  # auto is resolved by now
    _choice("train.checkpoint_errors", cfg.train.checkpoint_errors, ("error", "warn"))
    positive = {
        "model.dim": cfg.model.dim,
        "model.attention_dim": cfg.model.attention_dim,
        "train.batch_size": cfg.train.batch_size,
        "train.epochs": cfg.train.epochs,
        "train.grad_accum": cfg.train.grad_accum,
        "train.negatives": cfg.train.negatives,
        "data.max_history": cfg.data.max_history,
        "engine.token_budget": cfg.engine.token_budget,
        "engine.buckets": cfg.engine.buckets,
        "engine.negatives": cfg.engine.negatives,
        "engine.refine_topk": cfg.engine.refine_topk,
        "eval.batch_size": cfg.eval.batch_size,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {v}")
    for key, v in {"train.lr": cfg.train.lr, "train.encoder_lr": cfg.train.encoder_lr}.items():
        if v < 0:  # -1 (auto) is resolved by now
            raise ConfigError(f"config key '{key}' must be >= 0 (or -1: auto), got {v}")
    nonneg = {
        "data.title_tokens": cfg.data.title_tokens,
        "data.abstract_tokens": cfg.data.abstract_tokens,
        "data.body_tokens": cfg.data.body_tokens,
        "model.layers": cfg.model.layers,
        "train.max_steps": cfg.train.max_steps,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "train.heap_trim_every": cfg.train.heap_trim_every,
        "engine.chunk_tokens": cfg.engine.chunk_tokens,
        "engine.cache_gamma": cfg.engine.cache_gamma,
        "engine.cache_audit": cfg.engine.cache_audit,
        "eval.every": cfg.eval.every,
        "eval.every_seconds": cfg.eval.every_seconds,
        "eval.patience": cfg.eval.patience,
    }
    for key, v in nonneg.items():
        if v < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {v}")
    for key in ("data.title_tokens", "data.abstract_tokens", "data.body_tokens"):
        v = nonneg[key]
        if 0 < v < 3:
            raise ConfigError(f"config key '{key}' must be 0 (field unused) or at least 3 (two special tokens and one word)")
    if not (cfg.data.title_tokens or cfg.data.abstract_tokens or cfg.data.body_tokens):
        raise ConfigError("no text field is used: set data.title_tokens, data.abstract_tokens or data.body_tokens > 0")
    if not 0.0 <= cfg.data.dev_fraction < 1.0:
        raise ConfigError(f"config key 'data.dev_fraction' must be in [0, 1), got {cfg.data.dev_fraction}")
    if cfg.model.freeze_layers < -1:
        raise ConfigError(f"config key 'model.freeze_layers' must be >= 0, or -1 for the default; got {cfg.model.freeze_layers}")
    if cfg.train.max_seconds < 0:
        raise ConfigError(f"config key 'train.max_seconds' must be >= 0, got {cfg.train.max_seconds}")
    if cfg.eval.patience and not (cfg.eval.every or cfg.eval.every_seconds):
        raise ConfigError("eval.patience stops training when periodic dev evaluations stop improving: "
                          "set eval.every (steps) or eval.every_seconds as well")
    if not (cfg.model.dropout == -1.0 or 0.0 <= cfg.model.dropout < 1.0):
        raise ConfigError(f"config key 'model.dropout' must be -1 (the encoder's own) or in [0, 1), got {cfg.model.dropout}")
    if cfg.engine.cache_beta < 0:
        raise ConfigError(f"config key 'engine.cache_beta' must be >= 0, got {cfg.engine.cache_beta}")
    _choice("engine.random_negatives", cfg.engine.random_negatives, ("uniform", "popularity"))
    _choice("engine.targets", cfg.engine.targets, ("all", "impressions"))
    if cfg.engine.targets != "all" and (cfg.train.workflow != "speedyfeed" or cfg.stage in TITLE_BODY_STAGES):
        raise ConfigError("engine.targets chooses the click targets of the speedyfeed workflow's loss: it needs "
                          "train.workflow=speedyfeed and a stage that trains on clicks (the typical workflow trains "
                          "impression clicks already; posttrain and distill_posttrain train on titles and bodies); "
                          f"got stage={cfg.stage}, train.workflow={cfg.train.workflow}")
    if cfg.train.workflow == "typical":
        for key in ("buslm", "refine"):
            if getattr(cfg.engine, key):
                raise ConfigError(f"engine.{key} changes how news are encoded and belongs to train.workflow=speedyfeed; "
                                  "the typical workflow is the plain baseline")
    if cfg.engine.cache_audit and (cfg.train.workflow != "speedyfeed" or not cfg.engine.cache or not cfg.engine.cache_gamma):
        raise ConfigError("engine.cache_audit audits the embedding cache: it needs train.workflow=speedyfeed, "
                          "engine.cache=true and engine.cache_gamma > 0")
    if cfg.engine.inbatch_negatives and (cfg.stage != "finetune" or cfg.train.workflow != "speedyfeed"):
        raise ConfigError("engine.inbatch_negatives scores clicks against the speedyfeed workflow's batch table: it "
                          "needs stage=finetune and train.workflow=speedyfeed (the distillation stages and the "
                          f"pipeline keep their sampled negatives); got stage={cfg.stage}, "
                          f"train.workflow={cfg.train.workflow}")
    if cfg.engine.inbatch_negatives and not cfg.engine.dedup:
        raise ConfigError("engine.inbatch_negatives needs engine.dedup=true: without it a batch table may hold a news "
                          "twice, and a copy of a user's own click would be scored as a negative")
    if cfg.engine.cache_deferred_grad and (cfg.train.workflow != "speedyfeed" or not cfg.engine.cache
                                           or not cfg.engine.cache_gamma):
        raise ConfigError("engine.cache_deferred_grad keeps the gradients of embedding-cache hits: it needs "
                          "train.workflow=speedyfeed, engine.cache=true and engine.cache_gamma > 0")
    if cfg.engine.global_dedup and not cfg.engine.dedup:
        raise ConfigError("engine.global_dedup=true needs engine.dedup=true")
    if cfg.train.compile and cfg.stage != "finetune":
        raise ConfigError(f"train.compile compiles the encoders of stage=finetune; stage={cfg.stage} runs its teachers "
                          "and students uncompiled")
    _validate_distillation(cfg)
    for seg in cfg.engine.segments:
        _choice("engine.segments", seg, ("title", "abstract", "body"))
    if cfg.engine.buslm:
        unused = [f for f in dict.fromkeys(cfg.engine.segments) if getattr(cfg.data, f"{f}_tokens") == 0]
        if unused and list(cfg.engine.segments) != list(DEFAULT_SEGMENTS):
            raise ConfigError(f"engine.segments lists {', '.join(unused)} but data.{unused[0]}_tokens is 0: "
                              f"give the field a maximum length or drop it from the segments")


def budgeted_segments(cfg: Config) -> list[str]:
    """engine.segments as BusLM reads them: the default keeps its fields that have a token budget."""
    segments = list(cfg.engine.segments)
    if segments == list(DEFAULT_SEGMENTS):
        segments = [f for f in segments if getattr(cfg.data, f"{f}_tokens") > 0]
    return segments


def _validate_distillation(cfg: Config) -> None:
    pt, di, nb = cfg.posttrain, cfg.distill, cfg.newsbert
    positive = {"posttrain.teachers": pt.teachers, "posttrain.train_layers": pt.train_layers,
                "posttrain.negatives": pt.negatives, "posttrain.snapshot_after": pt.snapshot_after,
                "posttrain.snapshot_every": pt.snapshot_every, "distill.stage1_epochs": di.stage1_epochs}
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {v}")
    if cfg.teachers.finetune_layers < 0:
        raise ConfigError(f"config key 'teachers.finetune_layers' must be >= 0, got {cfg.teachers.finetune_layers}")
    for key, v in {"posttrain.lr": pt.lr, "posttrain.encoder_lr": pt.encoder_lr, "distill.stage1_lr": di.stage1_lr,
                   "distill.stage1_encoder_lr": di.stage1_encoder_lr, "distill.temperature": di.temperature,
                   "distill.temperature_ft": di.temperature_ft}.items():
        if not v > 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {v}")
    for key, v in {"distill.ce_weight_dp": di.ce_weight_dp, "distill.ce_weight_ft": di.ce_weight_ft,
                   "distill.emb_weight": di.emb_weight, "distill.distill_weight": di.distill_weight,
                   "newsbert.hidden_weight": nb.hidden_weight,
                   "distill.stage1_teachers": di.stage1_teachers, "distill.teachers": di.teachers,
                   "posttrain.holdout": pt.holdout, "posttrain.body_segments": pt.body_segments,
                   "newsbert.teacher_layers": nb.teacher_layers}.items():
        if v < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {v}")
    for key in ("posttrain.title_tokens", "posttrain.body_tokens"):
        if getattr(pt, key.split(".")[1]) < 3:
            raise ConfigError(f"config key '{key}' must be at least 3 (two special tokens and one word)")
    if pt.batch_size <= pt.negatives:
        raise ConfigError(f"posttrain.batch_size={pt.batch_size} must exceed posttrain.negatives={pt.negatives}: "
                          "the negatives are the titles of other news of the batch")
    if pt.holdout == 1:
        raise ConfigError("posttrain.holdout=1: retrieval needs at least 2 held-out news (or 0 for none)")
    if not 0.0 <= nb.momentum < 1.0:
        raise ConfigError(f"config key 'newsbert.momentum' must be in [0, 1), got {nb.momentum}")
    _choice("distill.student_init", di.student_init, ("stage1", "plm"))
    _choice("distill.weighting", di.weighting, ("per_sample", "uniform"))
    if di.weighting == "uniform" and di.learn_omega:
        raise ConfigError("distill.learn_omega learns how sharply the per-sample weights follow each teacher's loss; "
                          "distill.weighting=uniform has no such weights: set one of them only")
    if di.teachers > pt.teachers:
        raise ConfigError(f"distill.teachers={di.teachers} reads the first {di.teachers} teachers, but post-training "
                          f"keeps posttrain.teachers={pt.teachers}")
    if di.stage1_teachers > (di.teachers or pt.teachers):
        raise ConfigError(f"distill.stage1_teachers={di.stage1_teachers} exceeds the {di.teachers or pt.teachers} "
                          "teachers the distillation stages read (distill.teachers, else posttrain.teachers)")
    _choice("posttrain.news", pt.news, ("all", "train"))
    _choice("posttrain.body_field", pt.body_field, ("auto", "body", "abstract"))
    _choice("newsbert.teacher_init", nb.teacher_init, ("auto", "plm", "posttrain", "finetuned"))
    _choice("teachers.init", cfg.teachers.init, ("posttrain", "plm"))
    if di.intermediate_weight < 0:
        raise ConfigError(f"config key 'distill.intermediate_weight' must be >= 0, got {di.intermediate_weight}")
    if di.intermediate_weight and cfg.engine.buslm:
        raise ConfigError("distill.intermediate_weight compares the layers of one token sequence; BusLM's segments "
                          "(engine.buslm=true) have no such teacher layers to imitate: set engine.buslm=false")
    if di.intermediate_weight and pt.body_segments:
        raise ConfigError("distill.intermediate_weight compares the layers of one token sequence; a body read as BusLM "
                          f"segments (posttrain.body_segments={pt.body_segments}) has no such teacher layers to "
                          "imitate: set posttrain.body_segments=0")
    if di.intermediate_weight and not (di.distill_weight or di.emb_weight):
        raise ConfigError("distill.intermediate_weight weighs each teacher per sample by its scores, which the stages "
                          "read only with distill.distill_weight or distill.emb_weight above 0")
    if nb.teachers < 1:
        raise ConfigError(f"config key 'newsbert.teachers' must be at least 1, got {nb.teachers}")
    if nb.teachers > 1 and nb.teacher_init == "plm":
        raise ConfigError(f"newsbert.teachers={nb.teachers} with newsbert.teacher_init=plm would be {nb.teachers} "
                          "copies of one teacher: start them from post-training snapshots (posttrain, NewsBERT-MT) or "
                          "from finetuned teachers (finetuned, MT-BERT)")
    if cfg.teachers.init == "plm" and (cfg.teachers.seeds or cfg.teachers.plain):
        raise ConfigError("teachers.init=plm finetunes M copies of the plain PLM with seeds already; teachers.seeds "
                          "and teachers.plain choose among post-training snapshots: leave them false")
    if cfg.teachers.init == "plm" and cfg.stage == "pipeline":
        raise ConfigError("teachers.init=plm (MT-BERT's teachers, no post-training) belongs to stage=finetune_teachers: "
                          "the pipeline's Stage II distils post-trained teachers")
    if cfg.distill.student_layers <= 0:
        raise ConfigError(f"config key 'distill.student_layers' must be positive, got {cfg.distill.student_layers}")
    _validate_loss_terms(cfg)
    if cfg.stage != "finetune":
        if cfg.model.layers:
            raise ConfigError(f"model.layers is the model of stage=finetune; with stage={cfg.stage} teachers keep every "
                              "layer of model.encoder and the student's layers are distill.student_layers")
        if cfg.train.workflow != "speedyfeed":
            raise ConfigError(f"stage={cfg.stage} trains on the SpeedyFeed engine; train.workflow=typical is the "
                              "baseline of stage=finetune only")
    if cfg.stage in TITLE_BODY_STAGES:
        # the click stages' settings: in stage=pipeline they apply to its click stages, here they would do nothing
        for key in ("buslm", "refine"):
            if getattr(cfg.engine, key):
                raise ConfigError(f"engine.{key} sets how the click stages read a news; stage={cfg.stage} encodes "
                                  "a title and a body each as one sequence of raw text (posttrain.title_tokens, "
                                  "posttrain.body_tokens; posttrain.body_segments reads a long body as BusLM "
                                  "segments). In stage=pipeline it applies to the click stages, which start from what "
                                  "this stage trains")
        for key, value in (("eval.every", cfg.eval.every), ("eval.every_seconds", cfg.eval.every_seconds),
                           ("eval.patience", cfg.eval.patience)):
            if value:
                raise ConfigError(f"{key} evaluates a click stage on dev impressions; stage={cfg.stage} trains on "
                                  "titles and bodies and has none (it measures held-out title retrieval instead). In "
                                  "stage=pipeline it applies to the click stages")
    if cfg.stage in TITLE_BODY_STAGES:  # minutes long; in a pipeline they run again on resume
        for key, value in (("train.resume", cfg.train.resume), ("train.checkpoint_every", cfg.train.checkpoint_every),
                           ("train.lr_schedule", cfg.train.lr_schedule != "constant")):
            if value:
                raise ConfigError(f"{key} applies to the click stages; stage={cfg.stage} keeps no mid-stage checkpoints "
                                  "and a constant learning rate (in stage=pipeline it is trained again on resume)")


def runs_stage1(cfg: Config) -> bool:
    """Whether the run trains Stage I (a pipeline whose Stage II starts from the PLM does not)."""
    return cfg.stage == "distill_posttrain" or (cfg.stage == "pipeline" and cfg.distill.student_init == "stage1")


def runs_stage2(cfg: Config) -> bool:
    """Whether the run trains Stage II (a pipeline with Stage II ablated does not)."""
    return cfg.stage == "distill_finetune" or (cfg.stage == "pipeline" and cfg.pipeline.stage2)


def _validate_loss_terms(cfg: Config) -> None:
    """A stage that runs keeps at least one loss term; an ablation that leaves nothing to ablate is refused."""
    di = cfg.distill
    teachers = {"distill.distill_weight": di.distill_weight, "distill.emb_weight": di.emb_weight}
    for run, own in ((runs_stage1(cfg), "distill.ce_weight_dp"), (runs_stage2(cfg), "distill.ce_weight_ft")):
        weights = {**teachers, own: getattr(di, own.split(".")[1])}
        if run and not any(weights.values()):
            name = "Stage I" if own.endswith("dp") else "Stage II"
            raise ConfigError(f"{name} would train on no loss: {', '.join(f'{k}=0' for k in weights)}; keep at "
                              "least one term above 0")
    if cfg.stage == "pipeline" and not cfg.pipeline.stage2 and di.student_init == "plm":
        raise ConfigError("pipeline.stage2=false with distill.student_init=plm: without Stage I and Stage II the "
                          "student is the plain student, which pipeline.baselines=true trains (student_plain)")


def check_implemented(cfg: Config, implemented: dict[str, bool]) -> None:
    """Reject settings whose feature is not built yet, naming the key.

    ``implemented`` maps a dotted key (or ``stage=<name>``) to whether it is available.
    """
    if cfg.stage not in IMPLEMENTED_STAGES:
        raise ConfigError(f"stage '{cfg.stage}' is not implemented yet (implemented: {', '.join(IMPLEMENTED_STAGES)})")
    flat = flat_config(cfg.to_dict())
    for key, ok in implemented.items():
        if not ok and flat.get(key):
            raise ConfigError(f"config key '{key}' is not implemented yet")


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what config.yaml holds and --print-config shows)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg), encoding="utf-8")


# sections stage=finetune never reads (the distillation stages'): their defaults do not change the main job
NOT_READ_BY_THE_MAIN_JOB = ("posttrain.", "distill.", "teachers.", "newsbert.", "pipeline.")
# keys added after runs were recorded, each with the value that does what those runs did (a recorded config without
# the key ran as this value; the tests of the default behaviour pass unchanged with it): at this value the key is no
# difference to a recorded run, for the benchmarks that reuse runs and for the main job's timing
AS_BEFORE = {"engine.targets": "all", "train.checkpoint_errors": "error",
             "posttrain.body_field": "auto",  # auto reads the body wherever there are bodies, as before
             "distill.distill_weight": 1.0, "pipeline.stage2": True}
AS_BEFORE.update({"newsbert.teachers": 1, "teachers.init": "posttrain"})  # Table 4's methods: one teacher, post-trained
AS_BEFORE.update({"distill.weighting": "per_sample", "distill.teachers": 0})  # every teacher, weighted per sample
AS_BEFORE["posttrain.body_segments"] = 0  # a body read as one sequence of posttrain.body_tokens


def defaults_digest(flat: dict | None = None) -> str:
    """A short hash of the resolved default config as the main job (``speedyrec.train`` with no arguments, before
    the machine resolves train.amp=auto) reads it, or of ``flat`` (a flat config dict, as a timing recorded it):
    a timing of the main job belongs to the defaults that hash the same. Keys of the sections stage=finetune
    never reads are left out, so a new distillation option does not void the main job's timing, and so are keys at
    their AS_BEFORE value (added since, doing what the timed run did)."""
    import hashlib

    flat = flat_config(load_config(None, []).to_dict()) if flat is None else flat
    kept = {k: v for k, v in sorted(flat.items())
            if not k.startswith(NOT_READ_BY_THE_MAIN_JOB) and not (k in AS_BEFORE and v == AS_BEFORE[k])}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]
