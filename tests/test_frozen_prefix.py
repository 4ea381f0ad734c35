"""The frozen-prefix cache: reusing the frozen layers' output changes nothing but the cost."""
import numpy as np
import pytest
import torch

from speedyrec.data.token_store import FieldTokens, TokenStore
from speedyrec.models.backbone import BertFamilyBackbone, random_bert
from speedyrec.models.buslm import BusLMNewsEncoder
from speedyrec.models.news_inputs import NewsInputs
from speedyrec.models.recommender import NewsRecommender


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
    cached.enable_frozen_prefix(32, tmp_path / "frozen.npy")
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
    inputs.enable_frozen_prefix(32, tmp_path / "frozen.npy")
    tokens = inputs.prepare(np.arange(10))
    inputs.encode(model, tokens)[0].sum().backward()  # fills the cache
    g1 = model.news_encoder.backbone.layers[1].output.dense.weight.grad.clone()
    model.zero_grad()
    inputs.encode(model, tokens)[0].sum().backward()  # served from the cache
    torch.testing.assert_close(model.news_encoder.backbone.layers[1].output.dense.weight.grad, g1)
    assert model.news_encoder.backbone.layers[0].output.dense.weight.grad is None
