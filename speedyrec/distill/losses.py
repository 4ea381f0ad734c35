"""Losses of Tiny-NewsRec's multi-teacher distillation and of NewsBERT, per training sample.

Shapes: T samples (a post-training body, or a click target), C candidates (the positive first), M
teachers, D dimensions. Every loss returns one value per sample [T]; recipes sum them, so the engine's
trainer can divide by the global number of samples.
"""
from __future__ import annotations

import torch
from torch import nn


def candidate_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., C] with the positive in column 0 -> cross-entropy with the one-hot label [...]."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - logits[..., 0]


def teacher_weights(teacher_logits: torch.Tensor, omega: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Per-sample teacher weights softmax_i(-omega * CE(y_i, label)): teacher_logits [M, T, C] -> [T, M].

    The teachers' losses are constants (teachers are frozen); ``omega`` may be a learned scalar (the earlier
    paper), through which alone gradients flow."""
    ce = candidate_cross_entropy(teacher_logits.detach())  # [M, T]
    return torch.softmax(-omega * ce.t(), dim=-1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 * CE(softmax(sum_i w_i y_i / T), softmax(y_s / T)) per sample.

    student_logits [T, C]; teacher_logits [M, T, C]; weights [T, M] -> [T]."""
    mixed = torch.einsum("tm,mtc->tc", weights, teacher_logits.detach().float())
    target = torch.softmax(mixed / temperature, dim=-1)
    return -(target * torch.log_softmax(student_logits.float() / temperature, dim=-1)).sum(-1) * temperature ** 2


class TeacherProjections(nn.Module):
    """One learnable linear map per teacher, W_i h + b_i, from the teachers' space into the student's."""

    def __init__(self, teachers: int, teacher_dim: int, student_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(teachers, student_dim, teacher_dim))
        self.bias = nn.Parameter(torch.zeros(teachers, student_dim))
        for w in self.weight:  # each like a fresh nn.Linear
            nn.init.kaiming_uniform_(w, a=5 ** 0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [M, ..., D_t] -> [M, ..., D_s]."""
        m = h.shape[0]
        flat = h.reshape(m, -1, h.shape[-1])
        out = torch.baddbmm(self.bias.unsqueeze(1), flat.to(self.weight.dtype), self.weight.transpose(1, 2))
        return out.reshape(*h.shape[:-1], self.weight.shape[1])


def projected_mse(student: torch.Tensor, teachers: torch.Tensor, projections: TeacherProjections | None) -> torch.Tensor:
    """MSE(W_i h_i + b_i, h_s) per sample and teacher, the mean over every element of a sample's vectors;
    ``projections`` None: MSE(h_i, h_s) (the earlier paper's Stage I; D_t = D_s).

    student [T, ..., D_s]; teachers [M, T, ..., D_t] (constants) -> [T, M]."""
    mapped = teachers.detach().float() if projections is None else projections(teachers.detach().float())
    diff = mapped - student.float().unsqueeze(0)  # [M, T, ..., D_s]
    return diff.pow(2).flatten(2).mean(-1).t()


def embedding_loss(weights: torch.Tensor, *per_pair_mse: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * sum_pairs MSE_i: weights [T, M], each MSE [T, M] (title and body, or news and user) -> [T]."""
    return (weights * torch.stack(per_pair_mse).sum(0)).sum(-1)


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the real tokens of each row: a, b [N, T, H], mask [N, T] -> [N] (or BusLM's
    segments: a, b [N, S, T, H], mask [N, S, T])."""
    m = mask.to(a.dtype).unsqueeze(-1)
    sq = (a.float() - b.float()).pow(2) * m
    dims = tuple(range(1, a.dim()))
    return sq.sum(dims) / (m.sum(dims) * a.shape[-1]).clamp(min=1)


def newsbert_hidden_loss(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                         mask: torch.Tensor) -> torch.Tensor:
    """NewsBERT Eq. 1 per news: MSE of the embeddings' outputs plus, for every student layer i, the MSE
    between its output and the output of teacher block i (teacher layer i * K). The teacher is a constant.

    student_states: N + 1 tensors [R, T, H] (embeddings, then each layer; BusLM: [R, S, T, H] with mask
    [R, S, T]); teacher_states: N * K + 1. -> [R]."""
    n = len(student_states) - 1
    k = (len(teacher_states) - 1) // n
    assert n * k + 1 == len(teacher_states), "teacher layers must be a multiple of the student's"
    loss = masked_mse(student_states[0], teacher_states[0].detach(), mask)
    for i in range(1, n + 1):
        loss = loss + masked_mse(student_states[i], teacher_states[i * k].detach(), mask)
    return loss


@torch.no_grad()
def momentum_gradients(student_layers: list[nn.Module], teacher_layers: list, beta: float) -> None:
    """NewsBERT momentum distillation: g_s <- (1 - beta) g_s + beta * mean of the gradients of the teacher
    block (K consecutive teacher layers) that student layer i stands for, parameter by parameter. Several
    teachers (``teacher_layers`` a list of each teacher's layers): the mean over their blocks' layers."""
    teachers = teacher_layers if teacher_layers and isinstance(teacher_layers[0], (list, tuple)) else [teacher_layers]
    n = len(student_layers)
    k = len(teachers[0]) // n
    for i, layer in enumerate(student_layers):
        block = [t for layers in teachers for t in layers[i * k : (i + 1) * k]]
        for name, p in layer.named_parameters():
            if p.grad is None:
                continue
            grads = [dict(t.named_parameters())[name].grad for t in block]
            if any(g is None for g in grads):
                raise RuntimeError(f"momentum distillation: teacher block {i} has no gradient for {name}")
            p.grad.mul_(1.0 - beta).add_(torch.stack(grads).mean(0), alpha=beta)


# -- several teachers' intermediate outputs (TinyBERT-MT, NewsBERT-MT, MT-BERT) --------------------------------
def block_layers(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer each student layer imitates, uniform as in TinyBERT and NewsBERT: student layer i (1..N)
    -> teacher layer i * K, K = teacher_layers / N (layer 0, the embeddings, -> 0). Returns N + 1 layer numbers."""
    if teacher_layers % student_layers:
        raise ValueError(f"the teacher's {teacher_layers} layers do not split into {student_layers} blocks")
    k = teacher_layers // student_layers
    return [i * k for i in range(student_layers + 1)]


def attention_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TinyBERT's attention loss per news: the mean squared difference of attention scores a, b [R, A, T, T] over
    the heads and the (query, key) pairs of real tokens (mask [R, T]) -> [R]."""
    pairs = (mask[:, None, :, None] & mask[:, None, None, :]).to(a.dtype)  # [R, 1, T, T]
    sq = (a.float() - b.float()).pow(2) * pairs
    return sq.sum((1, 2, 3)) / (pairs.sum((1, 2, 3)) * a.shape[1]).clamp(min=1)


def intermediate_loss(student_states: list[torch.Tensor], student_attention: list[torch.Tensor],
                      teacher_states: list[torch.Tensor], teacher_attention: list[torch.Tensor],
                      mask: torch.Tensor) -> torch.Tensor:
    """TinyBERT's intermediate losses of one teacher per news: the embeddings' MSE, and for every student layer i
    the MSE of its output against teacher layer i * K's (``newsbert_hidden_loss``) plus the MSE of its attention
    scores against teacher layer i * K's. The teacher is a constant.

    student_states: N + 1 tensors [R, T, H]; student_attention: N tensors [R, A, T, T] (layer 1..N);
    teacher_states: N * K + 1; teacher_attention: N (the mapped layers i * K only) -> [R]."""
    loss = newsbert_hidden_loss(student_states, teacher_states, mask)
    for s, t in zip(student_attention, teacher_attention, strict=True):
        loss = loss + attention_mse(s, t.detach(), mask)
    return loss


def candidate_rows(clicks: torch.Tensor, negatives: torch.Tensor, targets) -> torch.Tensor:
    """The table rows of every target's candidates, the click first: clicks [B, L], negatives [B, L, K], targets
    a TargetIndex -> [T, 1 + K] (as engine.loss.target_scores gathers them)."""
    b, length = clicks.shape
    rows = torch.cat([clicks.unsqueeze(-1), negatives], dim=-1).reshape(b * length, 1 + negatives.shape[-1])
    return rows.index_select(0, targets.click)


def news_teacher_weights(weights: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Per-news teacher weights from the per-sample ones, for losses that live on news (hidden states, attention):
    a news's weight is the mean weight of the targets that score it (as click or negative); a news no target scores
    (history only) takes the mean over all targets. weights [T, M]; rows [T, C] table rows -> [num_rows, M]."""
    w = weights.detach().float()
    c = rows.shape[1]
    flat = rows.reshape(-1)
    keep = flat >= 0
    sums = w.new_zeros((num_rows, w.shape[1])).index_add_(0, flat[keep], w.repeat_interleave(c, 0)[keep])
    counts = w.new_zeros(num_rows).index_add_(0, flat[keep], torch.ones_like(flat[keep], dtype=w.dtype))
    mean = w.mean(0) if len(w) else w.new_full((w.shape[1],), 1.0 / w.shape[1])
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], mean)


def weighted_news_loss(per_news: list[tuple[torch.Tensor, torch.Tensor]], news_weights: torch.Tensor,
                       targets: int) -> torch.Tensor:
    """A step's news losses as their weighted mean per target: per_news holds (table rows [R], losses [R, M]) of
    every chunk the step encoded with gradients; news_weights [U, M] -> sum_r sum_i w_ri l_ri * targets / R."""
    if not per_news:
        return news_weights.new_zeros(())
    rows = torch.cat([r for r, _ in per_news])
    losses = torch.cat([v for _, v in per_news])
    return (news_weights[rows] * losses).sum() * (targets / max(len(rows), 1))
