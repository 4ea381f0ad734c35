"""Recipe ``stage=distill_finetune``: Tiny-NewsRec's Stage II, the Stage I student finetuned on clicks with the
M finetuned teachers.

The teachers are frozen: their news vectors come from the teacher bank (built once, in bulk, sharing their
common frozen layers), and only their small user encoders run at a step, on the bank's vectors. With the
autoregressive loss every prefix of a user's history is a target, and every target has teacher scores. Per
target: beta_i = softmax_i(-omega CE_i); loss = distill_weight * T_FT^2 CE(sum_i beta_i y_i / T_FT, y_s / T_FT)
+ emb_weight * sum_i beta_i [MSE(W_n,i n_i + b, n_s) + MSE(W_u,i u_i + b, u_s)] + ce_weight_ft * CE(y_s, y),
the news MSE over the target's candidates. A term whose weight is 0 is not computed (the paper's Figure 4
ablations); with the distillation and embedding terms both off no teacher is loaded. Writes
``out_dir/distill_finetune/{metrics.json, stats.json, student.safetensors}``.
"""
from __future__ import annotations

import gc
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from speedyrec.build import Context, news_encoding, segments_of
from speedyrec.distill.bank import BankBuild, TeacherBank
from speedyrec.distill.intermediate import IntermediateDistillation
from speedyrec.distill.losses import (TeacherProjections, distillation_loss, embedding_loss, projected_mse,
                                      teacher_weights)
from speedyrec.distill.snapshots import save_snapshot
from speedyrec.distill.teachers import build_student, first_teachers, load_finetuned_recommender, model_files
from speedyrec.engine.encode import length_chunks
from speedyrec.engine.loss import click_cross_entropy, target_scores
from speedyrec.engine.trainer import adamw
from speedyrec.hf_export import export_news_encoder
from speedyrec.models.frozen_prefix import frozen_cache_place
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.models.recommender import frequency_embeddings
from speedyrec.models.shared_prefix import SharedPrefixStack
from speedyrec.recipes.common import (DevCurve, StageRecipe, evaluate_on_dev, non_backbone_names,
                                      student_freeze_layers, trainable_names)
from speedyrec.recipes.distill_posttrain import omega_of, omega_parameter
from speedyrec.workflows.speedyfeed import SpeedyFeedWorkflow

log = logging.getLogger("speedyrec")


class DistillModel(nn.Module):
    """What Stage II trains: the student, the per-teacher projections of news and user vectors, omega."""

    def __init__(self, student: nn.Module, teachers: int, teacher_dim: int, learn_omega: bool, projections: bool):
        super().__init__()
        self.student = student
        d = student.news_encoder.proj.out_features
        # the embedding loss's maps (none when distill.emb_weight=0)
        self.news_proj = TeacherProjections(teachers, teacher_dim, d) if projections else None
        self.user_proj = TeacherProjections(teachers, teacher_dim, d) if projections else None
        self.log_omega = omega_parameter(learn_omega)


def stage1_student(ctx: Context) -> Path:
    """Stage I's student file, which Stage II (and the pipeline's student without Stage II) starts from."""
    return ctx.from_dir("distill_posttrain") / "student.safetensors"


class DistillFinetuneRecipe(StageRecipe):
    stage = "distill_finetune"

    def run(self) -> dict:
        ctx, cfg, dist, tc, di = self.ctx, self.cfg, self.dist, self.cfg.train, self.cfg.distill
        self.teaching = di.distill_weight > 0 or di.emb_weight > 0  # else the student learns from clicks alone
        files = first_teachers([f for f in model_files(ctx.from_dir("finetune_teachers") / "teachers",
                                                       "finetuned teachers", "finetune_teachers") if f.stem != "plain"],
                               di.teachers) if self.teaching else []
        teachers, checksums, teacher = [], [], None  # the plain teacher is a baseline, not a teacher
        for f in files:
            teacher, _, checksum = load_finetuned_recommender(ctx, f)
            teachers.append(teacher.to(dist.device))
            checksums.append(checksum)
        self.inputs = inputs = NewsInputs(ctx.store, segments_of(cfg))
        self.bank, build, self.online = None, BankBuild(), []
        shared = None
        self.bank_dim = teachers[0].news_encoder.proj.out_features if teachers else 0
        self.teacher_users = [t.user_encoder for t in teachers]
        if teachers and di.bank:
            stack = SharedPrefixStack([t.news_encoder for t in teachers], [t.frequency for t in teachers])
            shared = stack.shared_depth
            if dist.is_main:
                log.info("teacher bank of %d teachers; shared frozen layers: %s", len(teachers), shared)
            # random negatives may be any news: the bank holds every news of the corpus
            self.bank, build = TeacherBank.open_or_build(stack, checksums, inputs, np.arange(ctx.store.num_news),
                                                         ctx.bank_dir(), dist,
                                                         chunk_tokens=cfg.engine.chunk_tokens, amp=tc.amp)
            del stack  # from here on a step reads the bank and the teachers' user encoders only
        elif teachers:  # the naive way, for comparison: every teacher's whole PLM runs in every student step
            self.online = [(t.news_encoder, t.frequency) for t in teachers]
        # TinyBERT-MT: the teachers' PLMs stay, for their hidden states and attention (the bank holds vectors)
        self.intermediate = IntermediateDistillation([(t.news_encoder, t.frequency) for t in teachers],
                                                     di.student_layers) if di.intermediate_weight else None
        del teachers, teacher  # with the bank, the M teachers' PLMs are freed here: memory does not grow with M
        gc.collect()
        student, changed, start = build_student(ctx, student_freeze_layers(cfg),
                                                stage1_student(ctx) if di.student_init == "stage1" else None)
        self.model = model = DistillModel(student, len(files), self.bank_dim, di.learn_omega,
                                          projections=di.emb_weight > 0).to(dist.device)
        if student.news_encoder.backbone.freeze_layers and cfg.engine.frozen_cache:
            inputs.enable_frozen_prefix(student.news_encoder.backbone.hidden_size,
                                        frozen_cache_place(cfg, dist, self.out), "student")
        workflow = SpeedyFeedWorkflow(cfg, ctx.data, inputs, student, dist, objective=self.objective, encode_rows=(
            self.intermediate.encode_rows(student, cfg.engine.dynamic_batching) if self.intermediate else None))
        extra = [p for n, p in model.named_parameters() if not n.startswith("student.")]
        groups = student.param_groups(tc.lr, tc.encoder_lr, tc.weight_decay) + ([{"params": extra, "lr": tc.lr}]
                                                                               if extra else [])
        dev = DevCurve(ctx, lambda: evaluate_on_dev(ctx, [student], inputs)[0])
        # a checkpoint continues only with the same teachers (they key the bank) and the same Stage I student
        trainer = self.fit_on_clicks(model, adamw(groups), workflow, dev, {"teachers": checksums, "student_from": start})
        result = dev.final()
        inputs.close_frozen_prefix()
        path = self.out / "student.safetensors"
        meta = {"encoder": cfg.model.encoder, "stage": self.stage, "layers": di.student_layers,
                "teachers": [str(f) for f in files], "student_init": di.student_init, "news_encoding": news_encoding(cfg),
                "frozen_layers": student.news_encoder.backbone.freeze_layers, "metrics": result}
        changed |= trainable_names(student) | non_backbone_names(student)
        checksum = save_snapshot(path, student, changed, meta) if dist.is_main else ""
        exported = (export_news_encoder(cfg, student, ctx.parts.tokenizer, self.out / "news_encoder",
                                        {"stage": self.stage, "checksum": checksum}) if dist.is_main else {})
        losses = tuple(f"loss_{k}" for k, w in (("distill", di.distill_weight), ("emb", di.emb_weight),
                                                 ("ce", di.ce_weight_ft)) if w)  # the terms computed
        losses += ("loss_intermediate",) if self.intermediate else ()
        stats = self.click_stats(trainer, workflow, losses, teachers=len(files),
                                 shared_frozen_layers=shared, bank_seconds=build.seconds,
                                 bank_news_encoded=build.news_encoded, bank_padded_tokens=build.padded_tokens)
        if model.log_omega is not None:
            stats["omega"] = float(model.log_omega.detach().exp())
        return self.finish({"student": {**result, "path": str(path), "checksum": checksum, "news_encoder": exported}},
                           stats)

    def objective(self, table, news, clicks, negatives, targets):
        di, dev = self.cfg.distill, table.device
        model = self.model
        su = model.student.user_encoder
        s = target_scores(table, clicks, negatives, targets, su.prefix_states, su.empty)
        terms = {}  # the loss terms whose weight is above 0, each per target [T], with its weight
        if self.teaching:
            bank = self.bank.read(news, dev) if self.bank is not None else self._online_teachers(news, dev)  # [U, M, D]
            with torch.no_grad():
                ts = [target_scores(bank[:, i], clicks, negatives, targets, u.prefix_states, u.empty)
                      for i, u in enumerate(self.teacher_users)]
            t_logits = torch.stack([t.logits for t in ts])  # [M, T, C]
            w = teacher_weights(t_logits, 0.0 if di.weighting == "uniform" else omega_of(model.log_omega))
            if di.distill_weight:
                terms["distill"] = di.distill_weight, distillation_loss(s.logits, t_logits, w, di.temperature_ft)
            if di.emb_weight:
                terms["emb"] = di.emb_weight, embedding_loss(
                    w, projected_mse(s.candidates, torch.stack([t.candidates for t in ts]), model.news_proj),
                    projected_mse(s.user, torch.stack([t.user for t in ts]), model.user_proj))
            if self.intermediate is not None:  # TinyBERT-MT: each news weighted by the targets that score it
                terms["intermediate"] = di.intermediate_weight, self.intermediate.step_loss(w, clicks, negatives,
                                                                                            targets, len(table))
        if di.ce_weight_ft:
            terms["ce"] = di.ce_weight_ft, click_cross_entropy(s.logits)
        loss = sum(weight * term for weight, term in terms.values())
        return loss.sum(), {f"loss_{k}": term.detach().sum() for k, (_, term) in terms.items()}

    @torch.no_grad()
    def _online_teachers(self, news: np.ndarray, dev) -> torch.Tensor:
        """The teachers' vectors of the batch's news computed now, each teacher on its own: [U, M, D]."""
        tokens = self.inputs.prepare(news).to(dev)
        lengths = self.inputs.lengths(news)
        order = np.argsort(lengths, kind="stable")
        out = torch.zeros((len(news), len(self.online), self.bank_dim), device=dev)
        for chunk in length_chunks(lengths[order], self.cfg.engine.chunk_tokens):
            rows = order[chunk]
            sel = NewsInputs.select(tokens, rows)
            r = torch.as_tensor(rows, device=dev)
            for i, (enc, frequency) in enumerate(self.online):
                extra = frequency_embeddings(frequency, sel.counts)
                out[r, i] = enc(sel.input_ids, sel.mask, extra_embeddings=extra).float()
        return out
