"""Self-attention over padded sequences on PyTorch SDPA (flash / memory-efficient kernels where available)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from speedyrec.kernels.dropout import fast_dropout


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, T, H] -> [N, heads, T, H / heads]."""
    n, t, h = x.shape
    return x.view(n, t, heads, h // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[N, heads, T, d] -> [N, T, heads * d]."""
    n, a, t, d = x.shape
    return x.transpose(1, 2).reshape(n, t, a * d)


def padded_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                          heads: int, dropout_p: float = 0.0, scale: float | None = None,
                          check_dense: bool = True) -> torch.Tensor:
    """Multi-head attention of q [N, T, H] over k, v [N, S, H]; key_mask [N, S] True on real keys (None: all real).

    Every row must have at least one real key. Returns [N, T, H]. ``check_dense``: drop a mask that is all True
    (the unmasked kernels are faster), which reads it back from the device; a caller that knows whether its rows
    are padded passes None or the mask and check_dense=False.
    """
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    mask = None
    if key_mask is not None and not (check_dense and bool(key_mask.all())):
        mask = key_mask[:, None, None, :]
    if qh.device.type == "cpu" and qh.dtype == torch.bfloat16:
        out = explicit_attention(qh, kh, vh, mask, dropout_p, scale)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return merge_heads(out)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v over heads: q [N, A, T, d], k, v [N, A, S, d], mask broadcastable to
    [N, A, T, S] (True = attend) -> [N, A, T, d]; the softmax in float32 at least, dropout on its weights
    (kernels/dropout.py).

    What SDPA's math path computes, written out: on a CPU in bf16 it runs 1.2-1.8x faster than SDPA with dropout
    (measured on MiniLM's shapes, 16 to 256 tokens), and SDPA without dropout picks a flash kernel whose bf16
    backward is about 15x slower than this (54 ms against 3.3 ms for 2,048 tokens of 12 heads)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(compute) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = fast_dropout(torch.softmax(scores, dim=-1), dropout_p)
    return torch.matmul(weights.to(v.dtype), v)
