"""Counter-based randomness: uniform numbers that are a pure function of (seed, keys).

Sampling decisions (negatives, cache lookups) hash the identity of what they decide about instead of
drawing from a stateful generator, so they do not depend on the number of ranks, on how sequences were
batched, or on which rank asks: two ranks deciding about the same news at the same step agree.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection on uint64 with good avalanche)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash64(*keys) -> np.ndarray:
    """A uint64 hash of the element-wise tuple of integer keys (scalars or broadcastable arrays)."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x243F6A8885A308D3)
        for k in keys:
            k = np.asarray(k).astype(np.uint64)
            h = _mix(h + _GOLDEN + k * _GOLDEN)  # combine, then mix
    return np.asarray(h)


def hash_uniform(*keys) -> np.ndarray:
    """Uniform floats in [0, 1) from integer keys (53 random bits)."""
    return (hash64(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def hash_below(n: int, *keys) -> np.ndarray:
    """Uniform integers in [0, n) from integer keys."""
    return (hash64(*keys) % np.uint64(n)).astype(np.int64)
