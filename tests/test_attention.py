"""Self-attention over padded rows: the explicit form used on CPUs in bf16 equals PyTorch's SDPA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speedyrec.kernels.attention import explicit_attention, padded_self_attention, split_heads


def _inputs(dtype, n=6, t=9, h=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, t, h, generator=g, dtype=dtype) for _ in range(3))
    lengths = torch.tensor([9, 1, 4, 9, 7, 2])[:n]
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explicit_attention_equals_sdpa_with_and_without_a_mask(dtype):
    q, k, v, mask = _inputs(dtype)
    qh, kh, vh = (split_heads(x.clone().requires_grad_(), 4) for x in (q, k, v))
    for m in (None, mask[:, None, None, :]):
        ours = explicit_attention(qh, kh, vh, m)
        ref = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=m)
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(ours.to(dtype), ref, atol=tol, rtol=tol)
        g1 = torch.autograd.grad(ours.square().sum(), (qh, kh, vh))
        g2 = torch.autograd.grad(ref.square().sum(), (qh, kh, vh))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol)


def test_bf16_on_a_cpu_goes_the_explicit_way_and_stays_close_to_float32():
    q, k, v, mask = _inputs(torch.float32)
    ref = padded_self_attention(q, k, v, mask, heads=4)
    out = padded_self_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, heads=4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what a layer under autocast hands it
        lin = torch.nn.Linear(16, 16)
        out = padded_self_attention(lin(q), lin(k), lin(v), mask, heads=4)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_dropout_falls_on_the_attention_weights():
    """Uniform weights (q = 0) over S real keys, one-hot values: every output entry is a weight, 1/S kept and scaled
    by 1/(1 - p), or dropped; about p of them are dropped."""
    torch.manual_seed(0)
    n, heads, s, p = 200, 2, 8, 0.3
    q = torch.zeros(n, heads, s, 8)
    k = torch.randn(n, heads, s, 8)
    v = torch.eye(s)[None, None].expand(n, heads, s, s).contiguous()
    out = explicit_attention(q, k, v, None, dropout_p=p)
    kept = 1.0 / s / (1 - p)
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(kept)))
    assert abs((out == 0).float().mean().item() - p) < 0.02
