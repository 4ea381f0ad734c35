"""The frozen-prefix cache: reusing the frozen layers' output changes nothing but the cost."""
from pathlib import Path

import numpy as np
import pytest
import torch

from speedyrec.data.token_store import FieldTokens, TokenStore
from speedyrec.models.backbone import BertFamilyBackbone, random_bert
from speedyrec.models.buslm import BusLMNewsEncoder
from speedyrec.models import frozen_prefix
from speedyrec.models.frozen_prefix import FrozenCachePlace, cache_bytes
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.models.recommender import NewsRecommender


def _place(tmp_path, dtype=torch.float32):
    return FrozenCachePlace(tmp_path, dtype, maker=True, active=False)


def _store(n=30, seed=0):
    rng = np.random.default_rng(seed)
    fields = {}
    for name, top in (("title", 12), ("abstract", 9)):
        lengths = rng.integers(0 if name == "abstract" else 1, top - 1, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        fields[name] = FieldTokens(rng.integers(5, 90, int(offsets[-1])).astype(np.int32), offsets, top)
    return TokenStore(fields, 1, 2, 0)


@pytest.mark.parametrize("segments", [None, ["title", "abstract"]])
def test_cached_frozen_prefix_equals_recomputing_it(tmp_path, segments):
    torch.manual_seed(0)
    hf = random_bert(dict(hidden=32, layers=3, heads=4, intermediate=64), vocab_size=100, pad_id=0)
    model = NewsRecommender(BertFamilyBackbone(hf, freeze_layers=2), dim=16, attention_dim=8)
    if segments:
        model.news_encoder = BusLMNewsEncoder.from_news_encoder(model.news_encoder)
    model.eval()
    store = _store()
    plain = NewsInputs(store, segments)
    cached = NewsInputs(store, segments)
    cached.enable_frozen_prefix(32, _place(tmp_path), "frozen")
    rng = np.random.default_rng(1)
    for _ in range(4):  # overlapping batches: later ones are served from the cache
        news = rng.integers(0, 30, 12)
        tokens = plain.prepare(news)
        with torch.no_grad():
            a, _, _ = plain.encode(model, tokens)
            b, _, _ = cached.encode(model, tokens)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    frozen = cached.frozen
    assert frozen.computed == frozen.stored.sum()  # every news computed once
    assert frozen.hits > 0
    frozen.close()
    assert not (tmp_path / "frozen.npy").exists()


def test_gradients_reach_only_the_trainable_layers(tmp_path):
    torch.manual_seed(0)
    hf = random_bert(dict(hidden=32, layers=2, heads=4, intermediate=64), vocab_size=100, pad_id=0, dropout=0.0)
    model = NewsRecommender(BertFamilyBackbone(hf, freeze_layers=1), dim=16, attention_dim=8).train()
    inputs = NewsInputs(_store())
    inputs.enable_frozen_prefix(32, _place(tmp_path), "frozen")
    tokens = inputs.prepare(np.arange(10))
    inputs.encode(model, tokens)[0].sum().backward()  # fills the cache
    g1 = model.news_encoder.backbone.layers[1].output.dense.weight.grad.clone()
    model.zero_grad()
    inputs.encode(model, tokens)[0].sum().backward()  # served from the cache
    torch.testing.assert_close(model.news_encoder.backbone.layers[1].output.dense.weight.grad, g1)
    assert model.news_encoder.backbone.layers[0].output.dense.weight.grad is None


def _states_fn(hidden, calls):
    """A stand-in for the frozen layers: a fixed function of (news, position), recording which rows it computed."""
    def make(news, width):
        def compute(rows):
            calls.append(np.asarray(news)[rows].tolist())
            n = torch.as_tensor(np.asarray(news)[rows], dtype=torch.float32)[:, None, None]
            pos = torch.arange(width, dtype=torch.float32)[None, :, None]
            h = torch.arange(hidden, dtype=torch.float32)[None, None, :]
            return torch.sin(n * 1.7 + pos * 0.31 + h * 0.013) * (1.0 + n / 7)
        return compute
    return make


def _mask(lengths, width):
    return torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]


def test_bf16_cache_serves_the_same_rounded_states_computed_or_read_back(tmp_path):
    """Stored in bf16 (the compute dtype under autocast): a news gets its states rounded to bf16 the first time (from
    the computation) and every later time (from the file), bit for bit; padding stays zero; a hit computes nothing."""
    hidden, width = 8, 6
    real = np.array([3, 6, 1, 4, 2])
    cache = _place(tmp_path, torch.bfloat16).open(real, hidden, "c")
    calls = []
    make = _states_fn(hidden, calls)
    news = np.array([2, 0, 2, 4])  # news 2 twice: computed once
    mask = _mask(real[news], width)
    first = cache.start_states(news, mask, make(news, width), real[news])
    assert calls == [[0, 2, 4]]
    want = make(news, width)(np.arange(len(news))).to(torch.bfloat16).float() * mask[..., None]
    assert torch.equal(first, want)
    assert cache.computed == 3 and cache.hits == 0
    again = cache.start_states(news, mask, make(news, width), real[news])
    assert len(calls) == 2 and torch.equal(again, first)  # only the reference call above ran
    assert cache.hits == 4 and cache.computed == 3
    assert cache.states.dtype == np.int16  # bf16's bits
    cache.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_files_take_what_the_size_formula_says(tmp_path, dtype):
    """real tokens x hidden x bytes of the dtype, plus 4 bytes per news (the README's formula)."""
    real = np.array([5, 0, 7, 3, 11])
    cache = _place(tmp_path, dtype).open(real, 16, "c")
    want = cache_bytes(int(real.sum()), 16, len(real), dtype)
    assert want == 26 * 16 * (2 if dtype == torch.bfloat16 else 4) + 4 * 5
    on_disk = cache.path.stat().st_size + cache.stamp_path.stat().st_size
    assert want <= on_disk <= want + 2 * 128  # each .npy file has a header of at most 128 bytes here
    cache.close()
    assert not cache.path.exists() and not cache.stamp_path.exists()
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "takes real tokens of all news × hidden × 2 bytes in bf16 (4 in fp32) + 4 bytes per news" in readme


def test_a_node_s_ranks_read_each_other_s_rows_only_after_a_synchronizing_round(tmp_path, monkeypatch):
    """Two ranks of a node map one cache. Rows another rank wrote are read only once this rank has completed the
    synchronizing round after the write (speedyrec.models.frozen_prefix); before, the rank computes them itself and
    does not store them. After it, nothing is computed twice and both serve the same states."""
    monkeypatch.setattr(frozen_prefix, "SYNC_ROUNDS", [0])
    hidden, width = 4, 5
    real = np.array([2, 5, 3, 4])
    a = _place(tmp_path).open(real, hidden, "c")  # the node's first rank makes the files
    b = FrozenCachePlace(tmp_path, torch.float32, maker=False, active=False).open(real, hidden, "c")
    calls_a, calls_b = [], []
    news = np.array([0, 1, 3])
    mask = _mask(real[news], width)
    got_a = a.start_states(news, mask, _states_fn(hidden, calls_a)(news, width), real[news])
    assert calls_a == [[0, 1, 3]] and a.stored[[0, 1, 3]].all()
    # the same round: b may not trust a's rows yet
    got_b = b.start_states(news, mask, _states_fn(hidden, calls_b)(news, width), real[news])
    assert calls_b == [[0, 1, 3]] and b.pending == 3 and b.fills == 0 and b.hits == 0
    assert torch.equal(got_a, got_b)
    frozen_prefix.SYNC_ROUNDS[0] += 1  # both ranks completed a synchronizing collective
    news2 = np.array([3, 2, 0])
    mask2 = _mask(real[news2], width)
    got_b2 = b.start_states(news2, mask2, _states_fn(hidden, calls_b)(news2, width), real[news2])
    assert calls_b[1:] == [[2]] and b.hits == 2 and b.fills == 1  # only the news nobody had written
    got_a2 = a.start_states(news2, mask2, _states_fn(hidden, calls_a)(news2, width), real[news2])
    assert calls_a[1:] == [[2]] and a.pending == 1  # b wrote news 2 in this round: a computes it, stores nothing
    assert torch.equal(got_a2, got_b2)
    frozen_prefix.SYNC_ROUNDS[0] += 1
    got_a3 = a.start_states(news2, mask2, _states_fn(hidden, calls_a)(news2, width), real[news2])
    assert len(calls_a) == 2 and torch.equal(got_a3, got_a2)  # all read from the file now
    b.close()
    assert a.path.exists()  # the maker's files stay until the maker closes
    a.close()
    assert not a.path.exists()


def test_a_node_s_cache_made_for_other_news_is_refused(tmp_path):
    _place(tmp_path).open(np.array([2, 3]), 4, "c")
    with pytest.raises(RuntimeError, match="other news or settings"):
        FrozenCachePlace(tmp_path, torch.float32, maker=False, active=False).open(np.array([2, 3, 1]), 4, "c")
