"""Additive attention pooling (Wu et al.'s "attention network"): a learned query scores each item.

``logit_i = q . tanh(W x_i + b)``; the pooled vector is the softmax(logit)-weighted sum of the items.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def additive_attention_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              query: torch.Tensor) -> torch.Tensor:
    """Scores of the items: x [..., L, H], weight [A, H], bias [A], query [A] -> [..., L], in float32 at least
    (float64 stays float64), also under autocast, which would otherwise run the projection and the query product
    in bf16: the softmax over the items is only as sharp as its logits."""
    compute = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        hidden = torch.tanh(F.linear(x.to(compute), weight.to(compute), bias.to(compute)))
        return hidden @ query.to(compute)


def additive_attention_pool(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            query: torch.Tensor) -> torch.Tensor:
    """Pool x [B, L, H] over L where mask [B, L] is True -> [B, H].

    A row whose mask is all False pools to zeros (the caller decides what an empty row means).
    """
    logits = additive_attention_logits(x, weight, bias, query)
    logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # all-masked rows: softmax of all -inf
    return torch.einsum("bl,blh->bh", weights.to(x.dtype), x)


# ---------------------------------------------------------------------------------------------------------------
# Causal (prefix) pooling: the pooled vector after every prefix of a sequence, in O(B*L*H) memory.
#
# Because an item's logit does not depend on the query position, prefix t pools with the weights
# w[t, i] = exp(a_i - lse_t) for real i <= t, where lse_t = log sum_{j <= t, real} exp(a_j). The pooled vectors
# obey the normalised ("online softmax") recurrence
#     u_t = delta_t * u_{t-1} + c_t * x_t,   c_t = exp(a_t - lse_t),   delta_t = exp(lse_{t-1} - lse_t),
# a linear recurrence whose decays and input weights all lie in [0, 1], so a log-step scan over it neither
# overflows nor underflows to 0/0, whatever the spread of the logits. c and delta are derived from the running
# max m_t = cummax(a) and Z_t = sum_{i <= t} exp(a_i - m_t) (itself a scalar scan with decays exp(m_{t-1} - m_t)),
# never from differences of large lse values: every exponent is an exact m-relative quantity, which keeps float32
# accurate even when the logits are hundreds of nats wide.
# ---------------------------------------------------------------------------------------------------------------


def _linear_scan_(decay: torch.Tensor, h: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Solve a first-order linear recurrence along dim 1 in place, in ceil(log2 L) vectorised steps.

    decay [B, L], h [B, L, C] (the inputs; overwritten with the result, which is returned).
    Forward:  h_t <- decay_t * h_{t-1} + h_t   (decay_0 is ignored).
    Reverse:  h_t <- decay_t * h_{t+1} + h_t   (decay_{L-1} is ignored).
    This is a Hillis-Steele scan: after the step with stride s, h_t holds the recurrence started 2s positions
    back and ``d`` the product of the 2s decays that link them. Decays in [0, 1] keep every product in [0, 1].
    """
    d = decay.clone()
    length = h.shape[1]
    s = 1
    while s < length:
        if reverse:
            h[:, :-s].add_(d[:, :-s, None] * h[:, s:])  # the product is a fresh tensor: no read/write overlap
            if 2 * s < length:
                d[:, :-s] = d[:, :-s] * d[:, s:]
        else:
            h[:, s:].add_(d[:, s:, None] * h[:, :-s])
            if 2 * s < length:
                d[:, s:] = d[:, s:] * d[:, :-s]
        s *= 2
    return h


def _prefix_softmax_coefficients(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, L] (float), mask [B, L] bool -> (c, delta), both [B, L] in [0, 1].

    c_t = exp(a_t - lse_t) for a real item t, else 0; delta_t = exp(lse_{t-1} - lse_t) where prefix t-1 holds a
    real item, else 0 (then u_{t-1} = 0 and the decay is irrelevant). Masked items are excluded exactly: their
    logits are ignored (they may be anything, NaN included) and their c is exactly 0.
    """
    has_real = mask.cumsum(dim=1) > 0  # prefix t holds at least one real item
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    run_max = torch.cummax(torch.where(mask, logits, neg_inf), dim=1).values
    run_max = torch.where(has_real, run_max, torch.zeros_like(run_max))  # finite everywhere from here on
    # e_t = exp(a_t - m_t) <= 1 exactly (m is an exact running max); 0 for masked items.
    e = torch.exp(torch.where(mask, logits - run_max, neg_inf))
    # d_t = exp(m_{t-1} - m_t) <= 1 rescales the running sum when the max grows; 0 after an empty prefix.
    step = torch.zeros_like(run_max)
    step[:, 1:] = torch.where(has_real[:, :-1], (run_max[:, :-1] - run_max[:, 1:]).clamp_max(0.0), neg_inf)
    d = torch.exp(step)
    # Z_t = sum_{i <= t} exp(a_i - m_t), in [1, t + 1] on non-empty prefixes (the max item contributes 1).
    z = _linear_scan_(d, e.unsqueeze(-1).clone()).squeeze(-1)
    z_safe = torch.where(has_real, z, torch.ones_like(z))
    c = e / z_safe
    # delta_t = exp(lse_{t-1} - lse_t) = d_t * Z_{t-1} / Z_t (0 when Z_{t-1} = 0, i.e. an empty prefix).
    delta = torch.zeros_like(c)
    delta[:, 1:] = d[:, 1:] * z[:, :-1] / z_safe[:, 1:]
    return c, delta.clamp_(max=1.0)


class _CausalSoftmaxPool(torch.autograd.Function):
    """u[b, t] = sum_{i <= t} softmax over the real items of the prefix (logits) times x[b, i], analytic backward.

    Backward, with G_t = dLoss/du_t (derivation: du_t/da_i = w[t, i] (x_i - u_t), du_t/dx_i = w[t, i] I, and
    w[t, i] = c_i * exp(lse_i - lse_t) = c_i * delta_{i+1} * ... * delta_t):
        dx_i = c_i * R_i,  R_i = sum_{t >= i} exp(lse_i - lse_t) G_t = G_i + delta_{i+1} R_{i+1}
        da_i = x_i . dx_i - c_i * r_i,  r_i the same reverse recurrence applied to g_t = G_t . u_t
    Only x, u, c and delta are saved: 2*B*L*H + 2*B*L elements, whatever L is.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c, delta = _prefix_softmax_coefficients(logits, mask)
        u = _linear_scan_(delta, c.unsqueeze(-1) * x)
        ctx.save_for_backward(x, u, c, delta)
        return u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_u: torch.Tensor):
        x, u, c, delta = ctx.saved_tensors
        hidden = x.shape[-1]
        # One reverse scan over [G, G . u]: H + 1 channels share the decays.
        acc = torch.empty(*x.shape[:-1], hidden + 1, dtype=x.dtype, device=x.device)
        acc[..., :hidden] = grad_u
        acc[..., hidden] = (grad_u * u).sum(-1)
        rev_decay = torch.zeros_like(delta)
        rev_decay[:, :-1] = delta[:, 1:]  # links position i to i + 1: exp(lse_i - lse_{i+1})
        acc = _linear_scan_(rev_decay, acc, reverse=True)
        grad_x = c.unsqueeze(-1) * acc[..., :hidden]
        grad_logits = (x * grad_x).sum(-1) - c * acc[..., hidden]
        return grad_x, grad_logits, None


def causal_softmax_pool(x: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax pooling of every prefix: x [B, L, H], logits [B, L], mask [B, L] (True = real; None = all real).

    Returns [B, L, H] in x's dtype, where out[b, t] = sum over real i <= t of softmax(logits over the real items
    of the prefix)_i * x[b, i]; a prefix without a real item gives zeros (and passes no gradient). Computed in
    float32 at least (float64 stays float64). Memory O(B*L*H) in forward and backward; no L x L tensor.
    Masked items must hold finite values (their weight is exactly 0, and 0 * inf would be NaN).
    """
    if x.dim() != 3 or logits.shape != x.shape[:2]:
        raise ValueError(f"expected x [B, L, H] and logits [B, L], got {tuple(x.shape)} and {tuple(logits.shape)}")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    elif mask.shape != x.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match x {tuple(x.shape)}")
    compute = torch.promote_types(x.dtype, torch.float32)
    out = _CausalSoftmaxPool.apply(x.to(compute), logits.to(compute), mask.to(torch.bool))
    return out.to(x.dtype)


def causal_additive_attention_pool(x: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
                                   bias: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Additive attention pooling of every prefix: x [B, L, H], mask [B, L] (True = real item; None = all real),
    weight [A, H], bias [A], query [A] -> [B, L, H] in x's dtype.

    out[b, t] equals ``additive_attention_pool(x[:, :t+1], mask[:, :t+1], ...)[b]``: it pools
    {x[b, i] : i <= t and mask[b, i]}; positions whose prefix holds no real item give zeros. Logits and pooling run
    in float32 at least. Gradients reach weight / bias / query through the logits (ordinary autograd) and x both
    through the logits and through the pooling (analytic backward, O(B*L*H) memory).
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)  # shared by the logits and the pooling, so a bf16 x is upcast once
    logits = additive_attention_logits(xc, weight, bias, query)
    return causal_softmax_pool(xc, logits, mask).to(x.dtype)
