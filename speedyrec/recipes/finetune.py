"""Recipe ``stage=finetune``: train the news recommender on clicks, evaluate on dev, write the outputs."""
from __future__ import annotations

import logging
import time

import torch

from speedyrec.build import Context, build_model, segments_of
from speedyrec.engine.distributed import all_reduce_sum
from speedyrec.engine.trainer import Trainer, adamw
from speedyrec.eval.evaluate import evaluate
from speedyrec.models.frozen_prefix import frozen_cache_place
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.recipes.common import Timer, engine_stats, save_config, write_json
from speedyrec.recipes.resume import StageCheckpoints

log = logging.getLogger("speedyrec")


class FinetuneRecipe:
    stage = "finetune"

    def __init__(self, ctx: Context):
        self.ctx, self.cfg, self.dist = ctx, ctx.cfg, ctx.dist

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
        self.model = build_model(cfg, ctx.parts, dist)  # resolves model.freeze_layers=-1
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
        self.ckpt = StageCheckpoints(cfg, dist, self.out_dir, self.workflow)
        self.curve = self.ckpt.curve  # one point per dev evaluation: progress and metrics (kept in checkpoints)
        self.trainer = Trainer(self.model, self.optimizer, dist, grad_accum=tc.grad_accum, grad_clip=tc.grad_clip,
                               amp=tc.amp, max_steps=tc.max_steps, max_seconds=tc.max_seconds,
                               warmup_steps=tc.warmup_steps, log_every=tc.log_every,
                               after_step=getattr(self.workflow, "after_step", None),
                               periodic=self._periodic_eval if cfg.eval.every or cfg.eval.every_seconds else None,
                               periodic_every=cfg.eval.every, periodic_seconds=cfg.eval.every_seconds,
                               log_dir=self.out_dir, progress_total=self.workflow.clicks_in_data * tc.epochs,
                               progress_unit="click", lr_schedule=tc.lr_schedule, heap_trim_every=tc.heap_trim_every,
                               overlap_gradient_reduce=not cfg.engine.global_dedup, **self.ckpt.trainer_kwargs())
        if hasattr(self.workflow, "encoder"):  # the served cache rows' ages are read from the optimizer's clock
            self.workflow.encoder.clock = self.trainer.optimizer_clock
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
        cfg = self.cfg
        if len(self.data.dev) == 0:
            log.warning("no dev impressions: skipping evaluation")
            return {}
        return evaluate(self.model, self.inputs, self.data.dev, self.dist, max_history=cfg.data.max_history,
                        batch_size=cfg.eval.batch_size, max_impressions=cfg.eval.max_impressions, amp=cfg.train.amp)

    def _periodic_eval(self, step: int) -> float:
        t0 = time.perf_counter()
        m = self._curve_point()
        if self.dist.is_main and m:
            log.info("step %d  dev AUC %.4f  MRR %.4f  nDCG@5 %.4f  nDCG@10 %.4f", step, m["auc"], m["mrr"], m["ndcg5"], m["ndcg10"])
        patience = self.cfg.eval.patience
        if patience and len(self.curve) > patience:
            best = max(range(len(self.curve)), key=lambda i: self.curve[i]["auc"])
            if best < len(self.curve) - patience:  # identical on every rank: metrics are all-reduced
                if self.dist.is_main:
                    log.info("dev AUC has not improved for %d evaluations (best %.4f at step %d): stopping",
                             patience, self.curve[best]["auc"], self.curve[best]["step"])
                self.trainer.stop()
        return time.perf_counter() - t0

    def _curve_point(self) -> dict:
        """Evaluate now and record where training stands: step, training seconds, targets trained (all ranks)."""
        seconds = self.trainer.train_seconds()  # read before evaluating: evaluation is not training
        m = self.evaluate()
        if not m:
            return m
        st = self.trainer.state
        clicks = torch.tensor([st.counters.get("clicks_trained", 0.0)], dtype=torch.float64, device=self.dist.device)
        self.curve.append({"step": st.step, "epoch": st.epoch, "train_seconds": seconds,
                           "clicks_trained": float(all_reduce_sum(clicks).item()), **m})
        self.trainer.log_scalars("dev", m)
        return m

    def final_metrics(self) -> dict:
        """The final dev evaluation (reused when the last periodic one was at the final step)."""
        last = self.curve[-1] if self.curve else None
        if last is None or last["step"] != self.trainer.state.step:
            self._curve_point()
        if not self.curve:
            return {}
        progress = ("step", "epoch", "train_seconds", "clicks_trained")
        return {k: v for k, v in self.curve[-1].items() if k not in progress}

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
            write_json(self.out_dir / "dev_curve.json", {"points": self.curve})
