"""Rank transforms within a request (or a whole list): scores to percentiles and buckets.

Vectorised: one ``lexsort`` by (group, score), then positions relative to the group's start.
Tied scores share the smallest rank, so a strictly increasing transform of a task's scores
leaves every percentile unchanged.
"""

from __future__ import annotations

import numpy as np


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
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = s.size
    if n == 0:
        return np.zeros(0)
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
    below = (value_start - group_start).astype(np.float64)  # rows strictly lower in the group
    pct = np.empty(n)
    pct[order] = below / sizes[group_id]
    return pct


def bucketize(pct: np.ndarray, buckets: int | None) -> np.ndarray:
    """Percentiles to ``buckets`` equal-width buckets, as the bucket's lower edge in [0, 1)."""
    if buckets is None:
        return pct
    return np.floor(pct * buckets) / buckets
