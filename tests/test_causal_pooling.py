"""Causal (every-prefix) additive attention pooling against slow, obviously-correct references."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speedyrec.kernels.pooling import (additive_attention_logits, additive_attention_pool,
                                       causal_additive_attention_pool, causal_softmax_pool)

LENGTHS = [1, 2, 3, 7, 16, 33, 100]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_params(hidden: int, attn: int, dtype=torch.float64, query_scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(attn, hidden, generator=g, dtype=dtype) / hidden ** 0.5
    bias = torch.randn(attn, generator=g, dtype=dtype) * 0.1
    query = torch.randn(attn, generator=g, dtype=dtype) * query_scale
    return weight, bias, query


def make_mask(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random holes; row 0 starts with masked items, row 1 is all masked, row 2 is all real (where they exist)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=g) > 0.3
    if batch > 0:
        mask[0, : max(1, length // 3)] = False
        if length > 1:
            mask[0, -1] = True
    if batch > 1:
        mask[1] = False
    if batch > 2:
        mask[2] = True
    return mask


def prefix_reference(x, mask, weight, bias, query):
    """out[:, t] = the existing non-causal pool over x[:, :t+1]; L separate calls, so O(L^2) work."""
    return torch.stack([additive_attention_pool(x[:, : t + 1], mask[:, : t + 1], weight, bias, query)
                        for t in range(x.shape[1])], dim=1)


def log_space_reference(x, logits, mask):
    """float64 prefix pooling from explicit logits via logcumsumexp and an L x L weight matrix (tests only).

    Masked logits become -1e4: exp(-1e4 - lse) is exactly 0 in float64 next to any real logit above -9000,
    and prefixes without a real item are zeroed explicitly.
    """
    a = logits.double().masked_fill(~mask, -1e4)
    lse = torch.logcumsumexp(a, dim=1)
    causal = torch.ones(a.shape[1], a.shape[1], dtype=torch.bool, device=a.device).tril()
    w = torch.exp((a[:, None, :] - lse[:, :, None]).masked_fill(~causal, float("-inf")))  # [B, T, I]
    has_real = (mask.cumsum(dim=1) > 0).unsqueeze(-1)
    return (w @ x.double()) * has_real


def upstream_grad(shape, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(*shape, generator=g, dtype=dtype)
    keep = torch.rand(shape[:2], generator=g) > 0.3  # zero upstream gradient at some positions
    return grad * keep.unsqueeze(-1)


def grads_of(fn, tensors, grad_out):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    return out, torch.autograd.grad(out, tensors, grad_out)


@pytest.mark.parametrize("length", LENGTHS)
def test_matches_prefix_reference(length):
    batch, hidden, attn = 5, 6, 7
    x = torch.randn(batch, length, hidden, generator=torch.Generator().manual_seed(length), dtype=torch.float64)
    mask = make_mask(batch, length, seed=length)
    weight, bias, query = make_params(hidden, attn, query_scale=3.0)
    out = causal_additive_attention_pool(x, mask, weight, bias, query)
    assert out.shape == x.shape and out.dtype == x.dtype
    # The reference takes its softmax over L separate calls of the non-causal pool, hence 1e-6 not 1e-12.
    torch.testing.assert_close(out, prefix_reference(x, mask, weight, bias, query), atol=1e-6, rtol=1e-6)
    # ... while against float64 log-space pooling of the same logits it agrees to float64 round-off.
    logits = additive_attention_logits(x, weight, bias, query)
    torch.testing.assert_close(out, log_space_reference(x, logits, mask), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("length", LENGTHS)
def test_gradients_match_prefix_reference(length):
    batch, hidden, attn = 4, 5, 6
    x = torch.randn(batch, length, hidden, generator=torch.Generator().manual_seed(7 + length), dtype=torch.float64)
    mask = make_mask(batch, length, seed=3 + length)
    params = make_params(hidden, attn, query_scale=2.0, seed=length)
    grad_out = upstream_grad(x.shape, seed=length)

    def fast(x_, w_, b_, q_):
        return causal_additive_attention_pool(x_, mask, w_, b_, q_)

    def slow(x_, w_, b_, q_):
        return prefix_reference(x_, mask, w_, b_, q_)

    def exact(x_, w_, b_, q_):
        return log_space_reference(x_, additive_attention_logits(x_, w_, b_, q_), mask)

    _, got = grads_of(fast, [x, *params], grad_out)
    _, want = grads_of(slow, [x, *params], grad_out)
    _, want64 = grads_of(exact, [x, *params], grad_out)
    for name, g, w, w64 in zip(["x", "weight", "bias", "query"], got, want, want64):
        assert torch.isfinite(g).all(), name
        # The prefix reference back-propagates through float32 softmax weights, hence the looser tolerance.
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5, msg=lambda m: f"grad {name}: {m}")
        torch.testing.assert_close(g, w64, atol=1e-11, rtol=1e-11, msg=lambda m: f"grad {name} (float64): {m}")
    # Masked items receive no gradient through the pooling, nor through their (ignored) logits.
    assert (got[0][~mask] == 0).all()


def test_gradcheck_small():
    batch, length, hidden, attn = 3, 6, 3, 4
    g = torch.Generator().manual_seed(11)
    x = torch.randn(batch, length, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, False, True, False, True, True],
                         [False] * 6,
                         [True, False, True, True, False, True]])
    weight, bias, query = (p.requires_grad_() for p in make_params(hidden, attn, query_scale=2.0))
    assert torch.autograd.gradcheck(lambda *t: causal_additive_attention_pool(t[0], mask, *t[1:]),
                                    (x, weight, bias, query))
    logits = torch.randn(batch, length, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, a_: causal_softmax_pool(x_, a_, mask), (x, logits))
    assert torch.autograd.gradcheck(lambda x_, a_: causal_softmax_pool(x_, a_, None), (x, logits))


def test_empty_prefixes_and_all_masked_rows_give_zeros_and_zero_grads():
    length, hidden = 9, 4
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, length, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(3, length, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(3, length, dtype=torch.bool)
    mask[0, 4:] = True  # four leading masked items
    mask[2, 0] = True
    out = causal_softmax_pool(x, logits, mask)
    assert (out[0, :4] == 0).all() and (out[1] == 0).all()
    torch.testing.assert_close(out[2], x[2, :1].expand(length, hidden))  # only item 0 is real
    out.backward(torch.randn(out.shape, generator=g, dtype=out.dtype))
    assert torch.isfinite(x.grad).all() and torch.isfinite(logits.grad).all()
    assert (x.grad[~mask] == 0).all() and (logits.grad[~mask] == 0).all()
    # A single real item has weight 1 whatever its logit: zero up to round-off (x.dx - c r cancels).
    torch.testing.assert_close(logits.grad[2], torch.zeros(length, dtype=torch.float64), atol=1e-12, rtol=0)


def test_masked_items_are_excluded_exactly():
    length, hidden = 12, 5
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, length, hidden, generator=g)
    logits = torch.randn(2, length, generator=g)
    mask = make_mask(2, length, seed=5)
    mask[1, 3] = True
    out = causal_softmax_pool(x, logits, mask)
    x2, logits2 = x.clone(), logits.clone()
    x2[~mask] = 1e6 * torch.randn(int((~mask).sum()), hidden, generator=g)  # any finite padding
    logits2[~mask] = torch.tensor([1e30, float("nan"), -1e30, float("inf")]).repeat(length)[: int((~mask).sum())]
    assert torch.equal(causal_softmax_pool(x2, logits2, mask), out)


def test_mask_none_means_all_real():
    x = torch.randn(3, 10, 4, generator=torch.Generator().manual_seed(10))
    weight, bias, query = make_params(4, 5, dtype=torch.float32)
    full = torch.ones(3, 10, dtype=torch.bool)
    assert torch.equal(causal_additive_attention_pool(x, None, weight, bias, query),
                       causal_additive_attention_pool(x, full, weight, bias, query))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_spanning_hundreds_of_nats(dtype):
    length, hidden = 40, 8
    g = torch.Generator().manual_seed(2)
    head = torch.tensor([-300.0, 0.0, 250.0, -50.0, -290.0, 260.0, 300.0, -300.0, 120.0, 299.0])
    logits = torch.cat([head, (torch.rand(length - len(head), generator=g) * 600 - 300)]).repeat(3, 1)
    logits[1] = logits[1].flip(0)  # decreasing maxima too
    logits[2] = torch.linspace(-300, 300, length)  # a new maximum at every step
    logits = logits.to(dtype)
    x = torch.randn(3, length, hidden, generator=g, dtype=dtype)
    mask = make_mask(3, length, seed=9)
    mask[1] = True
    grad_out = upstream_grad(x.shape, seed=4, dtype=dtype)

    out, (gx, ga) = grads_of(lambda x_, a_: causal_softmax_pool(x_, a_, mask), [x, logits], grad_out)
    ref, (rx, ra) = grads_of(lambda x_, a_: log_space_reference(x_, a_, mask), [x.double(), logits.double()],
                               grad_out.double())
    assert torch.isfinite(out).all() and torch.isfinite(gx).all() and torch.isfinite(ga).all()
    # The reference pools the very same (float32-rounded) logits, so float32 only adds accumulation round-off.
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gx.double(), rx, atol=tol, rtol=tol)
    torch.testing.assert_close(ga.double(), ra, atol=10 * tol, rtol=10 * tol)


def test_wide_logits_through_a_scaled_query():
    batch, length, hidden, attn = 4, 64, 16, 32
    x = torch.randn(batch, length, hidden, generator=torch.Generator().manual_seed(3)) * 3
    mask = make_mask(batch, length, seed=3)
    weight, bias, query = (p.float().requires_grad_() for p in make_params(hidden, attn, query_scale=60.0))
    logits = additive_attention_logits(x, weight, bias, query)
    assert logits.max() - logits.min() > 400  # hundreds of nats within a row
    out = causal_additive_attention_pool(x, mask, weight, bias, query)
    torch.testing.assert_close(out.double(), log_space_reference(x, logits.detach(), mask), atol=1e-5, rtol=1e-5)
    out.backward(upstream_grad(x.shape, dtype=torch.float32))
    assert all(torch.isfinite(p.grad).all() for p in (weight, bias, query))


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 40), scale=st.sampled_from([0.1, 1.0, 30.0, 300.0]), seed=st.integers(0, 2 ** 16),
       p_real=st.floats(0.0, 1.0))
def test_property_matches_log_space_reference(length, scale, seed, p_real):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, length, 4, generator=g, dtype=torch.float64)
    logits = (torch.rand(3, length, generator=g, dtype=torch.float64) * 2 - 1) * scale
    mask = torch.rand(3, length, generator=g) < p_real
    out = causal_softmax_pool(x, logits, mask)
    torch.testing.assert_close(out, log_space_reference(x, logits, mask), atol=1e-10, rtol=1e-10)


def test_last_position_equals_the_non_causal_pool():
    batch, length, hidden, attn = 6, 37, 16, 8
    x = torch.randn(batch, length, hidden, generator=torch.Generator().manual_seed(5))
    mask = make_mask(batch, length, seed=5)
    mask[3, 20:] = False  # a masked tail: the last real item is not the last position
    weight, bias, query = make_params(hidden, attn, dtype=torch.float32, query_scale=3.0)
    out = causal_additive_attention_pool(x, mask, weight, bias, query)
    full = additive_attention_pool(x, mask, weight, bias, query)
    last_real = torch.where(mask.any(dim=1), length - 1 - mask.flip(1).int().argmax(dim=1), length - 1)
    torch.testing.assert_close(out[torch.arange(batch), last_real], full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, -1], full, atol=1e-5, rtol=1e-5)
    assert (full[1] == 0).all() and (out[1] == 0).all()  # the all-masked row


def test_bf16_input_returns_bf16_close_to_float32():
    batch, length, hidden, attn = 4, 50, 32, 16
    x = torch.randn(batch, length, hidden, generator=torch.Generator().manual_seed(6))
    mask = make_mask(batch, length, seed=6)
    weight, bias, query = make_params(hidden, attn, dtype=torch.float32, query_scale=3.0)
    x16 = x.bfloat16().requires_grad_()
    out16 = causal_additive_attention_pool(x16, mask, weight, bias, query)
    assert out16.dtype == torch.bfloat16
    out32 = causal_additive_attention_pool(x16.detach().float(), mask, weight, bias, query)
    # Internally float32 on the bf16 values: only the final rounding to bf16 differs.
    torch.testing.assert_close(out16.float(), out32, atol=0.0, rtol=2 ** -8)
    torch.testing.assert_close(out16.float(), causal_additive_attention_pool(x, mask, weight, bias, query),
                               atol=3e-2, rtol=3e-2)
    out16.float().square().sum().backward()
    assert x16.grad.dtype == torch.bfloat16 and torch.isfinite(x16.grad.float()).all()


def test_logits_and_causal_pooling_stay_float32_under_bf16_autocast():
    """Under bf16 autocast (the GPU path's, and a CPU with native bf16) the item logits are float32 and equal the
    float32 computation, and the causal pooling with them: autocast would otherwise run the projection and the query
    product in bf16 (logits about 1e-2 off), although the docstrings promise float32. Gradients reach the parameters
    in float32 too."""
    batch, length, hidden, attn = 4, 40, 32, 16
    x = torch.randn(batch, length, hidden, generator=torch.Generator().manual_seed(8))
    mask = make_mask(batch, length, seed=8)
    weight, bias, query = (p.requires_grad_() for p in make_params(hidden, attn, dtype=torch.float32, query_scale=3.0))
    want_logits = additive_attention_logits(x, weight, bias, query)
    want_causal = causal_additive_attention_pool(x, mask, weight, bias, query)
    want_pool = additive_attention_pool(x, mask, weight, bias, query)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = additive_attention_logits(x, weight, bias, query)
        causal = causal_additive_attention_pool(x, mask, weight, bias, query)
        pooled = additive_attention_pool(x, mask, weight, bias, query)
    assert logits.dtype == torch.float32 and causal.dtype == torch.float32
    torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(causal, want_causal, atol=1e-6, rtol=1e-6)
    # the non-causal pool's weighted sum is a matmul autocast may run in bf16; its weights are float32
    torch.testing.assert_close(pooled.float(), want_pool, atol=2e-2, rtol=2e-2)
    causal.square().sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in (weight, bias, query))


def test_saved_for_backward_is_linear_in_length():
    """B=8, L=512, H=64: B*L*L would be 8x and log2(L) scan intermediates 9x the B*L*H of x."""
    batch, length, hidden, attn = 8, 512, 64, 64
    g = torch.Generator().manual_seed(12)
    x = torch.randn(batch, length, hidden, generator=g, requires_grad=True)
    mask = make_mask(batch, length)
    weight, bias, query = (p.float().requires_grad_() for p in make_params(hidden, attn))
    logits = additive_attention_logits(x, weight, bias, query)  # its graph is ordinary autograd, outside
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = causal_softmax_pool(x, logits, mask)
    blh = batch * length * hidden
    assert 0 < sum(saved) <= 2 * blh + 4 * batch * length, saved  # x, u and two [B, L] coefficient tensors
    assert max(saved) <= blh
    out.backward(torch.randn(out.shape, generator=g))
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()

    # The whole op: the logits' own graph (x, tanh output [B, L, A], parameters) plus the pooling's.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_additive_attention_pool(x, mask, weight, bias, query)
    bla = batch * length * attn
    assert sum(saved) <= 3 * blh + 2 * bla + 4 * batch * length + 2 * attn * (hidden + 2), saved
    assert max(saved) <= max(blh, bla)


@pytest.mark.parametrize("device", DEVICES)
def test_lengths_and_shapes(device):
    weight, bias, query = (p.float().to(device) for p in make_params(3, 4))
    g = torch.Generator().manual_seed(13)
    for batch, length in [(1, 1), (2, 5), (3, 31), (2, 64), (1, 65), (0, 4), (2, 0)]:
        x = torch.randn(batch, length, 3, generator=g).to(device)
        mask = (torch.rand(batch, length, generator=g) > 0.4).to(device)
        out = causal_additive_attention_pool(x, mask, weight, bias, query)
        assert out.shape == x.shape and out.device == x.device
        if batch and length:
            ref = log_space_reference(x, additive_attention_logits(x, weight, bias, query), mask)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        causal_softmax_pool(torch.randn(2, 5, 3), torch.randn(2, 4))
    with pytest.raises(ValueError):
        causal_softmax_pool(torch.randn(2, 5, 3), torch.randn(2, 5), torch.ones(2, 4, dtype=torch.bool))
