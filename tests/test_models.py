"""The news/user encoders against slow, obvious references."""
import pytest
import torch

from speedyrec.config import ConfigError, load_config
from speedyrec.kernels.pooling import additive_attention_pool
from speedyrec.models.backbone import BertFamilyBackbone, parse_encoder_spec, random_bert
from speedyrec.models.recommender import NewsRecommender, UserEncoder


def _tiny_bert(layers=3, model_type="bert"):
    torch.manual_seed(0)
    if model_type == "bert":
        return random_bert(dict(hidden=32, layers=layers, heads=4, intermediate=64), vocab_size=100, pad_id=0)
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, pad_token_id=1, max_position_embeddings=64, attn_implementation="sdpa")
    return RobertaModel(cfg, add_pooling_layer=False)


def _batch(n=5, t=9, pad_id=0):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (n, t), generator=g)
    lengths = torch.tensor([9, 3, 6, 1, 2])[:n]
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, pad_id), mask


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_layer_runner_equals_the_hf_forward(model_type):
    hf = _tiny_bert(model_type=model_type).eval()
    pad = hf.config.pad_token_id
    ids, mask = _batch(pad_id=pad)
    if model_type == "roberta":
        ids = ids.clamp(min=2).masked_fill(~mask, pad)
    ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    ours = BertFamilyBackbone(hf).eval()(ids, mask)
    torch.testing.assert_close(ours[mask], ref[mask], atol=1e-5, rtol=1e-5)


def test_keeping_the_first_layers_equals_a_shallower_model():
    hf = _tiny_bert(layers=3).eval()
    ids, mask = _batch()
    two = BertFamilyBackbone(hf, layers=2).eval()(ids, mask)
    hf.encoder.layer = hf.encoder.layer[:2]
    ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(two[mask], ref[mask], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="only 2 layers"):
        BertFamilyBackbone(hf, layers=3)


def test_freezing_stops_gradients_and_frozen_outputs_can_be_reused():
    hf = _tiny_bert(layers=3)
    bb = BertFamilyBackbone(hf, freeze_layers=2).train()
    ids, mask = _batch()
    assert not any(p.requires_grad for p in bb.embeddings.parameters())
    assert not any(p.requires_grad for p in bb.layers[1].parameters())
    assert all(p.requires_grad for p in bb.layers[2].parameters())
    start = bb.frozen_forward(ids, mask)
    assert not start.requires_grad
    torch.manual_seed(3)
    a = bb(ids, mask)
    torch.manual_seed(3)
    b = bb(ids, mask, start_states=start)
    torch.testing.assert_close(a, b)
    a[mask].sum().backward()
    assert bb.layers[2].output.dense.weight.grad is not None
    assert bb.layers[0].output.dense.weight.grad is None


def test_masked_pooling_equals_pooling_the_real_items_only():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7, [1, 0, 0, 0, 0, 0, 0], [0] * 7], dtype=torch.bool)
    w, b, q = torch.randn(5, 8), torch.randn(5), torch.randn(5)
    out = additive_attention_pool(x, mask, w, b, q)
    for i in range(3):
        xi = x[i, mask[i]]
        a = torch.softmax(torch.tanh(xi @ w.T + b) @ q, dim=0)
        torch.testing.assert_close(out[i], (a[:, None] * xi).sum(0))
    assert torch.equal(out[3], torch.zeros(8))
    # padding content never matters
    out2 = additive_attention_pool(x.masked_fill(~mask[..., None], 1e4), mask, w, b, q)
    torch.testing.assert_close(out, out2)


def test_user_encoder_uses_a_learned_vector_for_an_empty_history():
    torch.manual_seed(0)
    enc = UserEncoder(8, 4)
    with torch.no_grad():
        enc.empty.copy_(torch.arange(8.0))
    h = torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    u = enc(h, mask)
    assert torch.equal(u[1], torch.arange(8.0))
    assert not torch.equal(u[0], torch.arange(8.0))


def test_news_vectors_do_not_depend_on_padding_width():
    hf = _tiny_bert().eval()
    model = NewsRecommender(BertFamilyBackbone(hf), dim=16, attention_dim=8).eval()
    ids, mask = _batch()
    wide_ids = torch.cat([ids, torch.zeros(5, 7, dtype=torch.long)], 1)
    wide_mask = torch.cat([mask, torch.zeros(5, 7, dtype=torch.bool)], 1)
    torch.testing.assert_close(model.news_encoder(ids, mask), model.news_encoder(wide_ids, wide_mask), atol=1e-5, rtol=1e-5)


def test_encoder_specs():
    assert parse_encoder_spec("random:hidden=64,layers=2").shape["hidden"] == 64
    assert parse_encoder_spec("mypkg.encoders:MyEncoder").kind == "custom"
    assert parse_encoder_spec("bert-base-uncased").kind == "hf"
    assert parse_encoder_spec("/some/local/dir").kind == "hf"
    with pytest.raises(ConfigError, match="random:hidden"):
        parse_encoder_spec("random:width=3")


class CharEncoder(torch.nn.Module):
    """A user-supplied encoder following the documented protocol (used by the test below)."""

    def __init__(self, model_config):
        super().__init__()
        from speedyrec.models.backbone import train_wordpiece_tokenizer
        import tempfile, pathlib

        self.tokenizer = train_wordpiece_tokenizer(["some words for a vocabulary"] * 3, 60,
                                                   pathlib.Path(tempfile.mkdtemp()) / "t.json")
        self.hidden_size = 12
        self.emb = torch.nn.Embedding(len(self.tokenizer), 12)

    def forward(self, input_ids, mask):
        return self.emb(input_ids)


def test_a_user_class_plugs_in():
    from speedyrec.build import build_tokenizer
    from speedyrec.engine.distributed import DistInfo

    cfg = load_config(None, ["model.encoder=tests.test_models:CharEncoder"])
    parts = build_tokenizer(cfg, None, DistInfo())
    assert type(parts.backbone).__name__ == "CharEncoder"  # imported by its dotted name, a second module object
    model = NewsRecommender(parts.backbone, dim=8, attention_dim=4)
    ids, mask = _batch()
    assert model.news_encoder(ids.clamp(max=len(parts.tokenizer) - 1), mask).shape == (5, 8)


@pytest.mark.parametrize("buslm", [False, True])
@pytest.mark.parametrize("freeze", [0, 1, 3])
def test_the_frequency_embedding_trains_whatever_is_frozen(freeze, buslm):
    """Refined text's frequency embedding must receive gradients with no layer, some layers or every layer
    frozen (it once sat inside the no-grad frozen prefix and never trained), and the frozen-prefix cache path
    (start_states) must give what the plain path gives."""
    from speedyrec.models.buslm import BusLMNewsEncoder

    model = NewsRecommender(BertFamilyBackbone(_tiny_bert(layers=3), freeze_layers=freeze), 16, 8,
                            frequency_embedding=True).eval()
    ids, mask = _batch()
    counts = torch.randint(1, 16, ids.shape, generator=torch.Generator().manual_seed(2)).masked_fill(~mask, 0)
    enc = model.news_encoder
    if buslm:
        enc = BusLMNewsEncoder.from_news_encoder(enc).eval()
        ids, mask, counts = ids.view(5, 1, 9).repeat(1, 2, 1), mask.view(5, 1, 9).repeat(1, 2, 1), counts.view(5, 1, 9).repeat(1, 2, 1)
    torch.nn.init.normal_(model.frequency.weight, std=0.5)
    out = enc(ids, mask, extra_embeddings=model.frequency(counts))
    assert not torch.allclose(out, enc(ids, mask))  # it changes the news vectors
    if freeze:
        start = enc.frozen_forward(ids, mask)
        torch.testing.assert_close(enc(ids, mask, extra_embeddings=model.frequency(counts), start_states=start), out)
    out.pow(2).sum().backward()
    grad = model.frequency.weight.grad
    assert grad is not None and grad[1:].abs().sum() > 0  # row 0 (specials, padding) is the padding index
