"""TinyBERT's intermediate losses against M frozen teachers (TinyBERT-MT of Tiny-NewsRec's Table 4), for both
distillation stages: per news, the student's embeddings' output, each layer's output and each layer's attention
scores against those of the teacher layer it stands for (uniform map, layer i -> i * K), per teacher [R, M]; the
stage weighs them per sample with its teacher weights (Stage I: each body's alpha, for its title and body; Stage II:
each news by the mean beta of the targets that score it).

The teacher bank holds news vectors only, not hidden states or attention: every news the student encodes with
gradients runs each teacher's whole PLM too (no gradient), which is what TinyBERT-MT costs beyond Tiny-NewsRec.
"""
from __future__ import annotations

import torch
from torch import nn

from speedyrec.config import ConfigError
from speedyrec.distill.losses import (block_layers, candidate_rows, intermediate_loss, news_teacher_weights,
                                      weighted_news_loss)
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.models.recommender import frequency_embeddings


def layer_outputs(encoder: nn.Module, frequency, ids, mask, counts, layers: list[int]):
    """(hidden states: L + 1 tensors [R, T, H], attention scores of layers ``layers`` (1-based) [R, A, T, T])."""
    states = encoder.hidden_states(ids, mask, frequency_embeddings(frequency, counts))
    return states, [encoder.backbone.attention_scores(k - 1, states[k - 1]) for k in layers]


class IntermediateDistillation:
    """The M teachers' news encoders (frozen; each with its frequency embedding of refined text, or None) and the
    per-news losses of the chunks a step encodes, kept until the step's objective weighs them."""

    def __init__(self, teachers: list[tuple[nn.Module, nn.Module | None]], student_layers: int):
        self.teachers = teachers
        t_layers = len(teachers[0][0].backbone.layers)
        try:
            self.map = block_layers(student_layers, t_layers)
        except ValueError:
            raise ConfigError(f"distill.intermediate_weight: the teachers' {t_layers} layers do not split into "
                              f"blocks for a {student_layers}-layer student (distill.student_layers)") from None
        self.parts: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # (table rows or None, losses [R, M])

    def losses(self, encoder: nn.Module, frequency, ids, mask, counts) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's news vectors [R, D] and its intermediate losses against each teacher [R, M]."""
        states, attention = layer_outputs(encoder, frequency, ids, mask, counts, list(range(1, len(self.map))))
        with torch.no_grad():
            taught = [layer_outputs(enc, freq, ids, mask, counts, self.map[1:]) for enc, freq in self.teachers]
        losses = [intermediate_loss(states, attention, t_states, t_att, mask) for t_states, t_att in taught]
        return encoder.pool_states(states[-1], mask), torch.stack(losses, dim=-1)

    def encode_rows(self, student: nn.Module, trim: bool):
        """Stage II's ``encode_rows(tokens, rows)`` for the engine: the student's vectors, its losses kept by row."""
        def encode(tokens, rows):
            sel = NewsInputs.select(tokens, rows, trim)
            vec, losses = self.losses(student.news_encoder, student.frequency, sel.input_ids, sel.mask, sel.counts)
            if torch.is_grad_enabled():  # rows encoded without gradients (the cache audit's) are not trained
                self.parts.append((torch.as_tensor(rows, device=vec.device), losses))
            valid = int(sel.mask.sum())
            return vec, valid, sel.mask.numel() - valid
        return encode

    def step_loss(self, weights: torch.Tensor, clicks, negatives, targets, num_rows: int) -> torch.Tensor:
        """Stage II: the step's news losses weighted per news (the mean beta of the targets that score it), as their
        share per target [T] (the step's weighted sum, times T / news encoded, spread evenly)."""
        n = len(weights)
        news_w = news_teacher_weights(weights, candidate_rows(clicks, negatives, targets), num_rows)
        total = weighted_news_loss(self.parts, news_w, n)
        self.parts = []
        return (total / max(n, 1)).expand(n)

    def encode_pair(self, inputs, model: nn.Module, tokens):
        """Stage I's encoding of the rank's titles or bodies (title_body.encode_pairs' ``encode``): the student's
        vectors, its losses kept for ``pair_losses``."""
        sel = NewsInputs.select(tokens, None, True)
        vec, losses = self.losses(model.news_encoder, None, sel.input_ids, sel.mask, None)
        self.parts.append((None, losses))
        valid = int(sel.mask.sum())
        return vec, valid, sel.mask.numel() - valid

    def pair_losses(self) -> torch.Tensor:
        """Stage I: each body's and its title's losses (the step's two ``encode_pair`` calls), summed -> [b, M]."""
        total = sum(losses for _, losses in self.parts)
        self.parts = []
        return total
