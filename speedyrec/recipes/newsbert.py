"""Recipe ``stage=newsbert``: NewsBERT (Wu et al.), the teacher and the student trained jointly on clicks; with
``newsbert.teachers=M`` the M teachers of NewsBERT-MT or MT-BERT (Tiny-NewsRec's Table 4).

The teacher (the PLM, or its post-trained snapshot) and the student (its first N layers) have their own
transformers and share the attention pooling, the projection ("dense") and the user encoder. The teacher
learns from its click loss alone. The student learns from its click loss, the distillation of the
teacher's click scores, and MSE losses: its embeddings' and each layer's output against the teacher's
(student layer i stands for teacher block i, K = teacher layers / N consecutive layers), its news vectors
and its user vectors against the teacher's. Momentum distillation then mixes each student layer's
gradient with the mean gradient of its teacher block: g_s <- (1 - beta) g_s + beta * mean(g_block).
Both run on the engine: one batch, each news encoded by both (the cache rows hold both vectors).

M teachers (all sharing the one pooling, projection and user encoder, as MT-BERT's co-finetuned teachers share
theirs) each learn from their own click loss; the student's losses against them are weighted per target by
beta_i = softmax_i(-CE_i), as Tiny-NewsRec weighs its teachers (the news losses by the mean beta of the targets
that score the news), and the momentum takes the mean gradient of the M teachers' blocks. NewsBERT-MT's teachers
start from the last M post-training snapshots; MT-BERT's (``newsbert.teacher_init=finetuned``) from the teachers
``finetune_teachers`` trained without post-training (``teachers.init=plm``), the shared head from the first's.
Writes ``out_dir/newsbert/{metrics.json, stats.json, student.safetensors, teacher[_<k>].safetensors}``.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from speedyrec.build import apply_buslm, build_recommender, news_encoding, plm_layers, segments_of
from speedyrec.config import ConfigError
from speedyrec.distill.losses import (candidate_rows, distillation_loss, momentum_gradients, news_teacher_weights,
                                      newsbert_hidden_loss, teacher_weights, weighted_news_loss)
from speedyrec.distill.snapshots import save_snapshot
from speedyrec.distill.teachers import load_finetuned_recommender, load_for_clicks, model_files
from speedyrec.engine.loss import click_cross_entropy, target_scores
from speedyrec.engine.trainer import adamw
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.models.recommender import frequency_embeddings
from speedyrec.recipes.common import DevCurve, StageRecipe, evaluate_on_dev, non_backbone_names, trainable_names
from speedyrec.workflows.speedyfeed import SpeedyFeedWorkflow

log = logging.getLogger("speedyrec")

LOSSES = ("loss_teacher_ce", "loss_ce", "loss_distill", "loss_hidden", "loss_user_mse")  # the objective's counters


class NewsBertModel(nn.Module):
    """Teachers and student recommenders whose pooling, projection and user encoder are the same modules (the
    first teacher's)."""

    def __init__(self, teachers: nn.Module | list[nn.Module], student: nn.Module):
        super().__init__()
        teachers = [teachers] if isinstance(teachers, nn.Module) else teachers
        head = teachers[0]
        for model in [*teachers[1:], student]:
            model.news_encoder.pool = head.news_encoder.pool
            model.news_encoder.proj = head.news_encoder.proj
            if hasattr(head.news_encoder, "segment_pool"):  # BusLM: the segments' pooling is shared too
                model.news_encoder.segment_pool = head.news_encoder.segment_pool
            model.user_encoder = head.user_encoder
        # the first teacher keeps its name, so a one-teacher checkpoint reads as before
        self.teacher, self.student = head, student
        self.more_teachers = nn.ModuleList(teachers[1:])

    @property
    def teachers(self) -> list[nn.Module]:
        return [self.teacher, *self.more_teachers]


def thaw(model: nn.Module) -> nn.Module:
    """A frozen model file's model, every layer trained again (NewsBERT's teachers keep learning)."""
    model.news_encoder.backbone.freeze_layers = 0
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


class NewsBertRecipe(StageRecipe):
    stage = "newsbert"

    def _teacher_sources(self, t_layers: int) -> list:
        """Where each of the newsbert.teachers teachers starts: None (the plain PLM), a post-training snapshot, or
        ("finetuned", a finetune_teachers model file)."""
        nb, m = self.cfg.newsbert, self.cfg.newsbert.teachers
        if nb.teacher_init == "finetuned":
            files = [f for f in model_files(self.ctx.from_dir("finetune_teachers") / "teachers", "finetuned teachers",
                                            "finetune_teachers") if f.stem != "plain"]
            if len(files) < m:
                raise ConfigError(f"newsbert.teachers={m} but {self.ctx.from_dir('finetune_teachers')} holds "
                                  f"{len(files)} finetuned teachers")
            return [("finetuned", f) for f in files[:m]]
        folder = self.ctx.from_dir("posttrain") / "snapshots"
        plain = nb.teacher_init == "plm" or (nb.teacher_init == "auto" and not any(folder.glob("*.safetensors"))
                                             and not any(folder.glob("*.pt")))
        if plain:
            if m > 1:
                raise ConfigError(f"newsbert.teachers={m} starting from the plain PLM would be {m} copies of one "
                                  "teacher: start them from post-training snapshots (newsbert.teacher_init=posttrain, "
                                  "NewsBERT-MT) or from finetuned teachers (newsbert.teacher_init=finetuned, MT-BERT)")
            return [None]
        files = model_files(folder, "post-training snapshots", "posttrain")
        if len(files) < m:
            raise ConfigError(f"newsbert.teachers={m} but {folder} holds {len(files)} post-training snapshots")
        if t_layers != plm_layers(self.ctx):
            raise ConfigError("newsbert.teacher_init=posttrain: a post-training snapshot holds every layer of the "
                              "PLM; leave newsbert.teacher_layers at 0")
        return files[-m:]

    def _build_teacher(self, source, t_layers: int):
        """(teacher recommender, state names that differ from the PLM, checksum of what it starts from)."""
        ctx, cfg = self.ctx, self.cfg
        if isinstance(source, tuple):  # a finetuned teacher: its whole model file, every layer trained from here
            if t_layers != plm_layers(ctx):
                raise ConfigError("newsbert.teacher_init=finetuned: a finetuned teacher holds every layer of the PLM; "
                                  "leave newsbert.teacher_layers at 0")
            teacher, snap, _ = load_finetuned_recommender(ctx, source[1])
            return thaw(teacher), set(teacher.state_dict()), snap["checksum"]
        teacher = build_recommender(ctx, t_layers, 0, cfg.train.seed)
        changed, start = set(), "plm"
        if source is not None:
            snap = load_for_clicks(teacher.news_encoder, source, f"the NewsBERT teacher ({source.stem})")
            changed, start = {f"news_encoder.{k}" for k in snap["delta"]}, snap["checksum"]
        # both read news as the config asks: BusLM's segments (after the snapshot's plain encoder is loaded), refined
        # text with each transformer's own frequency embedding
        return apply_buslm(teacher, cfg), changed, start

    def run(self) -> dict:
        ctx, cfg, dist, tc, nb = self.ctx, self.cfg, self.dist, self.cfg.train, self.cfg.newsbert
        n = cfg.distill.student_layers
        t_layers = nb.teacher_layers or plm_layers(ctx)
        if t_layers % n:
            raise ConfigError(f"newsbert: the teacher's {t_layers} layers are not a multiple of the student's {n} "
                              "(distill.student_layers); set newsbert.teacher_layers to a multiple")
        sources = self._teacher_sources(t_layers)
        built = [self._build_teacher(src, t_layers) for src in sources]
        teachers = [t for t, _, _ in built]
        student = apply_buslm(build_recommender(ctx, n, 0, tc.seed), cfg)
        self.model = model = NewsBertModel(teachers, student).to(dist.device)
        self.names = ["teacher"] if len(teachers) == 1 else [f"teacher_{k + 1}" for k in range(len(teachers))]
        self.dim = cfg.model.dim
        self.inputs = inputs = NewsInputs(ctx.store, segments_of(cfg))
        self.trim = cfg.engine.dynamic_batching
        self.hidden_parts = []
        workflow = SpeedyFeedWorkflow(cfg, ctx.data, inputs, None, dist, encode_rows=self._encode_rows,
                                      dim=(len(teachers) + 1) * self.dim, objective=self.objective)
        backbones = [t.news_encoder.backbone for t in teachers]
        s_bb = student.news_encoder.backbone
        groups = [{"params": [p for bb in [*backbones, s_bb] for p in bb.parameters()], "lr": tc.encoder_lr},
                  {"params": [p for name, p in model.named_parameters() if ".backbone." not in name], "lr": tc.lr}]
        t_layers_of = [list(bb.layers) for bb in backbones] if len(backbones) > 1 else list(backbones[0].layers)
        hook = (lambda: momentum_gradients(list(s_bb.layers), t_layers_of, nb.momentum)) if nb.momentum else None
        # patience watches the student's AUC: the teachers are a means to it
        dev = DevCurve(ctx, lambda: dict(zip(("student", *self.names),
                                             evaluate_on_dev(ctx, [student, *teachers], inputs))),
                       monitor=lambda m: m["student"]["auc"], label="the student's dev AUC")
        starts = [start for _, _, start in built]
        trainer = self.fit_on_clicks(model, adamw(groups, weight_decay=tc.weight_decay), workflow, dev,
                                     {"teacher_from": starts[0] if len(starts) == 1 else starts}, grad_hook=hook)
        metrics = dev.final()
        origins = ["plm" if s is None else str(s[1] if isinstance(s, tuple) else s) for s in sources]
        if dist.is_main:
            saved = [("student", student, n, set(student.state_dict()), origins[0] if len(origins) == 1 else origins)]
            saved += [(name, t, t_layers, changed | trainable_names(t) | non_backbone_names(t), origin)
                      for name, t, (_, changed, _), origin in zip(self.names, teachers, built, origins)]
            for name, m, layers, everything, origin in saved:
                meta = {"encoder": cfg.model.encoder, "stage": self.stage, "name": name, "layers": layers,
                        "teacher_from": origin, "news_encoding": news_encoding(cfg),
                        "frozen_layers": m.news_encoder.backbone.freeze_layers, "metrics": metrics[name]}
                metrics[name]["checksum"] = save_snapshot(self.out / f"{name}.safetensors", m, everything, meta)
        stats = self.click_stats(trainer, workflow, LOSSES, teacher_layers=t_layers, student_layers=n,
                                 momentum=nb.momentum, teachers=len(teachers))
        return self.finish(metrics, stats)

    def _encode_rows(self, tokens, rows):
        """Every teacher and the student on the same rows: [R, (M + 1) D] (teachers, then the student); the
        student's hidden-state losses against each teacher [R, M] are kept with the rows for the step's objective,
        for rows encoded with gradients only."""
        sel = NewsInputs.select(tokens, rows, self.trim)
        ids, mask = sel.input_ids, sel.mask
        student = self.model.student
        s_enc = student.news_encoder
        s_states = s_enc.hidden_states(ids, mask, frequency_embeddings(student.frequency, sel.counts))
        s_vec = s_enc.pool_states(s_states[-1], mask)
        vectors, hidden = [], []
        for teacher in self.model.teachers:
            t_enc = teacher.news_encoder
            t_states = t_enc.hidden_states(ids, mask, frequency_embeddings(teacher.frequency, sel.counts))
            t_vec = t_enc.pool_states(t_states[-1], mask)
            vectors.append(t_vec)
            if torch.is_grad_enabled():  # rows encoded without gradients (the cache audit's) are not trained
                h = newsbert_hidden_loss(s_states, t_states, mask)
                hidden.append(h + (s_vec.float() - t_vec.detach().float()).pow(2).mean(-1))  # the pooled vectors
        if hidden:
            self.hidden_parts.append((torch.as_tensor(rows, device=s_vec.device), torch.stack(hidden, dim=-1)))
        valid = int(mask.sum())
        return torch.cat([*vectors, s_vec], dim=-1), valid, mask.numel() - valid

    def objective(self, table, news, clicks, negatives, targets):
        cfg, d, m = self.cfg, self.dim, len(self.names)
        user = self.model.teacher.user_encoder  # shared
        ts = [target_scores(table[:, i * d:(i + 1) * d], clicks, negatives, targets, user.prefix_states, user.empty)
              for i in range(m)]
        s = target_scores(table[:, m * d:], clicks, negatives, targets, user.prefix_states, user.empty)
        n_targets = len(s.logits)
        t_logits = torch.stack([t.logits for t in ts])  # [M, T, C]
        teacher_ce = click_cross_entropy(t_logits.flatten(0, 1))  # each teacher learns from its own clicks
        student_ce = click_cross_entropy(s.logits)
        w = teacher_weights(t_logits)  # [T, M]; one teacher: 1
        distill = distillation_loss(s.logits, t_logits, w, cfg.distill.temperature_ft)
        user_mse = (w * torch.stack([(s.user.float() - t.user.detach().float()).pow(2).mean(-1) for t in ts],
                                    dim=-1)).sum(-1)
        # per-news hidden losses of the news this step encoded, weighted per news, as their mean per target
        news_w = news_teacher_weights(w, candidate_rows(clicks, negatives, targets), len(table))
        hidden = weighted_news_loss(self.hidden_parts, news_w, n_targets)
        self.hidden_parts = []
        hw = cfg.newsbert.hidden_weight
        loss = teacher_ce.sum() + student_ce.sum() + distill.sum() + hw * (user_mse.sum() + hidden)
        return loss, {"loss_teacher_ce": teacher_ce.detach().sum() / m, "loss_ce": student_ce.detach().sum(),
                      "loss_distill": distill.detach().sum(), "loss_hidden": hidden.detach(),
                      "loss_user_mse": user_mse.detach().sum()}
