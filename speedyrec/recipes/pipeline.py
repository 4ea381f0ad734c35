"""Recipe ``stage=pipeline``: Tiny-NewsRec end to end in one command.

posttrain -> distill_posttrain (Stage I) -> finetune_teachers -> distill_finetune (Stage II), each writing
``out_dir/<stage>/``, then a table of every teacher and the student (AUC, MRR, nDCG@5, nDCG@10) with the
wall time of each step: ``out_dir/metrics.json`` (per model) and ``out_dir/pipeline.md``. With
``pipeline.baselines=true`` it also trains what the paper compares against: the plain finetuned teacher,
the same student finetuned without teachers, and NewsBERT's student. ``pipeline.teachers_from=DIR`` links
another pipeline's post-training and finetuned teachers instead of training them again (the M teachers are
most of the cost), so students of other sizes learn from the same teachers. The paper's ablations of each stage
(Figure 3): ``distill.student_init=plm`` skips Stage I (Stage II starts from the PLM's first layers);
``pipeline.stage2=false`` finetunes Stage I's student on clicks without teachers instead of Stage II (as the plain
student is trained, ``out_dir/student_stage1``).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from speedyrec.build import Context, plm_layers
from speedyrec.config import AS_BEFORE, ConfigError
from speedyrec.engine.distributed import barrier
from speedyrec.recipes.common import Timer, save_config, student_freeze_layers, write_json
from speedyrec.recipes.distill_finetune import DistillFinetuneRecipe, stage1_student
from speedyrec.recipes.distill_posttrain import DistillPosttrainRecipe
from speedyrec.recipes.finetune import FinetuneRecipe
from speedyrec.recipes.finetune_teachers import FinetuneTeachersRecipe
from speedyrec.recipes.newsbert import NewsBertRecipe
from speedyrec.recipes.posttrain import PosttrainRecipe
from speedyrec.recipes.resume import check_same_config, differing_settings, resume_request

log = logging.getLogger("speedyrec")

METRICS = ("auc", "mrr", "ndcg5", "ndcg10")
TEACHER_STEPS = ("posttrain", "finetune_teachers")
# what the teachers were trained with must equal this run's (but teachers.plain may have been on there: a plain
# teacher this run does not need is left unused); where outputs go, checkpoints, logging and heap trimming may
# differ, and the engine settings that change the cost, not the result (the frozen-layer caches, the cache audit
# and global dedup are tested to train the same; prefetch and chunking change no value); a run made before one of
# these keys existed saved no value for it
TEACHER_KEYS = ("data.", "model.", "posttrain.", "teachers.", "train.", "engine.")
FREE_KEYS = ("data.cache_dir", "train.resume", "train.checkpoint_every", "train.keep_checkpoints",
             "train.checkpoint_errors", "train.log_every",
             "train.heap_trim_every", "engine.frozen_cache", "engine.cache_audit", "engine.global_dedup",
             "engine.prefetch", "engine.chunk_tokens")


# the evaluation settings that decide where eval.patience stops the teachers' training
EARLY_STOPPING_KEYS = ("eval.patience", "eval.every", "eval.every_seconds", "eval.max_impressions")


def teachers_depend_on(key: str, then, now, early_stopping: bool = False) -> bool:
    """Whether a setting that differs from the teachers' run matters to them (an extra plain teacher does not; the
    periodic evaluation's settings only where either run stops early, ``early_stopping``)."""
    if key in EARLY_STOPPING_KEYS:
        return early_stopping
    if then is None and AS_BEFORE.get(key, object()) == now:  # added since, at the value that does what runs did
        return False
    return key.startswith(TEACHER_KEYS) and not key.startswith(FREE_KEYS) and not (key == "teachers.plain" and then)


def link_teachers(ctx: Context) -> dict:
    """``pipeline.teachers_from``: the finished post-training and teacher-finetuning steps of another pipeline,
    linked as this run's own (``out_dir/<step>`` -> ``DIR/<step>``); returns their results by step."""
    src = Path(ctx.cfg.pipeline.teachers_from).resolve()
    results = {}
    for step in TEACHER_STEPS:
        done = src / step / "done.json"
        if not done.exists():
            raise ConfigError(f"pipeline.teachers_from={src}: its {step} step has not finished (no {done})")
        saved = json.loads(done.read_text())
        early = bool(saved["config"].get("eval", {}).get("patience") or ctx.cfg.eval.patience)
        shown = differing_settings(saved["config"], ctx.cfg.to_dict(),
                                   lambda key, then, now: teachers_depend_on(key, then, now, early), "there", "here")
        if shown:
            raise ConfigError(f"pipeline.teachers_from={src}: its teachers were trained with other settings ({shown})")
        link = ctx.root / step
        if link.is_symlink() and link.resolve() == (src / step).resolve():
            pass  # linked by an earlier, interrupted run
        elif link.exists() or link.is_symlink():
            raise ConfigError(f"pipeline.teachers_from: {link} already exists; give this run another out_dir")
        elif ctx.dist.is_main:
            link.symlink_to(src / step, target_is_directory=True)
        results[step] = saved["result"]
    barrier()
    return results


def plain_student_context(ctx: Context, name: str = "student_plain") -> Context:
    """The student's shape trained by stage=finetune alone (no teachers), written to out_dir/<name>."""
    cfg = copy.deepcopy(ctx.cfg)
    cfg.stage = "finetune"
    cfg.model.layers = cfg.distill.student_layers
    cfg.model.freeze_layers = student_freeze_layers(ctx.cfg)
    root = ctx.stage_dir(name)
    cfg.out_dir = str(root)
    return Context(cfg, ctx.dist, root, ctx.data, ctx.parts, ctx.store)


class PipelineRecipe:
    stage = "pipeline"

    def __init__(self, ctx: Context):
        self.ctx, self.cfg, self.dist = ctx, ctx.cfg, ctx.dist

    def run(self) -> dict:
        ctx, cfg = self.ctx, self.cfg
        timer = Timer()
        baselines = cfg.pipeline.baselines
        if baselines:
            cfg.teachers.plain = True
        save_config(ctx)  # the config that runs (with the plain teacher the baselines need)
        # distill.student_init=plm: Stage II starts from the PLM, no Stage I to train; pipeline.stage2=false: Stage
        # I's student finetuned without teachers instead of Stage II, and the teachers finetuned only for the table
        stage1, stage2 = cfg.distill.student_init == "stage1", cfg.pipeline.stage2
        steps = [("posttrain", PosttrainRecipe)] + ([("distill_posttrain", DistillPosttrainRecipe)] if stage1 else [])
        if stage2 or baselines:  # the plain teacher is a baseline
            steps.append(("finetune_teachers", FinetuneTeachersRecipe))
        if stage2:
            steps.append(("distill_finetune", DistillFinetuneRecipe))
        else:
            steps.append(("student_stage1", lambda c: FinetuneRecipe(plain_student_context(c, "student_stage1"),
                                                                    student_from=stage1_student(c))))
        if baselines:
            steps.append(("student_plain", lambda c: FinetuneRecipe(plain_student_context(c))))
        if baselines and cfg.pipeline.newsbert:
            t_layers, n = cfg.newsbert.teacher_layers or plm_layers(ctx), cfg.distill.student_layers
            if t_layers % n:  # refused before any step trains, not after an hour of them
                raise ConfigError(f"pipeline.baselines: NewsBERT's teacher ({t_layers} layers) does not split into "
                                  f"blocks for a {n}-layer student (distill.student_layers); set newsbert.teacher_layers "
                                  "to a multiple, or pipeline.newsbert=false")
            if cfg.newsbert.teacher_init != "plm" and t_layers != plm_layers(ctx):  # it would start from a snapshot
                raise ConfigError(f"pipeline.baselines: NewsBERT's teacher starts from the last post-training snapshot "
                                  f"(newsbert.teacher_init={cfg.newsbert.teacher_init}), which holds every layer of the "
                                  "PLM; leave newsbert.teacher_layers at 0, or set newsbert.teacher_init=plm")
            steps.append(("newsbert", NewsBertRecipe))
        request = resume_request(cfg)
        if request not in ("", "auto"):
            raise ConfigError(f"stage=pipeline resumes with train.resume=auto (each step from its own newest "
                              f"checkpoint), not from one checkpoint ({request})")
        results = link_teachers(ctx) if cfg.pipeline.teachers_from else {}
        linked = list(results)
        if results and self.dist.is_main:
            log.info("pipeline: posttrain and finetune_teachers linked from %s", cfg.pipeline.teachers_from)
        for name, recipe in steps:
            if name in results:
                continue
            done = ctx.stage_dir(name) / "done.json"
            if request and done.exists():  # finished before the interruption: its outputs are complete
                saved = json.loads(done.read_text())
                check_same_config(done, saved["config"], cfg.to_dict())
                results[name] = saved["result"]
                if self.dist.is_main:
                    log.info("pipeline: %s finished before (%s), not run again", name, done)
                continue
            if self.dist.is_main:
                log.info("pipeline: %s", name)
            results[name] = recipe(ctx).run()
            if self.dist.is_main:  # written last: a step interrupted before this line runs again on resume
                write_json(done, {"config": cfg.to_dict(), "result": results[name]})
            barrier()
        teacher_layers, n = plm_layers(ctx), cfg.distill.student_layers
        rows = []
        kinds = {"plain": "plain finetuned teacher (PLM-NR FT)", "ensemble": "mean score of the post-trained teachers"}
        for name, m in results.get("finetune_teachers", {}).get("metrics", {}).items():
            rows.append((name, kinds.get(name, "post-trained teacher (PLM-NR DP)"), teacher_layers, m))
        if stage2:
            what = "Tiny-NewsRec student" + ("" if stage1 else " without Stage I (from the PLM)")
            rows.append(("student", what, n, results["distill_finetune"]["metrics"]["student"]))
        else:
            rows.append(("student_stage1", "Stage I student finetuned without teachers (no Stage II)", n,
                         results["student_stage1"]["metrics"]))
        if baselines:
            rows.append(("student_plain", "student without teachers (PLM-NR FT)", n, results["student_plain"]["metrics"]))
            if "newsbert" in results:
                rows.append(("newsbert_student", "NewsBERT student", n, results["newsbert"]["metrics"]["student"]))
        models = {name: {"kind": kind, "layers": layers, **{k: m.get(k) for k in METRICS}} for name, kind, layers, m in rows}
        # wall time of the steps this run trained (a linked step's time was spent by the run it came from)
        seconds = {name: r["seconds"] for name, r in results.items() if name not in linked}
        summary = {"models": models, "seconds": seconds, "total_seconds": timer(),
                   "teachers_from": cfg.pipeline.teachers_from, "linked": linked,
                   "posttrain": results["posttrain"]["metrics"]["snapshots"],
                   "stage1": results["distill_posttrain"]["metrics"] if stage1 else None}
        if self.dist.is_main:
            write_json(ctx.root / "metrics.json", summary)
            (ctx.root / "pipeline.md").write_text(pipeline_table(summary))
            print(pipeline_table(summary), flush=True)
        return {"seconds": timer(), "metrics": summary, "stats": {}}


def pipeline_table(summary: dict) -> str:
    lines = ["| model | what | layers | AUC | MRR | nDCG@5 | nDCG@10 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in summary["models"].items():
        vals = " | ".join("n/a" if m[k] is None else f"{m[k]:.4f}" for k in METRICS)
        lines.append(f"| {name} | {m['kind']} | {m['layers']} | {vals} |")
    lines += ["", "| step | wall s |", "| --- | --- |"]
    lines += [f"| {name} | {s:.0f} |" for name, s in summary["seconds"].items()]
    lines.append(f"| total | {summary['total_seconds']:.0f} |")
    if summary.get("linked"):
        lines.append(f"\n{', '.join(summary['linked'])}: linked from {summary['teachers_from']} (not trained here)")
    return "\n".join(lines) + "\n"
