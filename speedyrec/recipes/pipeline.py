"""Recipe ``stage=pipeline``: Tiny-NewsRec end to end in one command.

posttrain -> distill_posttrain (Stage I) -> finetune_teachers -> distill_finetune (Stage II), each writing
``out_dir/<stage>/``, then a table of every teacher and the student (AUC, MRR, nDCG@5, nDCG@10) with the
wall time of each step: ``out_dir/metrics.json`` (per model) and ``out_dir/pipeline.md``. With
``pipeline.baselines=true`` it also trains what the paper compares against: the plain finetuned teacher,
the same student finetuned without teachers, and NewsBERT's student.
"""
from __future__ import annotations

import copy
import json
import logging

from speedyrec.config import ConfigError
from speedyrec.engine.distributed import barrier
from speedyrec.recipes.common import Context, Timer, plm_layers, save_config, student_freeze_layers, write_json
from speedyrec.recipes.distill_finetune import DistillFinetuneRecipe
from speedyrec.recipes.distill_posttrain import DistillPosttrainRecipe
from speedyrec.recipes.finetune import FinetuneRecipe
from speedyrec.recipes.finetune_teachers import FinetuneTeachersRecipe
from speedyrec.recipes.newsbert import NewsBertRecipe
from speedyrec.recipes.posttrain import PosttrainRecipe
from speedyrec.recipes.resume import check_same_config, resume_request

log = logging.getLogger("speedyrec")

METRICS = ("auc", "mrr", "ndcg5", "ndcg10")


def plain_student_context(ctx: Context) -> Context:
    """The student's shape trained by stage=finetune alone (no teachers), written to out_dir/student_plain."""
    cfg = copy.deepcopy(ctx.cfg)
    cfg.stage = "finetune"
    cfg.model.layers = cfg.distill.student_layers
    cfg.model.freeze_layers = student_freeze_layers(ctx.cfg)
    root = ctx.stage_dir("student_plain")
    cfg.out_dir = str(root)
    return Context(cfg, ctx.dist, root, ctx.data, ctx.parts, ctx.store)


class PipelineRecipe:
    stage = "pipeline"

    def __init__(self, ctx: Context):
        self.ctx, self.cfg, self.dist = ctx, ctx.cfg, ctx.dist

    def run(self) -> dict:
        ctx, cfg = self.ctx, self.cfg
        timer = Timer()
        save_config(ctx)
        baselines = cfg.pipeline.baselines
        if baselines:
            cfg.teachers.plain = True
        steps = [("posttrain", PosttrainRecipe), ("distill_posttrain", DistillPosttrainRecipe),
                 ("finetune_teachers", FinetuneTeachersRecipe), ("distill_finetune", DistillFinetuneRecipe)]
        if baselines:
            steps += [("student_plain", lambda c: FinetuneRecipe(plain_student_context(c))), ("newsbert", NewsBertRecipe)]
        request = resume_request(cfg)
        if request not in ("", "auto"):
            raise ConfigError(f"stage=pipeline resumes with train.resume=auto (each step from its own newest "
                              f"checkpoint), not from one checkpoint ({request})")
        results = {}
        for name, recipe in steps:
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
        for name, m in results["finetune_teachers"]["metrics"].items():
            kind = "plain finetuned teacher (PLM-NR FT)" if name == "plain" else "post-trained teacher (PLM-NR DP)"
            rows.append((name, kind, teacher_layers, m))
        rows.append(("student", "Tiny-NewsRec student", n, results["distill_finetune"]["metrics"]["student"]))
        if baselines:
            rows.append(("student_plain", "student without teachers (PLM-NR FT)", n, results["student_plain"]["metrics"]))
            rows.append(("newsbert_student", "NewsBERT student", n, results["newsbert"]["metrics"]["student"]))
        models = {name: {"kind": kind, "layers": layers, **{k: m.get(k) for k in METRICS}} for name, kind, layers, m in rows}
        seconds = {name: r["seconds"] for name, r in results.items()}
        summary = {"models": models, "seconds": seconds, "total_seconds": timer(),
                   "posttrain": results["posttrain"]["metrics"]["snapshots"],
                   "stage1": results["distill_posttrain"]["metrics"]}
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
    return "\n".join(lines) + "\n"
