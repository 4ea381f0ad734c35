"""How news reach the encoder: token layout (one concatenated sequence, or BusLM segments), the frequency
embedding of refined text, the frozen-prefix cache, and the call itself.

Every workflow and the evaluation go through :class:`NewsInputs`, so that training and evaluation
always feed a news the same way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from speedyrec.data.token_store import TokenStore
from speedyrec.engine.host_sync import to_device
from speedyrec.models.frozen_prefix import FrozenCachePlace, FrozenPrefixCache
from speedyrec.models.recommender import frequency_embeddings


@dataclass
class NewsTokens:
    """Padded encoder inputs of U news: [U, T] (concatenated) or [U, S, T] (segments)."""

    news: np.ndarray  # int64 [U] news ids of the rows
    input_ids: torch.Tensor
    mask: torch.Tensor  # True on real tokens, which come first in every row (segment)
    counts: torch.Tensor | None = None  # word counts of refined tokens (0 = special or padding)
    # int64 [U] (or [U, S]): real tokens of each row (segment), kept on the host, so that widths and token counts
    # never have to be read back from the device; None: not known (read from the mask)
    lengths: np.ndarray | None = None
    vocab: np.ndarray | None = None  # int64, sorted: the distinct token ids of input_ids, on the host

    def to(self, device: torch.device) -> "NewsTokens":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return NewsTokens(self.news, move(self.input_ids), move(self.mask), move(self.counts), self.lengths,
                          self.vocab)

    def row_lengths(self) -> np.ndarray:
        """Real tokens of each row (segment), from the host copy when there is one (else a read of the mask)."""
        return self.lengths if self.lengths is not None else self.mask.sum(-1).cpu().numpy()


class NewsInputs:
    def __init__(self, store: TokenStore, segments: list[str] | None = None):
        self.store = store
        self.segments = segments  # None: one concatenated sequence per news
        self.frozen: FrozenPrefixCache | None = None

    def lengths(self, news: np.ndarray) -> np.ndarray:
        """Real tokens of each news in its layout (specials included), for batching and chunking."""
        if self.segments is None:
            return self.store.lengths(news)
        return self.store.segment_lengths(news, self.segments).sum(axis=1).clip(min=2)

    @property
    def max_len(self) -> int:
        """Tokens of a news padded to the fixed maximum of its fields (the typical workflow's padding)."""
        if self.segments is None:
            return self.store.max_len
        return len(self.segments) * self.store.segment_width(self.segments)

    def prepare(self, news: np.ndarray, width: int | None = None) -> NewsTokens:
        """Token tensors (on CPU) for the given news ids, padded to ``width`` or to the longest."""
        news = np.asarray(news, dtype=np.int64)
        if self.segments is None:
            tb = self.store.concat(news, width)
        else:
            seg_width = None if width is None else self.store.segment_width(self.segments)
            tb = self.store.segments(news, self.segments, seg_width)
        counts = None if tb.counts is None else torch.from_numpy(tb.counts)
        return NewsTokens(news, torch.from_numpy(tb.input_ids), torch.from_numpy(tb.mask), counts,
                          tb.mask.sum(-1).astype(np.int64), np.unique(tb.input_ids))

    @staticmethod
    def word_vocabulary(model, tokens: NewsTokens):
        """A context for one step's encoder calls on rows of ``tokens``: the word embeddings they need are gathered
        once (BertFamilyBackbone.word_vocabulary) where that helps, i.e. where the word embeddings train."""
        backbone = getattr(getattr(model, "news_encoder", None), "backbone", None)
        table = getattr(getattr(backbone, "embeddings", None), "word_embeddings", None)
        if tokens.vocab is None or not hasattr(backbone, "word_vocabulary") or table is None \
                or not table.weight.requires_grad:
            return contextlib.nullcontext()
        return backbone.word_vocabulary(tokens.vocab)

    def enable_frozen_prefix(self, hidden: int, place: FrozenCachePlace, name: str) -> None:
        """Cache the frozen layers' output of every news, in the node's cache ``name`` at ``place``."""
        self.frozen = place.open(self.lengths(np.arange(self.store.num_news)), hidden, name)

    def close_frozen_prefix(self) -> None:
        if self.frozen is not None:
            self.frozen.close()
            self.frozen = None

    @staticmethod
    def select(tokens: NewsTokens, rows: np.ndarray | None = None, trim: bool = True) -> NewsTokens:
        """The given rows of ``tokens`` (all when None), trimmed to their longest unless ``trim`` is off."""
        ids, mask, counts, news = tokens.input_ids, tokens.mask, tokens.counts, tokens.news
        lengths = tokens.row_lengths()
        if rows is not None:
            r = to_device(rows, ids.device)
            ids, mask = ids.index_select(0, r), mask.index_select(0, r)
            counts = None if counts is None else counts.index_select(0, r)
            news, lengths = news[rows], lengths[rows]
        if trim:
            width = max(int(lengths.max(initial=0)), 1)
            ids, mask = ids[..., :width], mask[..., :width]
            counts = None if counts is None else counts[..., :width]
        return NewsTokens(news, ids, mask, counts, lengths)

    def encode(self, model, tokens: NewsTokens, rows: np.ndarray | None = None, trim: bool = True):
        """Embed the given rows of ``tokens`` (all when None), trimmed to their longest unless ``trim`` is off
        (then at the width ``tokens`` were prepared with).

        Returns (embeddings [R, D], real tokens, padding tokens) of the encoder input.
        """
        sel = self.select(tokens, rows, trim)
        ids, mask, counts, news, lengths = sel.input_ids, sel.mask, sel.counts, sel.news, sel.lengths
        extra = frequency_embeddings(getattr(model, "frequency", None), counts)
        encoder = model.news_encoder
        start = None
        if self.frozen is not None and getattr(encoder.backbone, "freeze_layers", 0) > 0:
            def compute(sel):
                s = to_device(sel, ids.device)
                if lengths.ndim == 1:  # BusLM's segments decide their own padding
                    return encoder.frozen_forward(ids[s], mask[s], bool((lengths[sel] == mask.shape[-1]).all()))
                return encoder.frozen_forward(ids[s], mask[s])
            start = self.frozen.start_states(news, mask, compute, lengths)
        valid = int(lengths.sum())
        computed = encoder.padded_tokens(mask) if hasattr(encoder, "padded_tokens") else mask.numel()
        # whether a row has padding is known here, on the host: the attention then needs no look at the mask
        dense = {"dense": bool((lengths == mask.shape[-1]).all())} if lengths.ndim == 1 else {}
        return encoder(ids, mask, extra_embeddings=extra, start_states=start, **dense), valid, computed - valid
