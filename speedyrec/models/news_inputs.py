"""How news reach the encoder: token layout (one concatenated sequence, or BusLM segments) and the call.

Every workflow and the evaluation go through :class:`NewsInputs`, so that training and evaluation
always feed a news the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from speedyrec.data.token_store import TokenStore


@dataclass
class NewsTokens:
    """Padded encoder inputs of U news: [U, T] (concatenated) or [U, S, T] (segments)."""

    input_ids: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device) -> "NewsTokens":
        return NewsTokens(self.input_ids.to(device, non_blocking=True), self.mask.to(device, non_blocking=True))


class NewsInputs:
    def __init__(self, store: TokenStore, segments: list[str] | None = None):
        self.store = store
        self.segments = segments  # None: one concatenated sequence per news

    def lengths(self, news: np.ndarray) -> np.ndarray:
        """Tokens a news costs in its layout (specials included), for batching and chunking."""
        if self.segments is None:
            return self.store.lengths(news)
        seg = self.store.segment_lengths(news, self.segments)
        return np.maximum(seg, 0).sum(axis=1).clip(min=2)

    def prepare(self, news: np.ndarray, width: int | None = None) -> NewsTokens:
        """Token tensors (on CPU) for the given news ids, padded to ``width`` or to the longest."""
        if self.segments is None:
            tb = self.store.concat(news, width)
        else:
            tb = self.store.segments(news, self.segments, None if width is None else self._segment_width())
        return NewsTokens(torch.from_numpy(tb.input_ids), torch.from_numpy(tb.mask))

    def _segment_width(self) -> int:
        return max(self.store.fields[f].max_tokens for f in self.segments)

    def encode(self, news_encoder, tokens: NewsTokens, rows: np.ndarray | torch.Tensor | None = None):
        """Embed the given rows of ``tokens`` (all rows when None), trimmed to their longest.

        Returns (embeddings [R, D], valid tokens, padded tokens) where the counts are of the encoder input.
        """
        ids, mask = tokens.input_ids, tokens.mask
        if rows is not None:
            r = torch.as_tensor(rows, device=ids.device)
            ids, mask = ids.index_select(0, r), mask.index_select(0, r)
        if self.segments is None:
            width = int(mask.sum(-1).max()) if mask.numel() else 1
            ids, mask = ids[:, :width], mask[:, :width]
        else:
            width = int(mask.sum(-1).max()) if mask.numel() else 1
            ids, mask = ids[..., :width], mask[..., :width]
        valid = int(mask.sum())
        return news_encoder(ids, mask), valid, mask.numel() - valid
