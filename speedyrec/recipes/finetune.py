"""Recipe ``stage=finetune``: train the news recommender on clicks, evaluate on dev, write the outputs."""
from __future__ import annotations

import time
from pathlib import Path

from speedyrec.build import Context, build_model, segments_of
from speedyrec.distill.teachers import build_student
from speedyrec.engine.trainer import adamw
from speedyrec.models.frozen_prefix import frozen_cache_place
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.recipes.common import (DevCurve, Timer, engine_stats, engine_trainer, evaluate_on_dev, save_config,
                                      write_json)
from speedyrec.recipes.resume import StageCheckpoints


class FinetuneRecipe:
    stage = "finetune"

    def __init__(self, ctx: Context, student_from: Path | None = None):
        """``student_from``: a Stage I student's file the model starts from, built as Stage II builds its student
        (the pipeline's student without Stage II, ``pipeline.stage2=false``); None: the configured encoder."""
        self.ctx, self.cfg, self.dist = ctx, ctx.cfg, ctx.dist
        self.student_from = student_from

    def run(self) -> dict:
        timer = Timer()
        self.setup()
        self.train()
        metrics = self.final_metrics()
        stats = self.stats()
        self.write_outputs(metrics, stats)
        self.cleanup()
        return {"seconds": timer(), "metrics": metrics, "stats": stats}

    def setup(self) -> None:
        ctx, cfg, dist = self.ctx, self.cfg, self.dist
        t0 = time.perf_counter()
        self.out_dir = ctx.root
        self.data, self.store = ctx.data, ctx.store
        identity = None
        if self.student_from is None:
            self.model = build_model(cfg, ctx.parts, dist)  # resolves model.freeze_layers=-1
        else:  # a checkpoint continues only a run from the same Stage I student
            model, _, start = build_student(ctx, cfg.model.freeze_layers, self.student_from)
            self.model, identity = model.to(dist.device), {"student_from": start}
        if cfg.train.compile:  # in place: parameter names, checkpoints and evaluation are unchanged
            self.model.news_encoder.compile(dynamic=True)
            self.model.user_encoder.compile(dynamic=True)
        save_config(ctx)
        self.inputs = NewsInputs(self.store, segments_of(cfg))
        if cfg.model.freeze_layers > 0 and cfg.train.workflow == "speedyfeed" and cfg.engine.frozen_cache:
            self.inputs.enable_frozen_prefix(self.model.news_encoder.backbone.hidden_size,
                                             frozen_cache_place(cfg, dist, self.out_dir), "finetune")
        tc = cfg.train
        self.optimizer = adamw(self.model.param_groups(tc.lr, tc.encoder_lr, tc.weight_decay))
        self.workflow = self._make_workflow()
        self.ckpt = StageCheckpoints(cfg, dist, self.out_dir, self.workflow, identity)
        # one point per dev evaluation: progress and metrics (kept in checkpoints)
        self.dev = DevCurve(ctx, self.evaluate).keep_in(self.ckpt)
        self.trainer = engine_trainer(ctx, self.model, self.optimizer, self.workflow, self.out_dir,
                                      **self.ckpt.trainer_kwargs(), **self.dev.trainer_kwargs())
        self.dev.attach(self.trainer)
        self.ckpt.resume(self.trainer)
        self.setup_seconds = time.perf_counter() - t0

    def _make_workflow(self):
        cfg, dist = self.cfg, self.dist
        if cfg.train.workflow == "typical":
            from speedyrec.workflows.typical import TypicalWorkflow

            return TypicalWorkflow(self.data.train, self.store, self.model, max_history=cfg.data.max_history,
                                   negatives=cfg.train.negatives, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                   rank=dist.rank, world=dist.world, device=dist.device,
                                   targets=cfg.train.typical_targets)
        from speedyrec.workflows.speedyfeed import SpeedyFeedWorkflow

        return SpeedyFeedWorkflow(cfg, self.data, self.inputs, self.model, dist)

    def evaluate(self) -> dict:
        return evaluate_on_dev(self.ctx, [self.model], self.inputs)[0]

    def final_metrics(self) -> dict:
        """The final dev evaluation (reused when the last periodic one was at the final step)."""
        return self.dev.final()

    def train(self) -> None:
        wf = self.workflow
        self.trainer.fit(self.cfg.train.epochs, wf.batches, wf.step)
        self.ckpt.save(self.trainer)

    def cleanup(self) -> None:
        self.inputs.close_frozen_prefix()

    def stats(self) -> dict:
        """Counters summed over ranks, plus the data's fault counters (read identically by every rank)."""
        return engine_stats(self.cfg, self.dist, self.trainer, self.workflow, self.data, self.setup_seconds)

    def write_outputs(self, metrics: dict, stats: dict) -> None:
        if self.dist.is_main:
            write_json(self.out_dir / "metrics.json", metrics)
            write_json(self.out_dir / "stats.json", stats)
            self.dev.write(self.out_dir / "dev_curve.json")
