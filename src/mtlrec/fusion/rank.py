"""Rank transforms within a request (or a whole list): scores to percentiles and buckets.

Vectorised: one ``lexsort`` by (group, score), then positions relative to the group's start.
Tied scores share the smallest rank, so a strictly increasing transform of a task's scores
leaves every percentile unchanged.
"""

from __future__ import annotations

import numpy as np


def group_ranks(
    scores: np.ndarray, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's rank in its group, as integers: the number of the group's rows with a lower
    score, and the group's size.

    Args:
        scores: ``[N]`` scores.
        groups: ``[N]`` group ids (requests), or None for one list.

    Returns:
        ``(below, size)``, both ``[N]`` int64, ``0 <= below < size``.

    Example:
        >>> group_ranks(np.array([0.3, 0.1, 0.3, 0.9]))
        (array([1, 0, 1, 3]), array([4, 4, 4, 4]))
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = s.size
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    g = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups).reshape(-1)
    order = np.lexsort((s, g))
    ss, gs = s[order], g[order]
    new_group = np.concatenate(([True], gs[1:] != gs[:-1]))  # [N] first row of a group
    new_value = new_group | np.concatenate(([True], ss[1:] != ss[:-1]))
    pos = np.arange(n)
    group_start = np.maximum.accumulate(np.where(new_group, pos, 0))
    value_start = np.maximum.accumulate(np.where(new_value, pos, 0))  # first row of a tie block
    group_id = np.cumsum(new_group) - 1
    sizes = np.bincount(group_id)
    below = np.empty(n, dtype=np.int64)
    size = np.empty(n, dtype=np.int64)
    below[order] = value_start - group_start  # rows strictly lower in the group
    size[order] = sizes[group_id]
    return below, size


def group_percentiles(scores: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Each row's percentile in its group: the share of the group's rows with a lower score.

    Args:
        scores: ``[N]`` scores.
        groups: ``[N]`` group ids (requests), or None for one list.

    Returns:
        ``[N]`` float64 in ``[0, 1)``; a group of one row gets 0.

    Example:
        >>> group_percentiles(np.array([0.3, 0.1, 0.3, 0.9]))
        array([0.25, 0.  , 0.25, 0.75])
    """
    below, size = group_ranks(scores, groups)
    return below / np.maximum(size, 1)


def group_buckets(
    scores: np.ndarray, groups: np.ndarray | None = None, buckets: int | None = None
) -> np.ndarray:
    """Each row's percentile in its group cut into ``buckets`` equal-width buckets, as the
    bucket's lower edge ``k / buckets`` in ``[0, 1)`` (None: the raw percentile).

    The bucket index is ``floor(below * buckets / size)`` in integer arithmetic, so a rank that
    lies exactly on an edge lands in the bucket that starts there (``floor`` of the float
    ``below / size * buckets`` puts some edges one bucket low, e.g. 29/100 * 100 = 28.999...).

    Args:
        scores: ``[N]`` scores.
        groups: ``[N]`` group ids (requests), or None for one list.
        buckets: number of buckets (>= 1), or None.

    Returns:
        ``[N]`` float64 in ``[0, 1)``.

    Example:
        >>> group_buckets(np.arange(10.0), buckets=4)
        array([0.  , 0.  , 0.  , 0.25, 0.25, 0.5 , 0.5 , 0.5 , 0.75, 0.75])
    """
    below, size = group_ranks(scores, groups)
    if buckets is None:
        return below / np.maximum(size, 1)
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    index = (below * buckets) // np.maximum(size, 1)  # [N] int64: exact floor
    return index / buckets
