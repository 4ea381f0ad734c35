"""The frozen-prefix cache: the output of the frozen layers for each news, computed once per run.

With ``model.freeze_layers=K`` the embeddings and the first K layers never change, and they run in eval
mode (no dropout), so their output for a news is a pure function of its tokens. It is computed the first
time a news is encoded and read back afterwards, so a step runs only the trainable layers.

Storage: one flat float32 array of the news' real-token states [total tokens, H] in a file-backed memory
map (news at fixed offsets, ``stored`` marks which are filled). The operating system keeps what is hot in
RAM and spills the rest to disk, so memory stays bounded however large the corpus.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


class FrozenPrefixCache:
    def __init__(self, real_tokens: np.ndarray, hidden: int, path: Path):
        """real_tokens [num_news]: real tokens of each news in its encoder layout (mask.sum())."""
        self.offsets = np.zeros(len(real_tokens) + 1, dtype=np.int64)
        np.cumsum(real_tokens, out=self.offsets[1:])
        self.hidden = hidden
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        rows = max(int(self.offsets[-1]), 1)
        self.states = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, hidden))
        self.stored = np.zeros(len(real_tokens), dtype=bool)
        self.hits = 0
        self.computed = 0

    def close(self) -> None:
        del self.states
        try:
            os.remove(self.path)
        except OSError:
            pass

    def start_states(self, news: np.ndarray, mask: torch.Tensor, compute) -> torch.Tensor:
        """Frozen-layer output for news [R] whose padded mask is ``mask`` ([R, T] or [R, S, T]).

        ``compute(rows) -> [len(rows), *mask.shape[1:], H]`` runs the frozen layers for the given rows of
        the batch; it is called only for news not stored yet. Returns [R, *mask.shape[1:], H] on mask's device.
        """
        news = np.asarray(news, dtype=np.int64)
        device = mask.device
        out = torch.zeros((*mask.shape, self.hidden), dtype=torch.float32, device=device)
        new = np.flatnonzero(~self.stored[news])
        new = new[np.unique(news[new], return_index=True)[1]]  # one computation per distinct news
        if len(new):
            fresh = compute(new).float()
            sel = mask[torch.from_numpy(new).to(device)]
            flat = fresh[sel].cpu().numpy()  # real tokens, news after news, in layout order
            dst = _ranges(self.offsets[news[new]], self.offsets[news[new] + 1])
            assert len(dst) == len(flat), "token layout changed since the cache was sized"
            self.states[dst] = flat
            self.stored[news[new]] = True
            self.computed += len(new)
        self.hits += len(news) - len(new)
        src = _ranges(self.offsets[news], self.offsets[news + 1])
        out[mask] = torch.from_numpy(np.ascontiguousarray(self.states[src])).to(device, non_blocking=True)
        return out


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    from speedyrec.engine.ragged import ragged_positions

    return ragged_positions(starts, ends)
