"""What the recipes share: the engine counters of stats.json, the trainer of the click stages, evaluation on dev and
output files. The run context and the model builders are components (speedyrec.build)."""
from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from speedyrec.build import Context
from speedyrec.config import Config, dump_config
from speedyrec.data.dataset import Dataset
from speedyrec.distill.title_body import TitleBodyBatches, build_title_body_data
from speedyrec.engine.distributed import DistInfo, all_reduce_sum
from speedyrec.engine.memory import peak_rss_mb, process_peak_rss_mb
from speedyrec.engine.trainer import Trainer
from speedyrec.eval.evaluate import evaluate_models
from speedyrec.models.frozen_prefix import cache_bytes, frozen_cache_place
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.recipes.resume import StageCheckpoints, starts_over

log = logging.getLogger("speedyrec")

ENGINE_COUNTERS = ("clicks_trained", "news_encoded", "cache_lookups", "cache_hits", "served_age_sum",
                   "served_stamp_age_sum", "valid_tokens",
                   "padded_tokens", "sequences_trained", "negatives_random", "negatives_scored", "deferred_grad_rows",
                   "audit_rows", "audit_cos_sum", "audit_noise_cos_sum", "heap_trims", "heap_trim_seconds",
                   "collective_bytes")
EXTREME_COUNTERS = (("served_age_max", "max"), ("audit_cos_min", "min"))  # reduced over ranks by max / min


class StageRecipe:
    """A recipe of one stage: it reads the run context and writes out_dir/<stage>/; ``run()`` returns
    {"seconds", "metrics", "stats"} (``finish``). The click stages share their loop (``fit_on_clicks``) and their
    statistics (``click_stats``); each recipe keeps only its model, its encoding and its objective."""

    stage = ""

    def __init__(self, ctx: Context):
        self.ctx, self.cfg, self.dist = ctx, ctx.cfg, ctx.dist
        self.out = ctx.stage_dir(self.stage)
        self.timer = Timer()
        self.setup_seconds = 0.0

    def fit_on_clicks(self, model: torch.nn.Module, optimizer, workflow, dev: "DevCurve",
                      identity: dict | None = None, **trainer_kw) -> Trainer:
        """Train ``model`` on clicks with the engine: checkpoints that continue only a run of the same ``identity``
        (what the stage learns from, by checksum), resumed where one is found, with ``dev``'s periodic evaluations
        (eval.every / eval.every_seconds, eval.patience; its curve is kept in the checkpoints), train.epochs of the
        workflow's batches, the final checkpoint. ``trainer_kw``: the stage's own trainer options (a gradient hook,
        clip groups). Everything before this call is the stage's setup time."""
        ckpt = StageCheckpoints(self.cfg, self.dist, self.out, workflow, identity)
        self.dev = dev.keep_in(ckpt)
        trainer = engine_trainer(self.ctx, model, optimizer, workflow, self.out, **trainer_kw, **ckpt.trainer_kwargs(),
                                 **dev.trainer_kwargs())
        dev.attach(trainer)
        ckpt.resume(trainer)
        self.setup_seconds = self.timer()
        trainer.fit(self.cfg.train.epochs, workflow.batches, workflow.step)
        ckpt.save_final(trainer)
        return trainer

    def click_stats(self, trainer: Trainer, workflow, losses, **extra) -> dict:
        """stats.json of a click stage: the engine's counters (engine_stats), each of ``losses`` (counter names) as
        its mean per click trained over all ranks, and ``extra``."""
        stats = engine_stats(self.cfg, self.dist, trainer, workflow, self.ctx.data, self.setup_seconds)
        stats.update(loss_means(trainer, self.dist, losses, stats["clicks_trained"]))
        stats.update(extra)
        return stats

    def finish(self, metrics: dict, stats: dict) -> dict:
        """Write metrics.json, stats.json and a click stage's dev_curve.json (rank 0); return the stage's result.
        stats.json gets ``stage_seconds``: the stage's wall time from its start to its files, the time a pipeline
        lists for this step (a stage run alone is timed as it would be inside the pipeline)."""
        seconds = self.timer()
        stats = {**stats, "stage_seconds": seconds}
        if self.dist.is_main:
            write_json(self.out / "metrics.json", metrics)
            write_json(self.out / "stats.json", stats)
            if getattr(self, "dev", None) is not None:
                self.dev.write(self.out / "dev_curve.json")
        return {"seconds": seconds, "metrics": metrics, "stats": stats}


PROGRESS = ("step", "epoch", "train_seconds", "clicks_trained")  # what a curve point holds besides the metrics


class DevCurve:
    """A click stage's dev evaluations: periodic ones during training (eval.every optimizer steps and/or
    eval.every_seconds of training) that stop it after eval.patience evaluations without a new best, and the final
    one. Each is a point of the curve: where training stood (PROGRESS) and the metrics; the curve is kept in the
    stage's checkpoints (``keep_in``), so a resumed run continues it and its patience.

    ``evaluate() -> dict``: the stage's dev metrics now: one model's {"auc", ...}, or {model name: {"auc", ...}}
    for a stage that trains several (``monitor`` then says which AUC patience watches, ``label`` names it)."""

    def __init__(self, ctx: Context, evaluate, monitor=None, label: str = "dev AUC"):
        self.ctx, self.cfg, self.dist = ctx, ctx.cfg, ctx.dist
        self.evaluate = evaluate
        self.monitor = monitor or (lambda m: m["auc"])
        self.label = label
        self.points: list[dict] = []
        self.trainer: Trainer | None = None

    def keep_in(self, ckpt: StageCheckpoints) -> "DevCurve":
        self.points = ckpt.curve  # the same list: saved with every checkpoint, restored in place on resume
        return self

    def trainer_kwargs(self) -> dict:
        e = self.cfg.eval
        if not (e.every or e.every_seconds):
            return {}
        return {"periodic": self.periodic, "periodic_every": e.every, "periodic_seconds": e.every_seconds}

    def attach(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def periodic(self, step: int) -> float:
        """The trainer's periodic work: evaluate, and stop training when patience ran out; returns its seconds."""
        t0 = time.perf_counter()
        m = self.point()
        if self.dist.is_main and m:
            log.info("step %d  %s", step, describe_metrics(m))
        patience = self.cfg.eval.patience
        if patience and len(self.points) > patience:
            watched = [self.monitor(p) for p in self.points]
            best = max(range(len(watched)), key=watched.__getitem__)
            if best < len(watched) - patience:  # identical on every rank: metrics are all-reduced
                if self.dist.is_main:
                    log.info("%s has not improved for %d evaluations (best %.4f at step %d): stopping",
                             self.label, patience, watched[best], self.points[best]["step"])
                self.trainer.stop()
        return time.perf_counter() - t0

    def point(self, evaluate=None) -> dict:
        """Evaluate now (``evaluate``, default the stage's) and record where training stands: step, training
        seconds, targets trained (all ranks). Returns the metrics ({} or empty models without dev impressions,
        then nothing is recorded)."""
        seconds = self.trainer.train_seconds()  # read before evaluating: evaluation is not training
        m = (evaluate or self.evaluate)()
        if len(self.ctx.data.dev) == 0:
            return m
        st = self.trainer.state
        clicks = torch.tensor([st.counters.get("clicks_trained", 0.0)], dtype=torch.float64, device=self.dist.device)
        self.points.append({"step": st.step, "epoch": st.epoch, "train_seconds": seconds,
                            "clicks_trained": float(all_reduce_sum(clicks).item()), **m})
        if "auc" in m:
            self.trainer.log_scalars("dev", m)
        else:
            for name, sub in m.items():
                self.trainer.log_scalars(f"dev_{name}", sub)
        return m

    def final(self, evaluate=None) -> dict:
        """The final dev metrics: the last periodic evaluation's when it was at the final step, else evaluated
        now (``evaluate``: the stage's final way, e.g. through the teacher bank; default the periodic one)."""
        last = self.points[-1] if self.points else None
        if last is None or last["step"] != self.trainer.state.step:
            m = self.point(evaluate)
            if not self.points:
                return m
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self.points[-1].items() if k not in PROGRESS}

    def write(self, path: Path) -> None:
        write_json(path, {"points": self.points})


def describe_metrics(m: dict) -> str:
    """One model's dev metrics, or every model's AUC, for the log."""
    if "auc" in m:
        return f"dev AUC {m['auc']:.4f}  MRR {m['mrr']:.4f}  nDCG@5 {m['ndcg5']:.4f}  nDCG@10 {m['ndcg10']:.4f}"
    return "dev AUC  " + "  ".join(f"{name} {sub['auc']:.4f}" for name, sub in m.items() if sub)


class TitleBodyStage(StageRecipe):
    """What post-training and Stage I share: the title-body data (``prepare_title_body``), the frozen layers' output
    cached per field, one loop over shuffled batches of bodies (``fit_on_title_body``) and its statistics. A stage
    supplies ``step(batch) -> StepOutput``."""

    def prepare_title_body(self):
        """The stage's data and batches; a stage that finished before is started over (it keeps no checkpoints)."""
        cfg, dist, pt = self.cfg, self.dist, self.cfg.posttrain
        starts_over(self.stage, cfg, dist)
        self.data = build_title_body_data(self.ctx)
        self.batches = TitleBodyBatches(self.data.train_news, self.data, pt.batch_size, pt.negatives, cfg.train.seed,
                                        dist, pin=dist.device.type == "cuda")
        return self.data

    def cache_frozen_fields(self, encoder: torch.nn.Module) -> None:
        """The output of the encoder's frozen layers, computed once per news and field (engine.frozen_cache); a body
        in BusLM segments (posttrain.body_segments) keeps the states of its segments' real tokens, with the bus."""
        bb = encoder.backbone
        if bb.freeze_layers and self.cfg.engine.frozen_cache:
            place = frozen_cache_place(self.cfg, self.dist, self.out)
            for name, inputs in (("title", self.data.titles), ("body", self.data.bodies)):
                inputs.enable_frozen_prefix(bb.hidden_size, place, f"{self.stage}_{name}")

    def fit_on_title_body(self, model: torch.nn.Module, optimizer, epochs: int, bodies: int, **trainer_kw) -> Trainer:
        """Train ``epochs`` passes (``bodies`` in all, for the progress bar) with the train.* settings;
        ``trainer_kw``: the stage's own (its step limit, its periodic work). Closes the frozen-layer caches."""
        tc = self.cfg.train
        trainer = Trainer(model, optimizer, self.dist, grad_clip=tc.grad_clip, amp=tc.amp, warmup_steps=tc.warmup_steps,
                          log_every=tc.log_every, log_dir=self.out, progress_total=bodies, progress_unit="body",
                          heap_trim_every=tc.heap_trim_every, **trainer_kw)
        self.setup_seconds = self.timer()
        trainer.fit(epochs, self.batches.epoch, self.step)
        for inputs in (self.data.titles, self.data.bodies):
            inputs.close_frozen_prefix()
        return trainer

    def title_body_stats(self, trainer: Trainer, **extra) -> dict:
        return {**loop_stats(trainer, self.setup_seconds, per="news_trained"), **extra}


def loss_means(trainer: Trainer, dist: DistInfo, names, per: float) -> dict:
    """The counters ``names`` summed over ranks, each divided by ``per`` (the samples trained on all ranks). The
    names are the recipe's, not read from the counters: a rank whose every step was empty (uneven shards) holds
    none, and every rank must reduce the same vector."""
    counters = trainer.read_counters()
    vec = torch.tensor([float(counters.get(k, 0.0)) for k in names], dtype=torch.float64, device=dist.device)
    all_reduce_sum(vec)
    n = max(per, 1.0)
    return {k: v / n for k, v in zip(names, vec.tolist())}


def save_config(ctx: Context) -> None:
    if ctx.dist.is_main:
        dump_config(ctx.cfg, ctx.root / "config.yaml")


def student_freeze_layers(cfg: Config) -> int:
    """Students train every layer unless model.freeze_layers says otherwise."""
    return max(cfg.model.freeze_layers, 0)


def trainable_names(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def non_backbone_names(module: torch.nn.Module) -> set[str]:
    """State-dict names outside any PLM backbone (pooling, projection, user encoder): never in the base PLM."""
    return {n for n in module.state_dict() if ".backbone." not in f".{n}" and not n.startswith("backbone.")}


# -- outputs ---------------------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    """JSON with NaN written as null (NaN is not JSON), replaced atomically."""
    def clean(v):
        if isinstance(v, float) and v != v:
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        return v

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # whole or not at all: a resumed pipeline trusts what it finds
    tmp.write_text(json.dumps(clean(obj), indent=2) + "\n")
    tmp.replace(path)


def engine_stats(cfg: Config, dist: DistInfo, trainer, workflow, data: Dataset, setup_seconds: float) -> dict:
    """stats.json of a run trained on clicks: counters summed over ranks, the data's fault counters, and the
    split of clicks_in_data (trained + unknown news + not reached)."""
    st = trainer.state
    local = {k: float(st.counters.get(k, 0.0)) for k in ENGINE_COUNTERS}
    local["sequences_dropped"] = float(getattr(workflow, "sequences_dropped", 0))
    frozen = getattr(getattr(workflow, "inputs", None), "frozen", None)
    if frozen is not None:  # the frozen-prefix cache (on or off alike on every rank): the node's ranks share one
        local.update(frozen_news_computed=float(frozen.computed), frozen_news_served=float(frozen.hits),
                     frozen_news_pending=float(frozen.pending))
    vec = torch.tensor(list(local.values()), dtype=torch.float64, device=dist.device)
    all_reduce_sum(vec)
    # the slowest rank's loop time, and the largest of any rank: resident memory now, the peak of setup (data
    # preparation included), the peak since the first training step (training and its evaluations), and the
    # process's peak (ru_maxrss, in KiB on Linux, where the system gives no phase peaks); -1 = not known
    setup_peak, train_peak, whole = trainer.setup_peak_rss_mb, peak_rss_mb(), process_peak_rss_mb()
    peaks = torch.tensor([st.wall_seconds, psutil.Process().memory_info().rss / 2**20,
                          -1.0 if setup_peak is None else setup_peak, -1.0 if train_peak is None else train_peak,
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if whole is None else whole],
                         dtype=torch.float64, device=dist.device)
    if dist.active:
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    stats = {k: (v if k.endswith(("_sum", "_seconds")) else int(v)) for k, v in zip(local, vec.tolist())}
    stats.update(cache_evidence(st.counters, stats, dist))
    epochs_run = cfg.train.epochs
    stats["clicks_in_data"] = int(workflow.clicks_in_data)
    stats["sequences_in_data"] = int(getattr(workflow, "sequences_in_data", 0))
    stats.update(data.faults.as_dict())
    # clicks on unknown news cannot be trained: they are counted once per epoch, like the clicks trained
    stats["clicks_unknown_news"] = epochs_run * int(data.faults.counts.get("clicks_unknown_news", 0))
    expected = epochs_run * stats["clicks_in_data"] - stats["clicks_unknown_news"]
    assert stats["clicks_trained"] <= expected, "trained more clicks than the data holds"
    stats["clicks_not_reached"] = expected - stats["clicks_trained"]  # a run stopped by max_steps/max_seconds
    stats["epochs"] = epochs_run
    stats["steps"] = st.step
    # bytes one rank moved through collectives per optimizer step (see engine.distributed.COMM_BYTES), mean of ranks
    stats["collective_bytes_per_step"] = stats["collective_bytes"] / dist.world / max(st.step, 1)
    stats["workflow"] = cfg.train.workflow
    stats["world_size"] = dist.world
    stats["device"] = str(dist.device.type)
    stats["precision"] = "bf16" if cfg.train.amp == "bf16" else "float32"
    if frozen is not None:  # one file per node, the same size on every rank
        stats["frozen_cache_bytes_per_node"] = cache_bytes(int(frozen.offsets[-1]), frozen.hidden,
                                                           len(frozen.offsets) - 1, frozen.dtype)
    tokens = stats["valid_tokens"] + stats["padded_tokens"]
    stats["data_efficiency"] = stats["valid_tokens"] / tokens if tokens else 0.0
    stats["wall_seconds"] = float(peaks[0].item())
    stats["clicks_per_second"] = stats["clicks_trained"] / stats["wall_seconds"] if stats["wall_seconds"] > 0 else 0.0
    stats["setup_seconds"] = setup_seconds
    stats["max_rank_rss_mb"] = round(float(peaks[1]), 1)
    stats["setup_peak_rss_mb"] = round(float(peaks[2]), 1) if peaks[2] >= 0 else None
    stats["train_peak_rss_mb"] = round(float(peaks[3]), 1) if peaks[3] >= 0 else None
    stats["peak_rss_mb"] = round(float(peaks[4]), 1)
    # heap_trims, heap_trim_seconds: malloc_trim calls (train.heap_trim_every) and their seconds, summed over ranks
    stats["heap_trim_seconds"] = round(stats["heap_trim_seconds"], 3)
    return stats


def cache_evidence(local: dict, summed: dict, dist: DistInfo) -> dict:
    """What the cache served, from the rows themselves: ages (steps since the row was written; mean and max) and,
    with engine.cache_audit, the drift of served vectors from fresh encodings (cosine; mean, min, and the mean of
    two fresh encodings, the dropout floor). None where nothing was served or audited."""
    ext = torch.tensor([local.get(k, float("-inf") if op == "max" else float("inf")) * (1 if op == "max" else -1)
                        for k, op in EXTREME_COUNTERS], dtype=torch.float64, device=dist.device)
    if dist.active:
        torch.distributed.all_reduce(ext, op=torch.distributed.ReduceOp.MAX)  # min = -max(-x)
    age_max, cos_min = float(ext[0]), -float(ext[1])
    hits, audited = summed["cache_hits"], summed["audit_rows"]
    return {"served_age_mean": summed.pop("served_age_sum") / hits if hits else None,
            "served_age_max": age_max if hits else None,
            "served_stamp_age_mean": summed.pop("served_stamp_age_sum") / hits if hits else None,
            "cache_audit_rows": summed.pop("audit_rows"),
            "cache_drift_cos_mean": summed.pop("audit_cos_sum") / audited if audited else None,
            "cache_drift_cos_min": cos_min if audited else None,
            "cache_noise_cos_mean": summed.pop("audit_noise_cos_sum") / audited if audited else None}


def engine_trainer(ctx: Context, model: torch.nn.Module, optimizer, workflow, log_dir: Path, **kw) -> Trainer:
    """A trainer for the click stages with the train.* settings; the workflow's cache follows its steps; its
    scalars go to ``log_dir`` and its progress bar counts the clicks of all epochs."""
    tc = ctx.cfg.train
    trainer = Trainer(model, optimizer, ctx.dist, grad_accum=tc.grad_accum, grad_clip=tc.grad_clip, amp=tc.amp,
                      max_steps=tc.max_steps, max_seconds=tc.max_seconds, warmup_steps=tc.warmup_steps,
                      log_every=tc.log_every, after_step=getattr(workflow, "after_step", None), log_dir=log_dir,
                      progress_total=workflow.clicks_in_data * tc.epochs, progress_unit="click",
                      lr_schedule=tc.lr_schedule, heap_trim_every=tc.heap_trim_every,
                      overlap_gradient_reduce=not ctx.cfg.engine.global_dedup, **kw)
    if hasattr(workflow, "encoder"):  # the served cache rows' ages are read from the optimizer's clock
        workflow.encoder.clock = trainer.optimizer_clock
    return trainer


def evaluate_on_dev(ctx: Context, models: list, inputs: NewsInputs, encode_fn=None, ensemble=None) -> list[dict]:
    """Dev metrics of each model ([] without dev impressions); see evaluate_models for ``encode_fn`` and
    ``ensemble``."""
    cfg = ctx.cfg
    if len(ctx.data.dev) == 0:
        log.warning("no dev impressions: skipping evaluation")
        return [{} for _ in range(len(models) + bool(ensemble))]
    return evaluate_models(models, inputs, ctx.data.dev, ctx.dist, max_history=cfg.data.max_history,
                           batch_size=cfg.eval.batch_size, max_impressions=cfg.eval.max_impressions, amp=cfg.train.amp,
                           encode_fn=encode_fn, ensemble=ensemble)


def loop_stats(trainer, setup_seconds: float, per: str) -> dict:
    """stats.json of a run outside the click engine: steps, loop time, summed counters, and the mean of every
    ``loss_*`` counter per ``per`` (the counter of training samples)."""
    st = trainer.state
    c = dict(st.counters)
    stats = {"steps": st.step, "wall_seconds": st.wall_seconds, "setup_seconds": setup_seconds}
    n = max(c.get(per, 0.0), 1.0)
    for k, v in c.items():
        stats[k] = v / n if k.startswith("loss_") else v if k.endswith("_seconds") else int(v)
    tokens = c.get("valid_tokens", 0) + c.get("padded_tokens", 0)
    stats["data_efficiency"] = c.get("valid_tokens", 0) / tokens if tokens else 0.0
    return stats


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
