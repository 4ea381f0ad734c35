"""Recipe ``stage=finetune``: train the news recommender on clicks, evaluate on dev, write the outputs."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import psutil
import torch

from speedyrec.build import build_dataset, build_model, build_token_store, build_tokenizer, make_out_dir
from speedyrec.config import Config, ConfigError, dump_config
from speedyrec.engine.distributed import DistInfo, all_reduce_sum
from speedyrec.engine.trainer import Trainer, load_checkpoint, save_checkpoint
from speedyrec.eval.evaluate import evaluate
from speedyrec.models.news_inputs import NewsInputs

log = logging.getLogger("speedyrec")

COUNTERS = ("clicks_trained", "news_encoded", "cache_lookups", "cache_hits", "stale_reads", "valid_tokens",
            "padded_tokens", "sequences_trained", "negatives_random")


class FinetuneRecipe:
    def __init__(self, cfg: Config, dist: DistInfo):
        self.cfg = cfg
        self.dist = dist

    def setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        t0 = time.perf_counter()
        self.out_dir = make_out_dir(cfg)
        self.data = build_dataset(cfg, dist)
        parts = build_tokenizer(cfg, self.data, dist)
        self.store = build_token_store(cfg, self.data, parts.tokenizer, dist)
        self.model = build_model(cfg, parts, dist)  # resolves model.freeze_layers=-1
        if dist.is_main:
            dump_config(cfg, self.out_dir / "config.yaml")
        self.inputs = NewsInputs(self.store, self._segments())
        if cfg.model.freeze_layers > 0 and cfg.train.workflow == "speedyfeed":
            self.inputs.enable_frozen_prefix(self.model.news_encoder.backbone.hidden_size,
                                             self.out_dir / f"frozen_prefix_rank{dist.rank}.npy")
        tc = cfg.train
        self.optimizer = torch.optim.AdamW(self.model.param_groups(tc.lr, tc.encoder_lr, tc.weight_decay))
        self.workflow = self._make_workflow()
        self.trainer = Trainer(self.model, self.optimizer, dist, grad_accum=tc.grad_accum, grad_clip=tc.grad_clip,
                               amp=tc.amp, max_steps=tc.max_steps, max_seconds=tc.max_seconds,
                               warmup_steps=tc.warmup_steps,
                               log_every=tc.log_every, checkpoint_every=tc.checkpoint_every,
                               checkpoint_fn=self.save_checkpoint, after_step=getattr(self.workflow, "after_step", None),
                               periodic=self._periodic_eval if cfg.eval.every else None, periodic_every=cfg.eval.every)
        if tc.resume:
            path = self._resume_path(tc.resume)
            load_checkpoint(path, self.trainer)
            if hasattr(self.workflow, "after_step"):  # cache stamps continue from the resumed step
                self.workflow.after_step(self.trainer.state.step)
            if dist.is_main:
                log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.trainer.state.step,
                         self.trainer.state.epoch, self.trainer.state.batches_done)
        self.setup_seconds = time.perf_counter() - t0

    def _segments(self) -> list[str] | None:
        """The BusLM segment layout when the engine uses it, else None (one concatenated sequence)."""
        cfg = self.cfg
        if cfg.train.workflow != "speedyfeed" or not cfg.engine.buslm:
            return None
        return list(cfg.engine.segments)

    def _make_workflow(self):
        cfg, dist = self.cfg, self.dist
        if cfg.train.workflow == "typical":
            from speedyrec.workflows.typical import TypicalWorkflow

            return TypicalWorkflow(self.data.train, self.store, self.model, max_history=cfg.data.max_history,
                                   negatives=cfg.train.negatives, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                   rank=dist.rank, world=dist.world, device=dist.device)
        from speedyrec.workflows.speedyfeed import SpeedyFeedWorkflow

        return SpeedyFeedWorkflow(cfg, self.data, self.inputs, self.model, dist)

    def _resume_path(self, resume: str) -> Path:
        path = self.out_dir / "checkpoints" / "latest.pt" if resume == "auto" else Path(resume)
        if not path.is_file():
            raise ConfigError(f"train.resume={resume}: no checkpoint at {path}")
        return path

    def save_checkpoint(self, trainer: Trainer) -> None:
        if self.dist.is_main:
            ckpt_dir = self.out_dir / "checkpoints"
            save_checkpoint(ckpt_dir / f"step_{trainer.state.step}.pt", trainer, self.cfg.to_dict())
            save_checkpoint(ckpt_dir / "latest.pt", trainer, self.cfg.to_dict())

    def evaluate(self) -> dict:
        cfg = self.cfg
        if len(self.data.dev) == 0:
            log.warning("no dev impressions: skipping evaluation")
            return {}
        return evaluate(self.model, self.inputs, self.data.dev, self.dist, max_history=cfg.data.max_history,
                        batch_size=cfg.eval.batch_size, max_impressions=cfg.eval.max_impressions, amp=cfg.train.amp)

    def _periodic_eval(self, step: int) -> float:
        m = self.evaluate()
        if self.dist.is_main and m:
            log.info("step %d  dev AUC %.4f  MRR %.4f  nDCG@5 %.4f  nDCG@10 %.4f", step, m["auc"], m["mrr"], m["ndcg5"], m["ndcg10"])
        return m.get("seconds", 0.0)

    def train(self) -> None:
        wf = self.workflow
        self.trainer.fit(self.cfg.train.epochs, wf.batches, wf.step)
        self.save_checkpoint(self.trainer)

    def cleanup(self) -> None:
        if self.inputs.frozen is not None:
            self.inputs.frozen.close()

    def stats(self) -> dict:
        """Counters summed over ranks, plus the data's fault counters (read identically by every rank)."""
        st = self.trainer.state
        local = {k: float(st.counters.get(k, 0.0)) for k in COUNTERS}
        local["sequences_dropped"] = float(getattr(self.workflow, "sequences_dropped", 0))
        vec = torch.tensor(list(local.values()), dtype=torch.float64, device=self.dist.device)
        all_reduce_sum(vec)
        # the slowest rank's loop time, and the largest resident memory of any rank
        peaks = torch.tensor([st.wall_seconds, psutil.Process().memory_info().rss / 2**20], dtype=torch.float64,
                             device=self.dist.device)
        if self.dist.active:
            torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
        wall = peaks[0]
        stats = {k: int(v) for k, v in zip(local, vec.tolist())}
        epochs_run = self.cfg.train.epochs
        stats["clicks_in_data"] = int(self.workflow.clicks_in_data)
        stats["sequences_in_data"] = int(getattr(self.workflow, "sequences_in_data", 0))
        stats.update(self.data.faults.as_dict())
        # clicks on unknown news cannot be trained: they are counted once per epoch, like the clicks trained
        stats["clicks_unknown_news"] = epochs_run * int(self.data.faults.counts.get("clicks_unknown_news", 0))
        expected = epochs_run * stats["clicks_in_data"] - stats["clicks_unknown_news"]
        assert stats["clicks_trained"] <= expected, "trained more clicks than the data holds"
        stats["clicks_not_reached"] = expected - stats["clicks_trained"]  # a run stopped by max_steps/max_seconds
        stats["epochs"] = epochs_run
        stats["steps"] = st.step
        stats["workflow"] = self.cfg.train.workflow
        stats["world_size"] = self.dist.world
        stats["device"] = str(self.dist.device.type)
        tokens = stats["valid_tokens"] + stats["padded_tokens"]
        stats["data_efficiency"] = stats["valid_tokens"] / tokens if tokens else 0.0
        stats["wall_seconds"] = float(wall.item())
        stats["clicks_per_second"] = stats["clicks_trained"] / stats["wall_seconds"] if stats["wall_seconds"] > 0 else 0.0
        stats["setup_seconds"] = self.setup_seconds
        stats["max_rank_rss_mb"] = round(float(peaks[1]), 1)
        return stats

    def write_outputs(self, metrics: dict, stats: dict) -> None:
        if not self.dist.is_main:
            return
        # NaN (no impression with both clicked and non-clicked news) is not JSON: write null
        clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()}
        (self.out_dir / "metrics.json").write_text(json.dumps(clean, indent=2) + "\n")
        (self.out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
