"""Self-attention with a bus between the segments of one news (BusLM, SpeedyFeed section 4.1.3 / appendix A).

Every news is split into S segments of T padded positions. Inside one layer, each segment attends to

* its own T tokens (padding masked), and
* the *bus*: the first position ([CLS]) of every segment of the same news.

The bus enters the keys and the values only. The queries are the segment's own T tokens, so a segment's
output has exactly T rows and no attention or feed-forward work is spent on bus rows. Two bus entries
are masked out for segment j:

* its own (its [CLS] is already the first of its token keys; keeping it would count that key twice, and
  masking it is what makes a one-segment BusLM exactly the plain encoder), and
* those of absent segments (``segment_present`` False).

Projections are computed once for all N*S*T positions by the caller; the bus keys/values are the rows
``k[:, :, 0]`` / ``v[:, :, 0]`` of those projections, gathered here, never recomputed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _append_bus(x: torch.Tensor) -> torch.Tensor:
    """[N, S, T, H] -> [N, S, T + S, H]: every segment's rows followed by the S first rows of its news."""
    n, s, _, h = x.shape
    bus = x[:, :, 0]  # [N, S, H]
    return torch.cat([x, bus[:, None].expand(n, s, s, h)], dim=2)


def bus_key_mask(token_mask: torch.Tensor, segment_present: torch.Tensor) -> torch.Tensor:
    """Key mask [N, S, T + S] of :func:`bus_attention`: True where segment j may attend.

    Entries ``[..., :T]`` are the segment's own token mask; entries ``[..., T + i]`` are the bus entry of
    segment i, kept when i is present and i != j. An absent segment (and, defensively, any row that would
    otherwise have no key at all) attends to its own first key only: its output is meaningless but finite.
    """
    n, s, t = token_mask.shape
    token_mask = token_mask.bool()
    present = segment_present.bool()
    not_self = ~torch.eye(s, dtype=torch.bool, device=token_mask.device)
    bus = present[:, None, :] & not_self  # [N, S (attending segment j), S (bus entry i)]
    key_mask = torch.cat([token_mask, bus], dim=-1)
    first_only = torch.zeros(t + s, dtype=torch.bool, device=token_mask.device)
    first_only[0] = True
    key_mask = torch.where(present[..., None], key_mask, first_only)
    return key_mask | (first_only & ~key_mask.any(dim=-1, keepdim=True))


def bus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_mask: torch.Tensor,
                  segment_present: torch.Tensor, heads: int, dropout_p: float = 0.0,
                  scale: float | None = None) -> torch.Tensor:
    """Multi-head attention of each segment over its own tokens plus the bus of its news.

    Args:
        q, k, v: per-segment projections [N, S, T, H] (H = heads * head_dim).
        token_mask: [N, S, T], True on real tokens of present segments.
        segment_present: [N, S], True for segments that exist.
        heads: number of attention heads.
        dropout_p: dropout on the attention probabilities (pass 0 in eval mode).
        scale: softmax scale; default 1 / sqrt(head_dim).

    Returns:
        [N, S, T, H]: one output row per token position of every segment (queries are the segment's own
        positions only). Rows of absent segments are finite but meaningless; rows at padding positions of
        present segments are well defined (they attend like any query) and are to be masked by the caller.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [N, S, T, H]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    n, s, t, h = q.shape
    if tuple(token_mask.shape) != (n, s, t) or tuple(segment_present.shape) != (n, s):
        raise ValueError(f"token_mask must be [N, S, T] = {(n, s, t)} and segment_present [N, S] = {(n, s)}; got "
                         f"{tuple(token_mask.shape)} and {tuple(segment_present.shape)}")
    if h % heads:
        raise ValueError(f"hidden size {h} is not a multiple of heads={heads}")
    d = h // heads
    keys = _append_bus(k).reshape(n * s, t + s, heads, d).transpose(1, 2)
    values = _append_bus(v).reshape(n * s, t + s, heads, d).transpose(1, 2)
    queries = q.reshape(n * s, t, heads, d).transpose(1, 2)
    mask = bus_key_mask(token_mask, segment_present).reshape(n * s, 1, 1, t + s)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).reshape(n, s, t, h)


def bus_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_mask: torch.Tensor,
                       bus_k: torch.Tensor, bus_v: torch.Tensor, bus_mask: torch.Tensor, heads: int,
                       dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """:func:`bus_attention` for segments given as rows of any width (packed by length, not by news).

    Args:
        q, k, v: [R, T, H] projections of R present segments, T their (shared) padded width.
        token_mask: [R, T], True on real tokens; every row must hold at least one (its [CLS]).
        bus_k, bus_v: [R, S, H] the bus seen by each row: the first-token key/value of every segment of its news.
        bus_mask: [R, S], True where the row may attend to that bus entry (present and not itself).
    Returns [R, T, H].
    """
    r, t, h = q.shape
    s = bus_k.shape[1]
    if h % heads:
        raise ValueError(f"hidden size {h} is not a multiple of heads={heads}")
    d = h // heads
    keys = torch.cat([k, bus_k.to(k.dtype)], dim=1).reshape(r, t + s, heads, d).transpose(1, 2)
    values = torch.cat([v, bus_v.to(v.dtype)], dim=1).reshape(r, t + s, heads, d).transpose(1, 2)
    queries = q.reshape(r, t, heads, d).transpose(1, 2)
    mask = torch.cat([token_mask.bool(), bus_mask.bool()], dim=1).reshape(r, 1, 1, t + s)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).reshape(r, t, h)
