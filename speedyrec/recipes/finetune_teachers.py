"""Recipe ``stage=finetune_teachers``: the M post-trained teachers finetuned on clicks, together, on the engine.

Every teacher starts from its own post-training snapshot, checked by checksum. The teachers are one
:class:`SharedPrefixStack`: the layers that post-training left untouched are the same weights in all of
them, so their output is computed once per news for all M; each teacher's post-trained but now frozen
layer is cached per teacher; a step runs only each teacher's trainable top layers. One pass of the engine
reads, batches, deduplicates and caches each batch once for all M (the cache rows hold the M vectors side
by side), and each teacher is trained on its own loss, clipped on its own, as if trained alone (the data
order is shared). At the end every teacher's news vectors go into the teacher bank that Stage II reads (and this stage's
evaluation too): the caches hold every news's frozen layers by then, so only each teacher's top layers run.
Writes ``out_dir/finetune_teachers/{metrics.json, stats.json, teachers/<name>.safetensors}``.
"""
from __future__ import annotations

import logging

import numpy as np
from torch import nn

from speedyrec.build import Context, news_encoding, plm_layers, segments_of
from speedyrec.config import ConfigError
from speedyrec.distill.bank import TeacherBank
from speedyrec.distill.snapshots import save_snapshot
from speedyrec.distill.teachers import first_teachers, load_posttrained_recommender, model_files
from speedyrec.engine.loss import autoregressive_loss
from speedyrec.engine.trainer import adamw
from speedyrec.models.checksum import news_checksum
from speedyrec.models.frozen_prefix import frozen_cache_place
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.models.shared_prefix import SharedPrefixStack
from speedyrec.recipes.common import DevCurve, StageRecipe, evaluate_on_dev, non_backbone_names, trainable_names
from speedyrec.workflows.speedyfeed import SpeedyFeedWorkflow

log = logging.getLogger("speedyrec")


def teacher_plan(ctx: Context) -> list[tuple[str, object, int]]:
    """(name, post-training snapshot or None for the plain PLM, seed) of every teacher to finetune."""
    cfg = ctx.cfg
    seed, first = cfg.train.seed, cfg.distill.teachers  # distill.teachers=M: the first M (0: every one)
    if cfg.teachers.init == "plm":  # MT-BERT's teachers: no post-training, M initialisations of the plain PLM
        return [(f"teacher_{i + 1}", None, seed + i) for i in range(first or cfg.posttrain.teachers)]
    # the first M snapshots: those a posttrain.teachers=M run keeps (snapshot k is taken at the same step whatever
    # M is), so this stage finetunes what such a run would
    files = first_teachers(model_files(ctx.from_dir("posttrain") / "snapshots", "post-training snapshots",
                                       "posttrain"), first)
    if cfg.teachers.seeds:  # the earlier paper: the final snapshot, finetuned with M seeds
        plan = [(f"teacher_{i + 1}", files[-1], seed + i) for i in range(len(files))]
    else:
        plan = [(f.stem, f, seed + i) for i, f in enumerate(files)]
    if cfg.teachers.plain:
        plan.append(("plain", None, seed + len(plan)))
    return plan


class FinetuneTeachersRecipe(StageRecipe):
    stage = "finetune_teachers"

    def run(self) -> dict:
        ctx, cfg, dist, tc = self.ctx, self.cfg, self.dist, self.cfg.train
        layers = plm_layers(ctx)
        if cfg.teachers.finetune_layers > layers:
            raise ConfigError(f"teachers.finetune_layers={cfg.teachers.finetune_layers} but model.encoder has {layers} layers")
        plan = teacher_plan(ctx)
        self.names = [name for name, _, _ in plan]
        self.models, snaps = [], []
        for name, path, seed in plan:
            model, snap = load_posttrained_recommender(ctx, path, layers - cfg.teachers.finetune_layers, seed, name)
            self.models.append(model.to(dist.device))
            snaps.append(snap)
        team = nn.ModuleList(self.models)
        self.stack = SharedPrefixStack([m.news_encoder for m in self.models], [m.frequency for m in self.models])
        self.inputs = inputs = NewsInputs(ctx.store, segments_of(cfg))
        if cfg.engine.frozen_cache:
            self.stack.enable_caches(inputs.lengths(np.arange(ctx.store.num_news)),
                                     frozen_cache_place(cfg, dist, self.out), "teachers")
        self.dim = cfg.model.dim
        workflow = SpeedyFeedWorkflow(cfg, ctx.data, inputs, None, dist, encode_rows=self._encode_rows,
                                      dim=len(self.models) * self.dim, objective=self.objective)
        self.trim = cfg.engine.dynamic_batching
        groups = [g for m in self.models for g in m.param_groups(tc.lr, tc.encoder_lr, tc.weight_decay)]
        if dist.is_main:
            log.info("finetuning %d teachers (%s) together; shared frozen layers: %s", len(plan), ", ".join(self.names),
                     self.stack.shared_depth)
        # periodic evaluations see the teachers as they are, through the stack (whose caches hold the frozen layers);
        # patience watches their mean AUC (they train in one pass and stop together)
        dev = DevCurve(ctx, lambda: self.evaluate(self._encode_stacked), label="the teachers' mean dev AUC",
                       monitor=lambda m: float(np.mean([m[name]["auc"] for name in self.names])))
        # a checkpoint continues only from the same post-trained snapshots
        trainer = self.fit_on_clicks(team, adamw(groups), workflow, dev,
                                     {"teachers": [snap["checksum"] if snap else "plm" for snap in snaps]},
                                     clip_groups=[[p for p in m.parameters() if p.requires_grad] for m in self.models])
        # the finetuned teachers' news vectors, for Stage II and for this evaluation: built now, while the caches
        # hold every news's frozen layers, only each teacher's top layers run
        checksums = [news_checksum(m) for m in self.models]
        bank, build = TeacherBank.open_or_build(self.stack, checksums, inputs, np.arange(ctx.store.num_news),
                                                ctx.bank_dir(), dist, chunk_tokens=cfg.engine.chunk_tokens, amp=tc.amp)
        self.stack.close_caches()
        final = dev.final(lambda: self.evaluate(lambda tokens: bank.read(tokens.news, dist.device).flatten(1)))
        metrics = {}
        for (name, path, _), model, snap in zip(plan, self.models, snaps):
            result = final.get(name, {})
            changed = trainable_names(model) | non_backbone_names(model)
            if snap is not None:
                changed |= {f"news_encoder.{k}" for k in snap["delta"]}
            meta = {"encoder": cfg.model.encoder, "stage": self.stage, "name": name, "layers": layers,
                    "from": str(path) if path else "plm", "posttrain_checksum": snap["checksum"] if snap else None,
                    "finetune_layers": cfg.teachers.finetune_layers, "news_encoding": news_encoding(cfg),
                    "frozen_layers": model.news_encoder.backbone.freeze_layers, "metrics": result}
            file = self.out / "teachers" / f"{name}.safetensors"
            checksum = save_snapshot(file, model, changed, meta) if dist.is_main else ""
            metrics[name] = {**result, "path": str(file), "checksum": checksum, "from": meta["from"]}
        if "ensemble" in final:
            metrics["ensemble"] = {**final["ensemble"], "members": [self.names[i] for i in self.members]}
        stats = self.click_stats(trainer, workflow, [f"loss_{name}" for name in self.names], teachers=len(plan),
                                 bank_seconds=build.seconds, bank_news_encoded=build.news_encoded,
                                 bank_padded_tokens=build.padded_tokens, shared_frozen_layers=self.stack.shared_depth)
        return self.finish(metrics, stats)

    @property
    def members(self) -> list[int]:
        """The post-trained teachers, whose mean score is evaluated too (Ensemble-Teacher; the student distills
        per-sample weighted teachers, not this mean); the plain teacher is a baseline, no member."""
        return [i for i, name in enumerate(self.names) if name != "plain"]

    def evaluate(self, encode_fn) -> dict:
        """Every teacher's dev metrics, and their mean score's ("ensemble") when there are several, with the
        teachers' news vectors from ``encode_fn(tokens) -> [R, M * D]``."""
        members = self.members
        results = evaluate_on_dev(self.ctx, self.models, self.inputs, encode_fn=encode_fn,
                                  ensemble=members if len(members) > 1 else None)
        named = dict(zip(self.names, results))
        if len(results) > len(self.names):
            named["ensemble"] = results[-1]
        return named

    def _encode_stacked(self, tokens):
        return self.stack(tokens.input_ids, tokens.mask, tokens.news, tokens.counts).flatten(1)

    def _encode_rows(self, tokens, rows):
        sel = NewsInputs.select(tokens, rows, self.trim)
        vec = self.stack(sel.input_ids, sel.mask, sel.news, sel.counts)  # [R, M, D]
        valid = int(sel.mask.sum())
        return vec.flatten(1), valid, sel.mask.numel() - valid

    def objective(self, table, news, clicks, negatives, targets):
        """The sum of the teachers' own autoregressive click losses (their parameters are disjoint)."""
        table = table.view(len(table), len(self.models), self.dim)
        total, counters = 0.0, {}
        for i, (name, model) in enumerate(zip(self.names, self.models)):
            user = model.user_encoder
            loss, _ = autoregressive_loss(table[:, i], clicks, negatives, targets, user.prefix_states, user.empty)
            total = total + loss
            counters[f"loss_{name}"] = loss.detach()
        return total, counters
