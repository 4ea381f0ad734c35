"""Additive attention pooling (Wu et al.'s "attention network"): a learned query scores each item.

``logit_i = q . tanh(W x_i + b)``; the pooled vector is the softmax(logit)-weighted sum of the items.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def additive_attention_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              query: torch.Tensor) -> torch.Tensor:
    """Scores of the items: x [..., L, H], weight [A, H], bias [A], query [A] -> [..., L]."""
    return torch.tanh(F.linear(x, weight, bias)) @ query


def additive_attention_pool(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            query: torch.Tensor) -> torch.Tensor:
    """Pool x [B, L, H] over L where mask [B, L] is True -> [B, H].

    A row whose mask is all False pools to zeros (the caller decides what an empty row means).
    """
    logits = additive_attention_logits(x, weight, bias, query).float()
    logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # all-masked rows: softmax of all -inf
    return torch.einsum("bl,blh->bh", weights.to(x.dtype), x)
