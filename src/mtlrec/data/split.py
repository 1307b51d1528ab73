"""Deterministic splits by a hash of the row number (independent of file order elsewhere), or of
the group id when the schema has a ``group_column`` (a request's candidates stay together)."""

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


def hash_part(
    rows: np.ndarray, fractions: tuple[float, ...] = (0.6, 0.2, 0.2), seed: int = 0
) -> np.ndarray:
    """The part (0, 1, 2, ...) of each 0-based row number: ``u = hash(row, seed) / 2^64`` falls
    in the cumulative fractions. A row's part depends only on its number, so a file read in
    chunks is split exactly as when read whole."""
    with np.errstate(over="ignore"):
        keys = rows.astype(np.uint64) ^ (np.uint64(seed) * _M2)
    u = (splitmix64(keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    edges = np.cumsum(fractions)[:-1]
    return np.searchsorted(edges, u, side="right")


def hash_split(
    n: int, fractions: tuple[float, ...] = (0.6, 0.2, 0.2), seed: int = 0
) -> list[np.ndarray]:
    """Row indices of each part (see :func:`hash_part`).

    Example:
        >>> parts = hash_split(1000, (0.6, 0.2, 0.2))
        >>> [len(p) for p in parts], sorted(np.concatenate(parts).tolist()) == list(range(1000))
        ([600, 208, 192], True)
    """
    part = hash_part(np.arange(n, dtype=np.uint64), fractions, seed)
    return [np.flatnonzero(part == k) for k in range(len(fractions))]


_GROUP_SALT = np.uint64(0xD6E8FEB86659FD93)


def split_keys(rows: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """The keys :func:`hash_part` hashes: each row's 0-based number, or, with ``groups`` (the
    int64 ids of :func:`mtlrec.data.columns.group_ids`, -1 for a null), the row's group id, so
    that every row of a group (a request's candidates) lands in the same part and per-request
    metrics and rank fusion see whole lists. A row with a null group id is its own group (its
    row number is hashed).

    Example:
        >>> keys = split_keys(np.arange(4), np.array([7, 7, -1, 7]))
        >>> int(keys[0]) == int(keys[1]) == int(keys[3]), int(keys[2]) == 2
        (True, True)
    """
    keys = np.asarray(rows).astype(np.uint64)
    if groups is None:
        return keys
    g = np.asarray(groups, dtype=np.int64)
    by_group = g.view(np.uint64) ^ _GROUP_SALT
    return np.where(g != -1, by_group, keys)
