"""Recipe ``stage=posttrain``: Tiny-NewsRec's domain-specific post-training of the teacher PLM.

Only the top ``posttrain.train_layers`` layers (with pooling and projection) train; the frozen layers'
output is computed once per news (the frozen-prefix cache). After ``posttrain.snapshot_after`` steps a
snapshot is kept every ``posttrain.snapshot_every`` steps until ``posttrain.teachers`` are kept; each is
scored by its held-out title retrieval. With ``posttrain.body_segments`` a body is read as BusLM segments, and a
snapshot holds their segment pooling too. Writes ``out_dir/posttrain/{metrics.json, stats.json,
snapshots/teacher_<k>.safetensors}``.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from torch import nn

from speedyrec.build import build_news_encoder, plm_layers
from speedyrec.config import ConfigError
from speedyrec.distill.losses import candidate_cross_entropy
from speedyrec.distill.snapshots import save_snapshot
from speedyrec.distill.title_body import (body_encoder_of, describe_retrieval, encode_pairs, model_retrieval,
                                          retrieval_of)
from speedyrec.engine.trainer import StepOutput, adamw
from speedyrec.recipes.common import Timer, TitleBodyStage, non_backbone_names, trainable_names

log = logging.getLogger("speedyrec")


class NewsEncoderModel(nn.Module):
    """A bare news encoder where a recipe expects a model with ``news_encoder`` (and extra trained parts)."""

    def __init__(self, news_encoder: nn.Module, **extra: nn.Module):
        super().__init__()
        self.news_encoder = news_encoder
        for name, module in extra.items():
            setattr(self, name, module)


def encoder_param_groups(model: nn.Module, backbone: nn.Module, lr: float, encoder_lr: float) -> list[dict]:
    """The backbone's trainable parameters at ``encoder_lr``, every other trainable parameter at ``lr``."""
    in_backbone = {id(p) for p in backbone.parameters()}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in in_backbone], "lr": lr},
              {"params": [p for p in backbone.parameters() if p.requires_grad], "lr": encoder_lr}]
    return [g for g in groups if g["params"]]


def snapshot_steps(pt) -> list[int]:
    return [pt.snapshot_after + k * pt.snapshot_every for k in range(pt.teachers)]


class PosttrainRecipe(TitleBodyStage):
    stage = "posttrain"

    def run(self) -> dict:
        ctx, cfg, dist, pt = self.ctx, self.cfg, self.dist, self.cfg.posttrain
        data = self.prepare_title_body()
        layers = plm_layers(ctx)
        if pt.train_layers > layers:
            raise ConfigError(f"posttrain.train_layers={pt.train_layers} but model.encoder has {layers} layers")
        encoder = build_news_encoder(ctx, 0, layers - pt.train_layers)
        # a snapshot is the encoder that read the bodies: the title encoder itself, or BusLM over its parts
        self.saved = body = body_encoder_of(encoder, pt.body_segments)
        self.model = model = NewsEncoderModel(encoder, **({"body_encoder": body} if body is not encoder else {}))
        model.to(dist.device)
        self.cache_frozen_fields(encoder)
        optimizer = adamw(encoder_param_groups(model, encoder.backbone, pt.lr, pt.encoder_lr),
                          weight_decay=cfg.train.weight_decay)
        self.steps = snapshot_steps(pt)
        self.changed = trainable_names(body) | non_backbone_names(body)
        self.snapshots: list[dict] = []
        self.losses: list[float] = []
        initial = self._retrieval()
        epochs = math.ceil(self.steps[-1] / self.batches.steps_per_epoch())
        trainer = self.fit_on_title_body(model, optimizer, epochs, self.steps[-1] * pt.batch_size,
                                         max_steps=self.steps[-1], periodic=self._periodic, periodic_every=1)
        stats = self.title_body_stats(trainer, news_in_data=len(data.train_news), holdout_news=len(data.holdout),
                                      news_without_title_or_body=data.news_without_body,
                                      news_outside_train=data.news_outside_train, body_field=data.body_field)
        if dist.is_main:
            for s in self.snapshots:
                log.info("posttrain snapshot %s: step %d, loss %.4f, held-out title retrieval %s (initial %s)",
                         s["name"], s["step"], s["loss"], describe_retrieval(retrieval_of(s)),
                         describe_retrieval(initial))
        return self.finish({"initial": initial, "snapshots": self.snapshots, "loss_curve": self._curve()}, stats)

    def step(self, batch) -> StepOutput:
        if batch is None:
            return StepOutput(None, 0)
        enc = encode_pairs(self.model, self.data, batch, self.dist.device)
        ce = candidate_cross_entropy(enc.logits)
        self.losses.append(float(ce.detach().mean()))
        return StepOutput(ce.sum(), len(ce), enc.counters)

    def _retrieval(self) -> dict:
        cfg = self.cfg
        return model_retrieval(self.model, self.data, self.dist, cfg.posttrain.negatives, cfg.eval.batch_size,
                               cfg.train.amp)

    def _periodic(self, step: int) -> float:
        """Keep a snapshot at the snapshot steps (time excluded from the training loop's)."""
        if step not in self.steps:
            return 0.0
        timer = Timer()
        k = self.steps.index(step) + 1
        name = f"teacher_{k}"
        recent = self.losses[-self.cfg.posttrain.snapshot_every:]
        entry = {"name": name, "step": step, "loss": float(np.mean(recent)) if recent else float("nan"),
                 **self._retrieval()}
        path = self.out / "snapshots" / f"{name}.safetensors"
        if self.dist.is_main:
            meta = {"encoder": self.cfg.model.encoder, "stage": self.stage, "name": name, "step": step,
                    "layers": len(self.model.news_encoder.backbone.layers),
                    "train_layers": self.cfg.posttrain.train_layers, "body_segments": self.cfg.posttrain.body_segments,
                    "retrieval": entry}
            entry["checksum"] = save_snapshot(path, self.saved, self.changed, meta)
        entry["path"] = str(path)
        # the stage's time so far, setup included: what a run keeping k snapshots takes (benchmarks.teacher_count);
        # measured after the file is written and kept out of it, so a snapshot's file is the same in any run
        entry["seconds"] = self.timer()
        self.snapshots.append(entry)
        return timer()

    def _curve(self, every: int = 10) -> list[list[float]]:
        """Mean loss of each run of ``every`` steps: [last step, loss] (this rank's batches)."""
        out = []
        for s in range(0, len(self.losses), every):
            part = self.losses[s : s + every]
            out.append([s + len(part), float(np.mean(part))])
        return out
