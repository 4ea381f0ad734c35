"""A trained news encoder as a Hugging Face model folder that loads anywhere, without speedyrec.

``save_news_encoder(model, tokenizer, folder)`` writes

- the transformer, as ``save_pretrained`` writes it (``config.json``, ``model.safetensors``; the layers the
  model kept, e.g. 2 for a 2-layer student), and its tokenizer: ``transformers.AutoModel.from_pretrained(folder)``
  and ``AutoTokenizer.from_pretrained(folder)`` load them offline, and ``model.encoder=<folder>`` trains it again;
- ``news_head.safetensors`` and ``user_encoder.safetensors``: the attention pooling and projection that turn the
  transformer's token states into news vectors, and the user encoder that pools a history of news vectors;
- ``speedyrec_head.py``: a small standalone module (torch and safetensors only) that applies them, documented
  with the few lines a user needs; ``speedyrec.json``: the dimensions and where the model came from.

What a plain transformer cannot reproduce is refused: BusLM's segmented encoding and refined text with its
frequency embedding encode news in ways of speedyrec's own; a custom or non-BERT encoder has no HF layers here.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from safetensors.torch import save_file

from speedyrec.config import ConfigError
from speedyrec.engine.safe_io import write_bytes
from speedyrec.models.backbone import BertFamilyBackbone

HEAD_MODULE = '''"""The heads of a news encoder exported by speedyrec: token states -> news vectors, news vectors -> a user vector.

    import torch
    from transformers import AutoModel, AutoTokenizer
    from speedyrec_head import load_heads   # this file, from the exported folder

    folder = "export/news_encoder"
    tokenizer, plm = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    news_head, user_head = load_heads(folder)
    batch = tokenizer(["first title", "second title"], padding=True, return_tensors="pt")
    with torch.no_grad():
        news = news_head(plm(**batch).last_hidden_state, batch["attention_mask"])   # [2, dim]
        user = user_head(news[None], torch.ones(1, 2, dtype=torch.bool))               # a history of 2 news
    scores = news @ user[0]                                                             # click scores

Both heads are additive attention pooling (a learned query scores each item: q . tanh(W x + b); the items are
summed with the softmax of the scores, padding left out); the news head then projects to the vector size. A user
with an empty history gets the learned ``empty`` vector. Only torch and safetensors are needed here.
"""
from pathlib import Path

import torch
from safetensors.torch import load_file


def attention_pool(x, mask, weight, bias, query):
    """x [B, L, H], mask [B, L] (true for real items) -> [B, H]; scores in float32; an all-padding row gives zeros."""
    scores = torch.tanh(x.float() @ weight.float().t() + bias.float()) @ query.float()
    weights = torch.softmax(scores.masked_fill(~mask.bool(), float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bl,blh->bh", weights.to(x.dtype), x)


class _Head(torch.nn.Module):
    def __init__(self, tensors):
        super().__init__()
        self.t = dict(tensors)

    def pool(self, x, mask):
        t = self.t
        return attention_pool(x, mask, t["pool.proj.weight"], t["pool.proj.bias"], t["pool.query"])


class NewsHead(_Head):
    def forward(self, token_states, attention_mask):
        """token_states [N, T, H] (the transformer's last_hidden_state), attention_mask [N, T] -> [N, dim]."""
        return self.pool(token_states, attention_mask) @ self.t["proj.weight"].t() + self.t["proj.bias"]


class UserHead(_Head):
    def forward(self, history, mask):
        """history [B, L, dim] (news vectors, oldest first), mask [B, L] -> user vectors [B, dim]."""
        pooled = self.pool(history, mask)
        empty = ~mask.bool().any(dim=1, keepdim=True)
        return torch.where(empty, self.t["empty"].to(pooled.dtype).expand_as(pooled), pooled)


def load_heads(folder):
    folder = Path(folder)
    return NewsHead(load_file(folder / "news_head.safetensors")), UserHead(load_file(folder / "user_encoder.safetensors"))
'''


def save_news_encoder(model, tokenizer, folder: Path, about: dict | None = None) -> Path:
    """Write ``model``'s news encoder (a NewsRecommender's) and user encoder to ``folder``; returns the folder."""
    if getattr(model, "frequency", None) is not None:
        raise ConfigError("a model trained on refined text (engine.refine) adds a frequency embedding a plain "
                          "transformer does not have: it cannot be exported as a Hugging Face model")
    news = model.news_encoder
    backbone = news.backbone
    if not isinstance(backbone, BertFamilyBackbone) or not hasattr(tokenizer, "save_pretrained"):
        raise ConfigError(f"only a BERT-family Hugging Face encoder is exported as a model folder; this one is "
                          f"{type(backbone).__name__}")
    from transformers import AutoModel

    config = copy.deepcopy(backbone.config)
    config.num_hidden_layers = len(backbone.layers)
    try:
        hf = AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        hf = AutoModel.from_config(config)
    state = {f"embeddings.{k}": v for k, v in backbone.embeddings.state_dict().items()}
    state.update({f"encoder.layer.{i}.{k}": v for i, layer in enumerate(backbone.layers)
                  for k, v in layer.state_dict().items()})
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("pooler.")]:
        raise ConfigError(f"the encoder's weights do not fit {type(hf).__name__}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder, safe_serialization=True)
    _with_special_tokens(tokenizer).save_pretrained(folder)
    head = {f"pool.{k}": v for k, v in news.pool.state_dict().items()}
    head.update({f"proj.{k}": v for k, v in news.proj.state_dict().items()})
    save_file({k: v.detach().float().cpu().contiguous() for k, v in head.items()}, folder / "news_head.safetensors")
    user = {f"pool.{k}": v for k, v in model.user_encoder.pool.state_dict().items()}
    user["empty"] = model.user_encoder.empty
    save_file({k: v.detach().float().cpu().contiguous() for k, v in user.items()}, folder / "user_encoder.safetensors")
    write_bytes(folder / "speedyrec_head.py", HEAD_MODULE.encode())
    info = {"dim": news.proj.out_features, "attention_dim": news.pool.proj.out_features,
            "layers": len(backbone.layers), "hidden_size": backbone.hidden_size, "model_type": config.model_type,
            "usage": "see speedyrec_head.py", **(about or {})}
    write_bytes(folder / "speedyrec.json", (json.dumps(info, indent=2) + "\n").encode())
    return folder


def _with_special_tokens(tokenizer):
    """The tokenizer as users call it: ``tokenizer(text)`` gives [CLS] text [SEP], as speedyrec lays out a news
    (it adds them itself). A WordPiece tokenizer speedyrec trained for a random encoder has no such template:
    a copy gets BERT's."""
    probe = tokenizer("a")["input_ids"]
    if tokenizer.cls_token_id is None or (probe and probe[0] == tokenizer.cls_token_id):
        return tokenizer
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    cls, sep = tok.cls_token, tok.sep_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, tok.cls_token_id), (sep, tok.sep_token_id)])
    return tok


def export_news_encoder(cfg, model, tokenizer, folder: Path, about: dict) -> dict:
    """``save_news_encoder`` for a run's model -> {"path"}, or {"skipped": why} for a model a plain transformer
    cannot reproduce (said in the caller's summary, never an error that loses the run's other outputs)."""
    if cfg.engine.buslm:
        return {"skipped": "engine.buslm encodes news in segments a plain transformer does not"}
    try:
        return {"path": str(save_news_encoder(model, tokenizer, folder, {"encoder": cfg.model.encoder, **about}))}
    except ConfigError as e:
        return {"skipped": str(e)}
