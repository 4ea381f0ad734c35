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

from speedyrec.engine.host_sync import to_device


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
        self.fills = 0  # calls that computed and stored new news (each reads their states back to the host)

    def close(self) -> None:
        del self.states
        try:
            os.remove(self.path)
        except OSError:
            pass

    def start_states(self, news: np.ndarray, mask: torch.Tensor, compute, lengths: np.ndarray | None = None) -> torch.Tensor:
        """Frozen-layer output for news [R] whose padded mask is ``mask`` ([R, T] or [R, S, T]; real tokens first in
        every row or segment).

        ``compute(rows) -> [len(rows), *mask.shape[1:], H]`` runs the frozen layers for the given rows of
        the batch; it is called only for news not stored yet. ``lengths`` ([R] or [R, S]): the real tokens of each
        row or segment, known on the host (None: read from the mask). Returns [R, *mask.shape[1:], H] on mask's
        device. The real tokens' positions come from the host lengths, so storing and serving are index operations:
        the only read from the device is the new news' states, which this host-memory cache must hold.
        """
        news = np.asarray(news, dtype=np.int64)
        device = mask.device
        if lengths is None:
            lengths = mask.sum(-1).cpu().numpy()
        width = mask.shape[-1]
        if len(news) == 0:
            return torch.zeros((*mask.shape, self.hidden), dtype=torch.float32, device=device)
        # flat positions of the real tokens in [R * S * T], news after news in layout order
        seg = np.asarray(lengths, dtype=np.int64).reshape(-1)
        starts = np.arange(len(seg), dtype=np.int64) * width
        real = _ranges(starts, starts + seg)
        out = torch.zeros((*mask.shape, self.hidden), dtype=torch.float32, device=device)
        flat = out.view(-1, self.hidden)
        new = np.flatnonzero(~self.stored[news])
        new = new[np.unique(news[new], return_index=True)[1]]  # one computation per distinct news
        if len(new):
            fresh = compute(new).float().reshape(-1, self.hidden)  # [len(new) * S * T, H]
            # the new rows' real tokens, in the computed tensor's own (row by row) layout
            sub = seg.reshape(len(news), -1)[new].reshape(-1)
            sub_starts = np.arange(len(sub), dtype=np.int64) * width
            picked = fresh.index_select(0, to_device(_ranges(sub_starts, sub_starts + sub), device))
            dst = _ranges(self.offsets[news[new]], self.offsets[news[new] + 1])
            assert len(dst) == len(picked), "token layout changed since the cache was sized"
            self.states[dst] = picked.cpu().numpy()
            self.stored[news[new]] = True
            self.computed += len(new)
            self.fills += 1
        self.hits += len(news) - len(new)
        src = _ranges(self.offsets[news], self.offsets[news + 1])
        assert len(src) == len(real), "token layout changed since the cache was sized"
        rows = torch.from_numpy(np.ascontiguousarray(self.states[src])).to(device, non_blocking=True)
        flat.index_copy_(0, to_device(real, device), rows)
        return out


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    from speedyrec.engine.ragged import ragged_positions

    return ragged_positions(starts, ends)
