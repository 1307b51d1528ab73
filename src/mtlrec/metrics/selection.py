"""Which direction of a metric is better, for epoch selection and comparisons."""

from __future__ import annotations

import math

HIGHER_IS_BETTER: dict[str, bool] = {
    "auc": True,
    "gauc": True,
    "accuracy": True,
    "logloss": False,
    "mse": False,
    "mae": False,
    "rmse": False,
    # informational: no better or worse, listed so that every reported name has an entry
    "pos_rate": True,
    "pred_mean": True,
    "label_mean": True,
    "count": True,
}
"""Metric name -> whether a larger value is better."""


def _higher_is_better(metric: str) -> bool:
    if metric in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[metric]
    # "click/auc" or "click.auc": the metric is the last component
    tail = metric.replace("/", ".").rsplit(".", 1)[-1]
    if tail in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[tail]
    raise KeyError(f"unknown metric {metric!r}; known metrics are {sorted(HIGHER_IS_BETTER)}")


def is_better(metric: str, new: float, old: float) -> bool:
    """Whether ``new`` is strictly better than ``old`` for ``metric``; ``nan`` is the worst value.

    Args:
        metric: a name in :data:`HIGHER_IS_BETTER`, optionally prefixed by a task
            (``"click/auc"`` or ``"click.auc"``).
        new: the candidate value.
        old: the value to beat.

    Returns:
        True when ``new`` improves on ``old`` (a number always beats ``nan``; ``nan`` never
        beats anything).

    Raises:
        KeyError: the metric is unknown.
    """
    higher = _higher_is_better(metric)
    if math.isnan(new):
        return False
    if math.isnan(old):
        return True
    return new > old if higher else new < old
