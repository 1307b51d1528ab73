"""Evaluation metrics for ranking tasks, as plain functions and as a streaming :class:`MetricSet`.

The functions take NumPy arrays (anything :func:`numpy.asarray` accepts) and return a Python
``float``. They compute in float64, are vectorised end to end (no Python loop over rows or
groups) and return ``nan`` instead of raising or warning when a metric is undefined (empty input,
a single class for AUC).

:class:`MetricSet` accumulates model outputs over an evaluation pass, keeping only the rows inside
each task's sample space (its mask), and reports per-task metrics. Sample weights are training
emphasis, so metrics ignore them; only masks select rows.

The package holds :mod:`~mtlrec.metrics.ranking` (AUC, GAUC), :mod:`~mtlrec.metrics.pointwise`
(log loss, accuracy, MSE...), :mod:`~mtlrec.metrics.selection` (which direction is better) and
:mod:`~mtlrec.metrics.metric_set` (the streaming :class:`MetricSet`).
"""

from __future__ import annotations

from mtlrec.metrics.metric_set import MetricSet
from mtlrec.metrics.pointwise import accuracy, logloss, mae, mse, multiclass_logloss, rmse
from mtlrec.metrics.ranking import auc, gauc
from mtlrec.metrics.selection import HIGHER_IS_BETTER, is_better

__all__ = [
    "HIGHER_IS_BETTER",
    "MetricSet",
    "accuracy",
    "auc",
    "gauc",
    "is_better",
    "logloss",
    "mae",
    "mse",
    "multiclass_logloss",
    "rmse",
]
