"""Deterministic splits by a hash of the row number (independent of file order elsewhere)."""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, vectorised over uint64."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hash_split(
    n: int, fractions: tuple[float, ...] = (0.6, 0.2, 0.2), seed: int = 0
) -> list[np.ndarray]:
    """Row indices of each part: row i goes to the part where ``u_i = hash(i, seed) / 2^64``
    falls in the cumulative fractions.

    Example:
        >>> parts = hash_split(1000, (0.6, 0.2, 0.2))
        >>> [len(p) for p in parts], sorted(np.concatenate(parts).tolist()) == list(range(1000))
        ([600, 208, 192], True)
    """
    with np.errstate(over="ignore"):
        keys = np.arange(n, dtype=np.uint64) ^ (np.uint64(seed) * _M2)
    u = (splitmix64(keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    edges = np.cumsum(fractions)[:-1]
    part = np.searchsorted(edges, u, side="right")
    return [np.flatnonzero(part == k) for k in range(len(fractions))]
