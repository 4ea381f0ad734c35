"""Negative sampling: impression non-clicks first, random news of the corpus to fill up.

Randomness is hashed from (seed, row key), so a row gets the same negatives whatever rank or batch it
lands in.
"""
from __future__ import annotations

import numpy as np

from speedyrec.engine.hashing import hash_below, hash_uniform
from speedyrec.engine.ragged import Ragged, ragged_positions


def sample_negatives(pools: Ragged, k: int, positives: np.ndarray, num_news: int, seed: int,
                     row_keys: np.ndarray, fill_cdf: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """For each row, k negatives: a uniform subset of the row's pool (without replacement; entries equal to
    the row's positive are skipped) and, when the pool holds fewer than k, uniform random news of the
    corpus other than the row's positive.

    pools: R rows of candidate negatives; positives [R]; row_keys [R] distinct integers naming the rows
    (e.g. a global click index) so that the draw is a pure function of (seed, row key).
    Returns (negatives int64 [R, k], random fills per row int64 [R]).
    """
    r = len(pools)
    row_keys = np.asarray(row_keys, dtype=np.int64)
    out = np.empty((r, k), dtype=np.int64)
    same = pools.values == np.repeat(positives, pools.lengths())
    if same.any():  # a pool entry equal to the clicked news is no negative
        pools = Ragged.from_lengths(np.bincount(pools.row_ids()[~same], minlength=r), pools.values[~same])
    lengths = pools.lengths()
    take = np.minimum(lengths, k)
    if len(pools.values):
        row = pools.row_ids()
        within = np.arange(len(pools.values)) - np.repeat(pools.offsets[:-1], lengths)
        keys = hash_uniform(seed, 1, row_keys[row], within)
        order = np.lexsort((keys, row))  # by row, then by key: the first k of a row are a uniform subset
        rank_in_row = np.arange(len(order)) - np.repeat(pools.offsets[:-1], lengths)
        chosen = order[rank_in_row < k]
        cols = ragged_positions(np.zeros(r, dtype=np.int64), take)
        out[np.repeat(np.arange(r), take), cols] = pools.values[chosen]
    fill_rows, fill_cols = np.nonzero(np.arange(k)[None, :] >= take[:, None])
    if len(fill_rows):
        if num_news < 2:
            raise ValueError("negative sampling needs at least two news in the corpus")
        pos = positives[fill_rows]

        def draw_news(rows, cols, attempt):
            if fill_cdf is None:
                return hash_below(num_news, seed, 2, row_keys[rows], cols, attempt)
            u = hash_uniform(seed, 2, row_keys[rows], cols, attempt) * fill_cdf[-1]
            return np.minimum(np.searchsorted(fill_cdf, u, side="right"), num_news - 1)

        attempt = 0
        draw = draw_news(fill_rows, fill_cols, attempt)
        clash = draw == pos
        while clash.any():  # redraw the (rare) picks of the positive itself
            attempt += 1
            draw[clash] = draw_news(fill_rows[clash], fill_cols[clash], attempt)
            clash = draw == pos
            if attempt > 1000:  # a distribution concentrated on the positive: fall back to uniform
                draw[clash] = (pos[clash] + 1 + hash_below(num_news - 1, seed, 3, row_keys[fill_rows[clash]])) % num_news
                break
        out[fill_rows, fill_cols] = draw
    return out, k - take
