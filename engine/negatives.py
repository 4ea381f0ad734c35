"""Negative sampling shared by both workflows: impression non-clicks first, random news to fill up."""
from __future__ import annotations

import numpy as np

from speedyrec.engine.ragged import Ragged, ragged_positions


def sample_negatives(pools: Ragged, k: int, positives: np.ndarray, num_news: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """For each row, k negatives: a random subset of the row's pool (without replacement) and, when the
    pool holds fewer than k, random news of the corpus other than the row's positive.

    pools: R rows of candidate negatives; positives [R]. Returns (negatives int64 [R, k], random fills).
    """
    r = len(pools)
    out = np.empty((r, k), dtype=np.int64)
    lengths = pools.lengths()
    if len(pools.values):
        # A random key per pool entry; the k smallest keys of a row are a uniform subset of it.
        keys = rng.random(len(pools.values))
        row = pools.row_ids()
        order = np.lexsort((keys, row))
        rank_in_row = np.arange(len(order)) - np.repeat(pools.offsets[:-1], lengths)
        chosen = order[rank_in_row < k]
        take = np.minimum(lengths, k)
        cols = ragged_positions(np.zeros(r, dtype=np.int64), take)
        out[np.repeat(np.arange(r), take), cols] = pools.values[chosen]
    else:
        take = np.zeros(r, dtype=np.int64)
    fill_mask = np.arange(k)[None, :] >= take[:, None]
    n_fill = int(fill_mask.sum())
    if n_fill:
        if num_news < 2:
            raise ValueError("negative sampling needs at least two news in the corpus")
        pos = np.broadcast_to(positives[:, None], (r, k))[fill_mask]
        draw = rng.integers(0, num_news, n_fill)
        clash = draw == pos
        while clash.any():
            draw[clash] = rng.integers(0, num_news, int(clash.sum()))
            clash = draw == pos
        out[fill_mask] = draw
    return out, n_fill
