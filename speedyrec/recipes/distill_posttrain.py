"""Recipe ``stage=distill_posttrain``: Tiny-NewsRec's Stage I, the student learns title-body matching from the
M post-trained teachers.

The teachers are frozen, so their title and body vectors come from the teacher bank (computed once, in bulk;
their shared frozen layers once for all of them) and a student step never runs a teacher's PLM. Per body:
teacher weights alpha_i = softmax_i(-CE_i); loss = distill_weight * T^2 CE(sum_i alpha_i y_i / T, y_s / T)
+ emb_weight * sum_i alpha_i [MSE(W_i h_title_i + b_i, h_title_s) + MSE(W_i h_body_i + b_i, h_body_s)]
+ ce_weight_dp * InfoNCE of the student (``distill.stage1_projections=false``: the earlier paper's MSE(h_i, h_s),
with no W_i, b_i). A term whose weight is 0 is not computed (the paper's Figure 4 ablations); with the distillation
and embedding terms both off no teacher is read at all. Teachers and student read bodies as post-training did
(``posttrain.body_segments``: one sequence, or BusLM segments). Writes ``out_dir/distill_posttrain/{metrics.json,
stats.json, student.safetensors}``.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from speedyrec.build import build_news_encoder, plm_layers
from speedyrec.distill.bank import BankBuild, TeacherBank
from speedyrec.distill.intermediate import IntermediateDistillation
from speedyrec.distill.losses import (TeacherProjections, candidate_cross_entropy, distillation_loss, embedding_loss,
                                      projected_mse, teacher_weights)
from speedyrec.distill.snapshots import save_snapshot
from speedyrec.distill.teachers import first_teachers, freeze, load_posttrained_encoder, model_files
from speedyrec.distill.title_body import (body_encoder_of, describe_retrieval, encode_pairs, model_retrieval,
                                          retrieval_accuracy)
from speedyrec.engine.trainer import StepOutput, adamw
from speedyrec.models.checksum import weights_checksum
from speedyrec.models.shared_prefix import SharedPrefixStack
from speedyrec.recipes.common import TitleBodyStage, non_backbone_names, student_freeze_layers, trainable_names
from speedyrec.recipes.posttrain import NewsEncoderModel, encoder_param_groups

log = logging.getLogger("speedyrec")


def omega_parameter(learn: bool) -> nn.Parameter | None:
    """log(omega) for the earlier paper's learned scale of the teachers' CE (omega = 1 at the start)."""
    return nn.Parameter(torch.zeros(())) if learn else None


def omega_of(log_omega: nn.Parameter | None) -> torch.Tensor | float:
    return 1.0 if log_omega is None else log_omega.exp()


class DistillPosttrainRecipe(TitleBodyStage):
    stage = "distill_posttrain"
    intermediate: IntermediateDistillation | None = None  # distill.intermediate_weight (TinyBERT-MT)

    def run(self) -> dict:
        ctx, cfg, dist, di = self.ctx, self.cfg, self.dist, self.cfg.distill
        data = self.prepare_title_body()
        self.teaching = di.distill_weight > 0 or di.emb_weight > 0  # else the student learns its own task alone
        files, tb, bb, teacher_metrics = [], BankBuild(), BankBuild(), {}
        if self.teaching:
            files = first_teachers(model_files(ctx.from_dir("posttrain") / "snapshots", "post-training snapshots",
                                               "posttrain"), di.teachers)
            if di.stage1_teachers:
                files = files[-di.stage1_teachers:]  # the last (most post-trained) ones; 1 = the earlier paper
            layers = plm_layers(ctx)
            loaded = [load_posttrained_encoder(ctx, f, layers) for f in files]
            teachers = [freeze(enc).to(dist.device) for enc, _, _ in loaded]
            # each teacher's body encoder: itself, or BusLM over its parts (a stack and a bank of their own)
            bodies = [freeze(body).to(dist.device) for _, body, _ in loaded]
            news = np.concatenate([data.train_news, data.holdout])
            banks_root = ctx.bank_dir()
            self.title_bank, tb = TeacherBank.open_or_build(
                SharedPrefixStack(teachers), [weights_checksum(t) for t in teachers], data.titles, news, banks_root,
                dist, chunk_tokens=cfg.engine.chunk_tokens, amp=cfg.train.amp)
            self.body_bank, bb = TeacherBank.open_or_build(
                SharedPrefixStack(bodies), [weights_checksum(b) for b in bodies], data.bodies, news, banks_root, dist,
                chunk_tokens=cfg.engine.chunk_tokens, amp=cfg.train.amp)
            # TinyBERT-MT: the teachers' PLMs stay, for their hidden states and attention (the bank holds vectors)
            self.intermediate = IntermediateDistillation([(t, None) for t in teachers], di.student_layers) \
                if di.intermediate_weight else None
            del loaded, teachers, bodies
            teacher_metrics = self._teacher_retrieval(files)
        bank_seconds = tb.seconds + bb.seconds

        student = build_news_encoder(ctx, di.student_layers, student_freeze_layers(cfg))
        body = body_encoder_of(student, cfg.posttrain.body_segments)
        m = len(files)
        projections = (TeacherProjections(m, self.title_bank.dim, cfg.model.dim)
                       if di.stage1_projections and di.emb_weight > 0 else None)
        extra = {"body_encoder": body} if body is not student else {}
        self.model = model = NewsEncoderModel(student, projections=projections,
                                              log_omega=omega_parameter(di.learn_omega), **extra).to(dist.device)
        self.cache_frozen_fields(student)
        optimizer = adamw(encoder_param_groups(model, student.backbone, di.stage1_lr, di.stage1_encoder_lr),
                          weight_decay=cfg.train.weight_decay)
        initial = self._student_retrieval()
        trainer = self.fit_on_title_body(model, optimizer, di.stage1_epochs, di.stage1_epochs * len(data.train_news),
                                         max_steps=cfg.train.max_steps, max_seconds=cfg.train.max_seconds)
        final = self._student_retrieval()
        path = self.out / "student.safetensors"
        meta = {"encoder": cfg.model.encoder, "stage": self.stage, "layers": di.student_layers,
                "teachers": [str(f) for f in files], "body_segments": cfg.posttrain.body_segments, "retrieval": final}
        # the encoder that read the bodies: the student itself, or BusLM over its parts with its segment pooling
        checksum = save_snapshot(path, body, trainable_names(body) | non_backbone_names(body), meta) \
            if dist.is_main else ""
        stats = {"teachers": m, **self.title_body_stats(trainer, bank_seconds=bank_seconds,
                                                        bank_news_encoded=tb.news_encoded + bb.news_encoded,
                                                        bank_padded_tokens=tb.padded_tokens + bb.padded_tokens)}
        metrics = {"student": {"initial": initial, "final": final, "checksum": checksum, "path": str(path)},
                   "teachers": teacher_metrics}
        if dist.is_main:
            log.info("Stage I: student held-out title retrieval %s (before %s); teachers: %s", describe_retrieval(final),
                     describe_retrieval(initial),
                     "; ".join(f"{k} {describe_retrieval(v)}" for k, v in teacher_metrics.items()) or "n/a")
        return self.finish(metrics, stats)

    def step(self, batch) -> StepOutput:
        if batch is None:
            return StepOutput(None, 0)
        di, dev = self.cfg.distill, self.dist.device
        model = self.model
        s = encode_pairs(model, self.data, batch, dev, self.intermediate.encode_pair if self.intermediate else None)
        terms = {}  # the loss terms whose weight is above 0, each per body [b], with its weight
        if self.teaching:
            cand = batch.candidates.to(dev)
            t_title_all = self.title_bank.read(batch.news, dev)  # [B, M, D]
            t_body = self.body_bank.read(batch.news[batch.mine], dev)  # [b, M, D]
            t_logits = torch.einsum("bmd,bcmd->mbc", t_body, t_title_all[cand])  # [M, b, 1 + N]
            w = teacher_weights(t_logits, 0.0 if di.weighting == "uniform" else omega_of(model.log_omega))
            if di.distill_weight:
                terms["distill"] = di.distill_weight, distillation_loss(s.logits, t_logits, w, di.temperature)
            if di.emb_weight:
                mine = torch.as_tensor(batch.mine, device=dev)
                terms["emb"] = di.emb_weight, embedding_loss(
                    w, projected_mse(s.titles, t_title_all[mine].transpose(0, 1), model.projections),
                    projected_mse(s.bodies, t_body.transpose(0, 1), model.projections))
            if self.intermediate is not None:  # TinyBERT-MT: a body's and its title's, weighted by the body's alpha
                terms["intermediate"] = di.intermediate_weight, (w * self.intermediate.pair_losses()).sum(-1)
        if di.ce_weight_dp:
            terms["ce"] = di.ce_weight_dp, candidate_cross_entropy(s.logits)
        loss = sum(weight * term for weight, term in terms.values())
        counters = {**s.counters, **{f"loss_{k}": float(term.detach().sum()) for k, (_, term) in terms.items()}}
        return StepOutput(loss.sum(), s.logits.shape[0], counters)

    def _student_retrieval(self) -> dict:
        cfg = self.cfg
        return model_retrieval(self.model, self.data, self.dist, cfg.posttrain.negatives, cfg.eval.batch_size,
                               cfg.train.amp)

    def _teacher_retrieval(self, files) -> dict:
        """Each teacher's held-out retrieval, read from the bank (no encoding)."""
        h = self.data.holdout
        if len(h) < 2:
            return {}
        t = self.title_bank.read(h, torch.device("cpu"))
        b = self.body_bank.read(h, torch.device("cpu"))
        return {f.stem: retrieval_accuracy(t[:, i], b[:, i], self.cfg.posttrain.negatives) for i, f in enumerate(files)}
