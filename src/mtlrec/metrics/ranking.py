"""Ranking metrics: AUC and group AUC (GAUC), exact with ties, vectorised over groups."""

from __future__ import annotations

import math

import numpy as np

from mtlrec.metrics._inputs import ArrayLike, _check_lengths, _vector, _weights


def _grouped_auc(
    scores: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None,
    group_index: np.ndarray | None,
    num_groups: int,
) -> np.ndarray:
    """ROC AUC of each group (``nan`` where a group lacks a class), shape ``[num_groups]``.

    Rows are sorted by (group, descending score) and collapsed into blocks of equal
    (group, score): each block is one distinct threshold. Walking down the thresholds, a block
    with ``n`` negative and ``p`` positive weight adds the trapezoid
    ``n * (positives above + p / 2)`` to the area under the unnormalised ROC curve, which is
    exactly how ties are scored by the trapezoid rule. Dividing by ``P * N`` normalises it.
    """
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; AUC is undefined")
    positive = labels > 0.5
    if weights is None:
        pos_w = positive.astype(np.float64)
        neg_w = 1.0 - pos_w
    else:
        pos_w = np.where(positive, weights, 0.0)
        neg_w = np.where(positive, 0.0, weights)

    if group_index is None:
        order = np.argsort(-scores, kind="stable")
        s = scores[order]
        new_block = s[1:] != s[:-1]
    else:
        order = np.lexsort((-scores, group_index))
        s = scores[order]
        g = group_index[order]
        new_block = (s[1:] != s[:-1]) | (g[1:] != g[:-1])
    starts = np.flatnonzero(np.concatenate(([True], new_block)))
    pos_b = np.add.reduceat(pos_w[order], starts)
    neg_b = np.add.reduceat(neg_w[order], starts)

    # positive weight strictly above each block, counted from the start of the array ...
    above = np.concatenate(([0.0], np.cumsum(pos_b)[:-1]))
    if group_index is None:
        block_group = np.zeros(len(starts), dtype=np.int64)
    else:
        block_group = g[starts]
        # ... then from the start of the block's group
        first = np.flatnonzero(np.concatenate(([True], block_group[1:] != block_group[:-1])))
        run = np.diff(np.concatenate((first, [len(block_group)])))
        above = above - np.repeat(above[first], run)

    area = np.bincount(block_group, neg_b * (above + 0.5 * pos_b), minlength=num_groups)
    pos_total = np.bincount(block_group, pos_b, minlength=num_groups)
    neg_total = np.bincount(block_group, neg_b, minlength=num_groups)
    denom = pos_total * neg_total
    out = np.full(num_groups, math.nan)
    np.divide(area, denom, out=out, where=denom > 0)
    return out


def auc(scores: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Exact area under the ROC curve, equal to ``sklearn.metrics.roc_auc_score``.

    Tied scores count half (trapezoid rule over distinct thresholds).

    Args:
        scores: predicted scores; any monotone transform gives the same AUC.
        labels: 0/1 labels (values above 0.5 count as positive).
        weights: optional non-negative sample weights.

    Returns:
        The AUC, or ``nan`` when the input is empty or holds only one class.

    Shapes:
        scores, labels, weights: ``[N]``.

    Raises:
        ValueError: lengths differ or a score is NaN.

    Example:
        >>> import numpy as np
        >>> auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
        0.75
    """
    s, y, w = _vector(scores, "scores"), _vector(labels, "labels"), _weights(weights)
    if _check_lengths(scores=s, labels=y, weights=w) == 0:
        return math.nan
    return float(_grouped_auc(s, y, w, None, 1)[0])


def gauc(
    scores: ArrayLike,
    labels: ArrayLike,
    groups: ArrayLike,
    weights: ArrayLike | None = None,
) -> float:
    """Group AUC: per-group AUC averaged with each group weighted by its number of rows.

    Groups (typically users or requests) with only positives or only negatives have no AUC and
    are left out of the average.

    Args:
        scores: predicted scores.
        labels: 0/1 labels (values above 0.5 count as positive).
        groups: group id of each row (any sortable dtype).
        weights: optional sample weights used inside each group's AUC; the group's weight in
            the average is still its row count.

    Returns:
        The group AUC, or ``nan`` when no group holds both classes.

    Shapes:
        scores, labels, groups, weights: ``[N]``.

    Raises:
        ValueError: lengths differ or a score is NaN.
    """
    s, y, w = _vector(scores, "scores"), _vector(labels, "labels"), _weights(weights)
    grp = np.asarray(groups).reshape(-1)
    if _check_lengths(scores=s, labels=y, groups=grp, weights=w) == 0:
        return math.nan
    uniq, index = np.unique(grp, return_inverse=True)
    per_group = _grouped_auc(s, y, w, index.reshape(-1), len(uniq))
    rows = np.bincount(index.reshape(-1), minlength=len(uniq)).astype(np.float64)
    valid = ~np.isnan(per_group)
    if not valid.any():
        return math.nan
    return float((per_group[valid] * rows[valid]).sum() / rows[valid].sum())
