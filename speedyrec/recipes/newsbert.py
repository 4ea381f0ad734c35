"""Recipe ``stage=newsbert``: NewsBERT (Wu et al.), the teacher and the student trained jointly on clicks.

The teacher (the PLM, or its post-trained snapshot) and the student (its first N layers) have their own
transformers and share the attention pooling, the projection ("dense") and the user encoder. The teacher
learns from its click loss alone. The student learns from its click loss, the distillation of the
teacher's click scores, and MSE losses: its embeddings' and each layer's output against the teacher's
(student layer i stands for teacher block i, K = teacher layers / N consecutive layers), its news vectors
and its user vectors against the teacher's. Momentum distillation then mixes each student layer's
gradient with the mean gradient of its teacher block: g_s <- (1 - beta) g_s + beta * mean(g_block).
Both run on the engine: one batch, each news encoded by both (the cache rows hold both vectors).
Writes ``out_dir/newsbert/{metrics.json, stats.json, student.safetensors, teacher.safetensors}``.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from speedyrec.build import apply_buslm, build_recommender, news_encoding, plm_layers, segments_of
from speedyrec.config import ConfigError
from speedyrec.distill.losses import distillation_loss, momentum_gradients, newsbert_hidden_loss
from speedyrec.distill.snapshots import load_snapshot, save_snapshot
from speedyrec.distill.teachers import model_files
from speedyrec.engine.loss import click_cross_entropy, target_scores
from speedyrec.engine.trainer import adamw
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.models.recommender import frequency_embeddings
from speedyrec.recipes.common import DevCurve, StageRecipe, evaluate_on_dev, non_backbone_names
from speedyrec.workflows.speedyfeed import SpeedyFeedWorkflow

log = logging.getLogger("speedyrec")

LOSSES = ("loss_teacher_ce", "loss_ce", "loss_distill", "loss_hidden", "loss_user_mse")  # the objective's counters


class NewsBertModel(nn.Module):
    """Teacher and student recommenders whose pooling, projection and user encoder are the same modules."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        super().__init__()
        student.news_encoder.pool = teacher.news_encoder.pool
        student.news_encoder.proj = teacher.news_encoder.proj
        if hasattr(teacher.news_encoder, "segment_pool"):  # BusLM: the segments' pooling is shared too
            student.news_encoder.segment_pool = teacher.news_encoder.segment_pool
        student.user_encoder = teacher.user_encoder
        self.teacher, self.student = teacher, student


class NewsBertRecipe(StageRecipe):
    stage = "newsbert"

    def _teacher_snapshot(self):
        """The post-training snapshot the teacher starts from, or None for the plain PLM."""
        init = self.cfg.newsbert.teacher_init
        folder = self.ctx.from_dir("posttrain") / "snapshots"
        if init == "plm" or (init == "auto" and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.pt"))):
            return None
        return model_files(folder, "post-training snapshots", "posttrain")[-1]

    def run(self) -> dict:
        ctx, cfg, dist, tc, nb = self.ctx, self.cfg, self.dist, self.cfg.train, self.cfg.newsbert
        n = cfg.distill.student_layers
        t_layers = nb.teacher_layers or plm_layers(ctx)
        if t_layers % n:
            raise ConfigError(f"newsbert: the teacher's {t_layers} layers are not a multiple of the student's {n} "
                              "(distill.student_layers); set newsbert.teacher_layers to a multiple")
        snap_path = self._teacher_snapshot()
        teacher = build_recommender(ctx, t_layers, 0, tc.seed)
        changed, start = set(), "plm"
        if snap_path is not None:
            if t_layers != plm_layers(ctx):
                raise ConfigError("newsbert.teacher_init=posttrain: a post-training snapshot holds every layer of the "
                                  "PLM; leave newsbert.teacher_layers at 0")
            snap = load_snapshot(teacher.news_encoder, snap_path, f"the NewsBERT teacher ({snap_path.stem})")
            changed, start = {f"news_encoder.{k}" for k in snap["delta"]}, snap["checksum"]
        # both read news as the config asks: BusLM's segments (after the snapshot's plain encoder is loaded), refined
        # text with each transformer's own frequency embedding
        teacher = apply_buslm(teacher, cfg)
        student = apply_buslm(build_recommender(ctx, n, 0, tc.seed), cfg)
        self.model = model = NewsBertModel(teacher, student).to(dist.device)
        self.dim = cfg.model.dim
        self.inputs = inputs = NewsInputs(ctx.store, segments_of(cfg))
        self.trim = cfg.engine.dynamic_batching
        self.hidden_sum, self.hidden_news = [], 0
        workflow = SpeedyFeedWorkflow(cfg, ctx.data, inputs, None, dist, encode_rows=self._encode_rows,
                                      dim=2 * self.dim, objective=self.objective)
        t_bb, s_bb = teacher.news_encoder.backbone, student.news_encoder.backbone
        groups = [{"params": [p for p in t_bb.parameters()] + [p for p in s_bb.parameters()], "lr": tc.encoder_lr},
                  {"params": [p for name, p in model.named_parameters() if ".backbone." not in name], "lr": tc.lr}]
        hook = (lambda: momentum_gradients(list(s_bb.layers), list(t_bb.layers), nb.momentum)) if nb.momentum else None
        # patience watches the student's AUC: the teacher is a means to it
        dev = DevCurve(ctx, lambda: dict(zip(("student", "teacher"), evaluate_on_dev(ctx, [student, teacher], inputs))),
                       monitor=lambda m: m["student"]["auc"], label="the student's dev AUC")
        trainer = self.fit_on_clicks(model, adamw(groups, weight_decay=tc.weight_decay), workflow, dev,
                                     {"teacher_from": start}, grad_hook=hook)
        metrics = dev.final()
        if dist.is_main:
            for name, m in (("student", student), ("teacher", teacher)):
                layers = n if name == "student" else t_layers
                meta = {"encoder": cfg.model.encoder, "stage": self.stage, "name": name, "layers": layers,
                        "teacher_from": str(snap_path) if snap_path else "plm", "news_encoding": news_encoding(cfg),
                        "frozen_layers": m.news_encoder.backbone.freeze_layers, "metrics": metrics[name]}
                everything = {k for k in m.state_dict()} if name == "student" else changed | {
                    k for k, p in m.named_parameters() if p.requires_grad} | non_backbone_names(m)
                metrics[name]["checksum"] = save_snapshot(self.out / f"{name}.safetensors", m, everything, meta)
        stats = self.click_stats(trainer, workflow, LOSSES, teacher_layers=t_layers, student_layers=n,
                                 momentum=nb.momentum)
        return self.finish(metrics, stats)

    def _encode_rows(self, tokens, rows):
        """Both encoders on the same rows: [R, 2D] (teacher | student); the student's hidden-state losses
        against the teacher are kept for the step's objective, for rows encoded with gradients only."""
        sel = NewsInputs.select(tokens, rows, self.trim)
        ids, mask = sel.input_ids, sel.mask
        teacher, student = self.model.teacher, self.model.student
        t_enc, s_enc = teacher.news_encoder, student.news_encoder
        t_states = t_enc.hidden_states(ids, mask, frequency_embeddings(teacher.frequency, sel.counts))
        s_states = s_enc.hidden_states(ids, mask, frequency_embeddings(student.frequency, sel.counts))
        t_vec = t_enc.pool_states(t_states[-1], mask)
        s_vec = s_enc.pool_states(s_states[-1], mask)
        if torch.is_grad_enabled():  # rows encoded without gradients (the cache audit's) are not trained
            hidden = newsbert_hidden_loss(s_states, t_states, mask)
            hidden = hidden + (s_vec.float() - t_vec.detach().float()).pow(2).mean(-1)  # the pooled news vectors
            self.hidden_sum.append(hidden.sum())
            self.hidden_news += len(hidden)
        valid = int(mask.sum())
        return torch.cat([t_vec, s_vec], dim=-1), valid, mask.numel() - valid

    def objective(self, table, news, clicks, negatives, targets):
        cfg, d = self.cfg, self.dim
        user = self.model.teacher.user_encoder  # shared
        t = target_scores(table[:, :d], clicks, negatives, targets, user.prefix_states, user.empty)
        s = target_scores(table[:, d:], clicks, negatives, targets, user.prefix_states, user.empty)
        n_targets = len(t.logits)
        teacher_ce = click_cross_entropy(t.logits)
        student_ce = click_cross_entropy(s.logits)
        ones = torch.ones((n_targets, 1), device=table.device)
        distill = distillation_loss(s.logits, t.logits.unsqueeze(0), ones, cfg.distill.temperature_ft)
        user_mse = (s.user.float() - t.user.detach().float()).pow(2).mean(-1)
        # per-news hidden losses of the news this step encoded, as their mean per target
        hidden = torch.stack(self.hidden_sum).sum() * (n_targets / max(self.hidden_news, 1)) if self.hidden_sum \
            else table.new_zeros(())
        self.hidden_sum, self.hidden_news = [], 0
        w = cfg.newsbert.hidden_weight
        loss = teacher_ce.sum() + student_ce.sum() + distill.sum() + w * (user_mse.sum() + hidden)
        return loss, {"loss_teacher_ce": teacher_ce.detach().sum(), "loss_ce": student_ce.detach().sum(),
                      "loss_distill": distill.detach().sum(), "loss_hidden": hidden.detach(),
                      "loss_user_mse": user_mse.detach().sum()}
