"""Ragged integer arrays in CSR form: one flat values array and row offsets."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Ragged:
    """Rows of variable length: row i is ``values[offsets[i]:offsets[i+1]]``."""

    offsets: np.ndarray  # int64 [R + 1]
    values: np.ndarray  # [offsets[-1]]

    @classmethod
    def from_lists(cls, rows: list, dtype=np.int32) -> "Ragged":
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((v for r in rows for v in r), dtype=dtype, count=int(offsets[-1]))
        return cls(offsets, values)

    @classmethod
    def from_lengths(cls, lengths: np.ndarray, values: np.ndarray) -> "Ragged":
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        assert offsets[-1] == len(values)
        return cls(offsets, values)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray) -> "Ragged":
        """The given rows, in that order, as a new Ragged. Gathered in pieces of about TAKE_PIECE values, so that
        the positions a piece builds (24 bytes a value at most) stay small however large the take."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        at = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=at[1:])
        total = int(at[-1])
        if total <= TAKE_PIECE:
            return Ragged(at, self.values[ragged_positions(starts, ends)])
        out = np.empty(total, dtype=self.values.dtype)
        cuts = np.searchsorted(at, np.arange(TAKE_PIECE, total, TAKE_PIECE), side="right")
        for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(rows)].tolist()):
            out[at[a]:at[b]] = self.values[ragged_positions(starts[a:b], ends[a:b])]
        return Ragged(at, out)

    def row_ids(self) -> np.ndarray:
        """For each value, the row it belongs to (int64 [len(values)])."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.lengths())

    def padded(self, width: int, fill: int = -1, keep: str = "last") -> np.ndarray:
        """Rows as a [R, width] matrix, left-aligned, cut to ``width`` keeping the first or last items."""
        starts, ends = self.offsets[:-1], self.offsets[1:]
        if keep == "last":
            starts = np.maximum(starts, ends - width)
        else:
            ends = np.minimum(ends, starts + width)
        return gather_padded(self.values, starts, ends, width, fill)


TAKE_PIECE = 1 << 22  # values one piece of Ragged.take gathers


def ragged_positions(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, e)`` for every (s, e) pair, without a Python loop."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    positions = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    positions += np.arange(total, dtype=positions.dtype)
    return positions


def gather_padded(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int, fill: int) -> np.ndarray:
    """Rows ``values[s:e]`` as a left-aligned [R, width] matrix padded with ``fill`` (e - s <= width)."""
    lengths = ends - starts
    assert (lengths <= width).all()
    out = np.full((len(starts), width), fill, dtype=values.dtype)
    cols = np.arange(width)[None, :]
    mask = cols < lengths[:, None]
    out[mask] = values[(starts[:, None] + cols)[mask]]
    return out
