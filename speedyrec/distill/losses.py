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
def momentum_gradients(student_layers: list[nn.Module], teacher_layers: list[nn.Module], beta: float) -> None:
    """NewsBERT momentum distillation: g_s <- (1 - beta) g_s + beta * mean of the gradients of the teacher
    block (K consecutive teacher layers) that student layer i stands for, parameter by parameter."""
    n = len(student_layers)
    k = len(teacher_layers) // n
    for i, layer in enumerate(student_layers):
        block = teacher_layers[i * k : (i + 1) * k]
        for name, p in layer.named_parameters():
            if p.grad is None:
                continue
            grads = [dict(t.named_parameters())[name].grad for t in block]
            if any(g is None for g in grads):
                raise RuntimeError(f"momentum distillation: teacher block {i} has no gradient for {name}")
            p.grad.mul_(1.0 - beta).add_(torch.stack(grads).mean(0), alpha=beta)
