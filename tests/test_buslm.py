"""BusLM: the bus-attention kernel against a by-hand reference, and the segmented news encoder."""
import math

import pytest
import torch

from speedyrec.kernels.bus_attention import bus_attention
from speedyrec.models.backbone import BertFamilyBackbone, random_bert
from speedyrec.models.buslm import BusLMNewsEncoder
from speedyrec.models.recommender import NewsEncoder

CLS, SEP = 2, 3


def _hf(layers=2, model_type="bert", seed=0):
    torch.manual_seed(seed)
    if model_type == "bert":
        return random_bert(dict(hidden=32, layers=layers, heads=4, intermediate=64), vocab_size=100, pad_id=0)
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, pad_token_id=1, max_position_embeddings=64, attn_implementation="sdpa")
    return RobertaModel(cfg, add_pooling_layer=False)


def _buslm(layers=2, freeze_layers=0, model_type="bert", seed=0):
    bb = BertFamilyBackbone(_hf(layers, model_type, seed), freeze_layers=freeze_layers)
    torch.manual_seed(seed + 1)
    return BusLMNewsEncoder(bb, dim=16, attention_dim=8)


# Segment lengths, [CLS] and [SEP] included; 0 = absent segment. Row 3 is a news whose only segment is
# [CLS] [SEP]; row 4 has its only present segment in the middle.
LENGTHS = torch.tensor([[8, 5, 3], [4, 0, 6], [3, 8, 0], [2, 0, 0], [0, 7, 0], [5, 2, 8]])


def _segments(lengths=LENGTHS, t=8, pad_id=0, seed=1):
    """Token ids and mask [N, S, T] laid out as TokenStore.segments does."""
    g = torch.Generator().manual_seed(seed)
    n, s = lengths.shape
    ids = torch.randint(5, 100, (n, s, t), generator=g)
    pos = torch.arange(t)
    mask = pos < lengths[..., None]
    ids[..., 0] = CLS
    ids = torch.where(pos == (lengths - 1).clamp(min=0)[..., None], torch.full_like(ids, SEP), ids)
    return ids.masked_fill(~mask, pad_id), mask


# ---------------------------------------------------------------------------------------- kernel


def _reference_bus_attention(q, k, v, token_mask, present, heads, scale=None):
    """For each news n and present segment j: keys = [own real tokens..., first key of every other present
    segment...]; softmax attention per head, by hand, in float64. Absent segments are left at zero."""
    q, k, v = q.double(), k.double(), v.double()
    n, s, t, h = q.shape
    d = h // heads
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(n, s, t, h, dtype=torch.float64)
    for b in range(n):
        for j in range(s):
            if not present[b, j]:
                continue
            key_list = [k[b, j, i] for i in range(t) if token_mask[b, j, i]]
            val_list = [v[b, j, i] for i in range(t) if token_mask[b, j, i]]
            for other in range(s):
                if other != j and present[b, other]:
                    key_list.append(k[b, other, 0])
                    val_list.append(v[b, other, 0])
            keys, vals = torch.stack(key_list), torch.stack(val_list)
            for a in range(heads):
                sl = slice(a * d, (a + 1) * d)
                scores = q[b, j, :, sl] @ keys[:, sl].T * scale  # [T, keys]
                out[b, j, :, sl] = torch.softmax(scores, dim=-1) @ vals[:, sl]
    return out


@pytest.mark.parametrize("heads,scale", [(1, None), (4, None), (2, 0.3)])
def test_bus_attention_equals_the_explicit_key_list_reference(heads, scale):
    torch.manual_seed(0)
    _, mask = _segments()
    n, s, t = mask.shape
    present = mask.any(-1)
    q, k, v = (torch.randn(n, s, t, 16) for _ in range(3))
    out = bus_attention(q, k, v, mask, present, heads, scale=scale)
    assert out.shape == (n, s, t, 16)  # one row per segment position: no bus rows as queries
    assert torch.isfinite(out).all()  # absent segments included
    ref = _reference_bus_attention(q, k, v, mask, present, heads, scale)
    torch.testing.assert_close(out[present].double(), ref[present], atol=1e-5, rtol=1e-5)


def test_bus_attention_gradients_are_finite_with_absent_segments():
    torch.manual_seed(0)
    _, mask = _segments()
    n, s, t = mask.shape
    q, k, v = (torch.randn(n, s, t, 8, requires_grad=True) for _ in range(3))
    out = bus_attention(q, k, v, mask, mask.any(-1), 2)
    out[mask].sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    # padding keys/values and absent segments receive nothing
    assert torch.equal(k.grad[~mask], torch.zeros_like(k.grad[~mask]))
    assert torch.equal(v.grad[~mask], torch.zeros_like(v.grad[~mask]))


# ---------------------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_one_segment_equals_the_plain_news_encoder(model_type):
    hf = _hf(layers=2, model_type=model_type)
    pad = hf.config.pad_token_id
    plain = NewsEncoder(BertFamilyBackbone(hf), dim=16, attention_dim=8).eval()
    bus = BusLMNewsEncoder.from_news_encoder(plain).eval()
    assert bus.backbone is plain.backbone and bus.pool is plain.pool and bus.proj is plain.proj
    lengths = torch.tensor([12, 5, 2, 9, 12])
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(5, 100, (5, 12), generator=g)
    mask = torch.arange(12)[None] < lengths[:, None]
    ids = ids.masked_fill(~mask, pad)  # rows with padding included
    want = plain(ids, mask)
    got = bus(ids[:, None], mask[:, None])
    assert got.shape == (5, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_segments_exchange_information_through_the_bus_only():
    ids, mask = _segments()
    changed_body = ids.clone()
    news = 0  # all three segments present
    changed_body[news, 2, 1:-1] = torch.where(mask[news, 2, 1:-1], (ids[news, 2, 1:-1] + 7) % 95 + 5, ids[news, 2, 1:-1])
    changed_cls = ids.clone()
    changed_cls[news, 2, 0] = 42

    def seg0(model, x):
        return model.token_states(x, mask)[news, 0][mask[news, 0]]

    with torch.no_grad():
        one = _buslm(layers=1).eval()
        # after one layer, segment 0 sees segment 2 only through its first position (the bus) ...
        assert not torch.allclose(seg0(one, ids), seg0(one, changed_cls))
        torch.testing.assert_close(seg0(one, ids), seg0(one, changed_body))
        # ... and after two, through the bus, every token of segment 2
        two = _buslm(layers=2).eval()
        assert not torch.allclose(seg0(two, ids), seg0(two, changed_body))
        # other news are untouched
        base, other = two.token_states(ids, mask), two.token_states(changed_body, mask)
        torch.testing.assert_close(base[1:][mask[1:]], other[1:][mask[1:]])


def test_padding_and_absent_segments_never_change_anything():
    ids, mask = _segments()
    noisy = torch.where(mask, ids, torch.randint(5, 100, ids.shape, generator=torch.Generator().manual_seed(9)))
    model = _buslm(layers=2).eval()
    with torch.no_grad():
        a, b = model.token_states(ids, mask), model.token_states(noisy, mask)
        torch.testing.assert_close(a[mask], b[mask], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(ids, mask), model(noisy, mask), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pack_groups", [None, 3])
def test_layers_run_on_segment_tokens_only(pack_groups):
    ids, mask = _segments()
    n, s, t = ids.shape
    model = _buslm(layers=2).eval()
    model.pack_groups = pack_groups
    seen = []
    hooks = [layer.intermediate.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
             for layer in model.backbone.layers]
    with torch.no_grad():
        states = model.token_states(ids, mask)
    for hk in hooks:
        hk.remove()
    assert states.shape == (n, s, t, 32)
    if pack_groups is None:
        assert seen == [(n * s, t, 32)] * 2  # the feed-forward never runs on bus rows
        return
    # packed: only present segments, in chunks of their own width, never wider than they need
    per_layer = len(seen) // 2
    assert sum(r for r, _, _ in seen[:per_layer]) == int(mask.any(-1).sum())
    assert sum(r * w for r, w, _ in seen[:per_layer]) == model.padded_tokens(mask) < mask.numel()
    assert model.padded_tokens(mask) - int(mask.sum()) < mask.numel() - int(mask.sum())


@pytest.mark.parametrize("pack_groups", [1, 3, 100])
@pytest.mark.parametrize("freeze", [0, 1])
def test_packed_segments_equal_the_padded_layout(pack_groups, freeze):
    """Packing segments by their own lengths changes no value and no gradient (eval mode: no dropout)."""
    ids, mask = _segments()
    extra = torch.randn(*ids.shape, 32, generator=torch.Generator().manual_seed(4)) * 0.1
    outs, grads = [], []
    for pack in (None, pack_groups):
        model = _buslm(layers=3, freeze_layers=freeze).eval()
        model.pack_groups = pack
        start = model.frozen_forward(ids, mask) if freeze else None
        x = extra.clone().requires_grad_(True)
        out = model(ids, mask, extra_embeddings=x, start_states=start)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([x.grad, *[p.grad for p in model.parameters() if p.requires_grad]])
        if freeze:
            outs.append(start[mask])
    for a, b in zip(outs[: len(outs) // 2], outs[len(outs) // 2:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_extra_embeddings_are_added_before_the_layer_norm():
    ids, mask = _segments()
    other = torch.where(mask, (ids + 11) % 95 + 5, ids)
    other[..., 0] = CLS
    model = _buslm(layers=2).eval()
    words = model.backbone.embeddings.word_embeddings
    with torch.no_grad():
        extra = words(other) - words(ids)
        torch.testing.assert_close(model(ids, mask, extra_embeddings=extra), model(other, mask), atol=1e-5, rtol=1e-5)


def test_frozen_prefix_can_be_reused_and_stops_gradients():
    ids, mask = _segments()
    with torch.no_grad():
        unfrozen = _buslm(layers=2, freeze_layers=0).eval()(ids, mask)
    model = _buslm(layers=2, freeze_layers=1).train()  # same seed: same weights
    start = model.frozen_forward(ids, mask)
    assert start.shape == (*ids.shape, 32) and not start.requires_grad
    assert model.backbone.embeddings.training and model.backbone.layers[0].training  # modes restored
    torch.manual_seed(5)
    a = model(ids, mask)
    torch.manual_seed(5)
    b = model(ids, mask, start_states=start)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    bb = model.backbone
    assert all(p.grad is None for p in bb.embeddings.parameters())
    assert all(p.grad is None for p in bb.layers[0].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.layers[1].parameters())
    with torch.no_grad():  # in eval mode, freezing changes nothing in the values
        torch.testing.assert_close(model.eval()(ids, mask), unfrozen, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no frozen layers"):
        _buslm(layers=2)(ids, mask, start_states=start)


def test_absent_segments_and_empty_news_give_finite_values_and_gradients():
    ids, mask = _segments()
    model = _buslm(layers=2).train()
    torch.manual_seed(0)
    out = model(ids, mask)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # a news made only of [CLS] [SEP] in the first segment, alone in its batch
    model.eval()
    only = model(ids[3:4], mask[3:4])
    assert torch.isfinite(only).all()


def test_gradient_reaches_other_segments_tokens_through_the_bus():
    ids, mask = _segments()
    model = _buslm(layers=2).eval()
    news = 0
    extra = torch.zeros(*ids.shape, 32, requires_grad=True)  # gradient w.r.t. each position's embedding
    states = model.token_states(ids, mask, extra_embeddings=extra)
    vec0 = model.segment_vectors(states, mask)[news, 0]
    vec0.pow(2).sum().backward()
    g = extra.grad.abs().sum(-1)  # [N, S, T]
    for seg in (1, 2):
        assert (g[news, seg][mask[news, seg]] > 0).all(), seg  # every real token of the other segments
    assert (g[~mask] == 0).all()  # never padding
    assert (g[1:] == 0).all()  # never other news
