"""Evaluation metrics for ranking tasks, as plain functions and as a streaming :class:`MetricSet`.

The functions take NumPy arrays (anything :func:`numpy.asarray` accepts) and return a Python
``float``. They compute in float64, are vectorised end to end (no Python loop over rows or
groups) and return ``nan`` instead of raising or warning when a metric is undefined (empty input,
a single class for AUC).

:class:`MetricSet` accumulates model outputs over an evaluation pass, keeping only the rows inside
each task's sample space (its mask), and reports per-task metrics. Sample weights are training
emphasis, so metrics ignore them; only masks select rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from mtlrec.batch import Batch
from mtlrec.schema import Schema, TaskSpec

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

ArrayLike = npt.ArrayLike
Gather = Callable[[np.ndarray], np.ndarray]

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


# -- input helpers ----------------------------------------------------------------------------
def _vector(x: ArrayLike, name: str) -> np.ndarray:
    """A float64 1-D array; ``[N, 1]`` is accepted and flattened."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _check_lengths(**arrays: np.ndarray | None) -> int:
    lengths = {k: len(v) for k, v in arrays.items() if v is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def _weights(weights: ArrayLike | None) -> np.ndarray | None:
    return None if weights is None else _vector(weights, "weights")


def _mean(x: np.ndarray, weights: np.ndarray | None = None) -> float:
    """(Weighted) mean; ``nan`` for empty input or zero total weight, without warnings."""
    if x.size == 0:
        return math.nan
    if weights is None:
        return float(x.mean())
    total = float(weights.sum())
    if total <= 0:
        return math.nan
    return float((x * weights).sum() / total)


# -- AUC --------------------------------------------------------------------------------------
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


# -- pointwise metrics ------------------------------------------------------------------------
def logloss(
    probs: ArrayLike,
    labels: ArrayLike,
    weights: ArrayLike | None = None,
    eps: float = 1e-7,
) -> float:
    """Binary cross-entropy of probabilities, clipped to ``[eps, 1 - eps]``.

    Matches ``sklearn.metrics.log_loss`` on input already clipped the same way.

    Args:
        probs: predicted probability of the positive class.
        labels: 0/1 labels (soft labels in [0, 1] are accepted).
        weights: optional sample weights (weighted mean).
        eps: clipping bound keeping the loss finite.

    Returns:
        Mean log loss (natural log), ``nan`` for empty input.

    Shapes:
        probs, labels, weights: ``[N]``.
    """
    p, y, w = _vector(probs, "probs"), _vector(labels, "labels"), _weights(weights)
    _check_lengths(probs=p, labels=y, weights=w)
    p = np.clip(p, eps, 1.0 - eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = -(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))
    return _mean(loss, w)


def multiclass_logloss(
    probs: ArrayLike,
    labels: ArrayLike,
    weights: ArrayLike | None = None,
    eps: float = 1e-7,
) -> float:
    """Categorical cross-entropy: mean of ``-log p[label]``, the probability clipped to
    ``[eps, 1 - eps]`` (so two classes give the same value as :func:`logloss`).

    Args:
        probs: class probabilities, rows summing to 1.
        labels: class indices ``0..C-1`` (floats holding integers are accepted).
        weights: optional sample weights (weighted mean).
        eps: clipping bound keeping the loss finite.

    Returns:
        Mean log loss (natural log), ``nan`` for empty input.

    Shapes:
        probs: ``[N, C]``; labels, weights: ``[N]``.

    Raises:
        ValueError: a label is outside ``0..C-1`` or shapes do not fit.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {p.shape}")
    y = _class_index(labels, p.shape[1])
    w = _weights(weights)
    n = _check_lengths(probs=p, labels=y, weights=w)
    picked = np.clip(p[np.arange(n), y], eps, 1.0 - eps)
    with np.errstate(divide="ignore"):
        loss = -np.log(picked)
    return _mean(loss, w)


def _class_index(labels: ArrayLike, num_classes: int) -> np.ndarray:
    y = np.rint(_vector(labels, "labels")).astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"class labels must lie in 0..{num_classes - 1}")
    return y


def accuracy(probs: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Share of rows whose predicted class equals the label.

    Args:
        probs: class probabilities ``[N, C]`` (prediction: argmax), or positive-class
            probabilities ``[N]`` (prediction: ``p > 0.5``).
        labels: class indices (floats holding integers are accepted).
        weights: optional sample weights (weighted share).

    Returns:
        Accuracy in ``[0, 1]``, ``nan`` for empty input.

    Shapes:
        probs: ``[N, C]`` or ``[N]``; labels, weights: ``[N]``.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] > 1:
        pred = p.argmax(axis=1)
        y = _class_index(labels, p.shape[1])
    else:
        pred = (_vector(p, "probs") > 0.5).astype(np.int64)
        y = np.rint(_vector(labels, "labels")).astype(np.int64)
    w = _weights(weights)
    _check_lengths(probs=pred, labels=y, weights=w)
    return _mean((pred == y).astype(np.float64), w)


def mse(preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Mean squared error.

    Args:
        preds: predicted values.
        labels: true values.
        weights: optional sample weights (weighted mean).

    Returns:
        The (weighted) mean of ``(preds - labels) ** 2``, ``nan`` for empty input.

    Shapes:
        preds, labels, weights: ``[N]``.
    """
    p, y, w = _vector(preds, "preds"), _vector(labels, "labels"), _weights(weights)
    _check_lengths(preds=p, labels=y, weights=w)
    return _mean((p - y) ** 2, w)


def mae(preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Mean absolute error.

    Args:
        preds: predicted values.
        labels: true values.
        weights: optional sample weights (weighted mean).

    Returns:
        The (weighted) mean of ``|preds - labels|``, ``nan`` for empty input.

    Shapes:
        preds, labels, weights: ``[N]``.
    """
    p, y, w = _vector(preds, "preds"), _vector(labels, "labels"), _weights(weights)
    _check_lengths(preds=p, labels=y, weights=w)
    return _mean(np.abs(p - y), w)


def rmse(preds: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Root mean squared error, ``sqrt(mse)``.

    Args:
        preds: predicted values.
        labels: true values.
        weights: optional sample weights (weighted mean).

    Returns:
        The RMSE, ``nan`` for empty input.

    Shapes:
        preds, labels, weights: ``[N]``.
    """
    return math.sqrt(mse(preds, labels, weights))


# -- comparison -------------------------------------------------------------------------------
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


# -- streaming evaluation ---------------------------------------------------------------------
def _identity(a: np.ndarray) -> np.ndarray:
    return a


class MetricSet:
    """Accumulates predictions over batches and computes per-task metrics.

    Reported metrics by task kind:

    - binary: ``auc``, ``logloss``, ``pos_rate`` (label mean), ``pred_mean`` (mean predicted
      probability, for calibration), ``count``, and ``gauc`` when batches carry groups;
    - regression: ``mse``, ``mae``, ``rmse``, ``label_mean``, ``pred_mean``, ``count``;
    - multiclass: ``accuracy``, ``logloss``, ``count``.

    Only rows inside a task's mask are kept; sample weights are ignored. A task without any valid
    row reports ``count: 0`` and ``nan`` for the rest.

    Args:
        schema: the schema whose tasks are evaluated.
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self._preds: dict[str, list[Tensor]] = {}
        self._labels: dict[str, list[Tensor]] = {}
        self._groups: dict[str, list[Tensor]] = {}
        self._has_groups: bool | None = None
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        names = self.schema.task_names
        self._preds = {n: [] for n in names}
        self._labels = {n: [] for n in names}
        self._groups = {n: [] for n in names}
        self._has_groups = None

    def update(self, predictions: Mapping[str, Tensor], batch: Batch) -> None:
        """Add one batch.

        Args:
            predictions: task name -> model output: probabilities for binary tasks, values for
                regression tasks, class probabilities for multiclass tasks.
            batch: the batch the predictions were made on (labels, masks, groups).

        Shapes:
            predictions[task]: ``[B]`` (or ``[B, 1]``) for binary and regression, ``[B, C]``
            for multiclass.

        Raises:
            KeyError: a task has no prediction or no label.
            ValueError: a prediction has the wrong shape, or some batches carry groups and
                others do not.
        """
        has_groups = batch.groups is not None
        if self._has_groups is None:
            self._has_groups = has_groups
        elif self._has_groups != has_groups:
            raise ValueError("some batches carry groups and others do not; gauc needs all")
        for task in self.schema.tasks:
            name = task.name
            if name not in predictions:
                raise KeyError(f"no prediction for task {name!r}")
            if name not in batch.labels:
                raise KeyError(f"batch has no labels for task {name!r}")
            labels = batch.labels[name].detach()
            size = int(labels.shape[0])
            pred = _shape_prediction(task, predictions[name].detach(), size)
            mask = batch.masks.get(name)
            if mask is None:
                mask = torch.ones(size, dtype=torch.bool)
            self._preds[name].append(_keep(pred, mask))
            self._labels[name].append(_keep(labels, mask))
            if batch.groups is not None:
                self._groups[name].append(_keep(batch.groups.detach().reshape(-1), mask))

    def compute(self, gather: Gather | None = None) -> dict[str, dict[str, float]]:
        """Metrics of everything added since the last :meth:`reset`.

        Args:
            gather: applied to every concatenated array before metrics are computed, e.g. an
                all-gather across processes. It is called for every task in schema order, on
                predictions, then labels, then groups (when groups are tracked), including
                empty arrays, so every process makes the same calls. Default: identity.

        Returns:
            task name -> metric name -> value.
        """
        g = gather or _identity
        track_groups = (
            self._has_groups
            if self._has_groups is not None
            else self.schema.group_column is not None
        )
        out: dict[str, dict[str, float]] = {}
        for task in self.schema.tasks:
            name = task.name
            width = (task.num_classes or 0,) if task.kind == "multiclass" else ()
            preds = np.asarray(g(_concat(self._preds[name], width, np.float64)), dtype=np.float64)
            labels = np.asarray(g(_concat(self._labels[name], (), np.float64)), dtype=np.float64)
            groups = None
            if track_groups:
                groups = np.asarray(g(_concat(self._groups[name], (), np.int64)))
            out[name] = _task_metrics(task, preds, labels, groups)
        return out


def _shape_prediction(task: TaskSpec, pred: Tensor, size: int) -> Tensor:
    if task.kind == "multiclass":
        if pred.dim() != 2 or pred.shape != (size, task.num_classes):
            raise ValueError(
                f"task {task.name!r}: expected class probabilities of shape "
                f"[{size}, {task.num_classes}], got {tuple(pred.shape)}"
            )
        return pred
    if pred.dim() == 2 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if pred.dim() != 1 or pred.shape[0] != size:
        raise ValueError(
            f"task {task.name!r}: expected predictions of shape [{size}], got {tuple(pred.shape)}"
        )
    return pred


def _keep(values: Tensor, mask: Tensor) -> Tensor:
    """The masked rows, as a CPU copy (float64 stays float64, other floats become float32)."""
    kept = values[mask.to(device=values.device, dtype=torch.bool).reshape(-1)]
    if kept.is_floating_point() and kept.dtype != torch.float64:
        kept = kept.float()
    return kept.to("cpu")


def _concat(chunks: list[Tensor], width: tuple[int, ...], dtype: type) -> np.ndarray:
    if not chunks:
        return np.zeros((0, *width), dtype=dtype)
    return np.concatenate([c.numpy() for c in chunks]).astype(dtype, copy=False)


def _task_metrics(
    task: TaskSpec, preds: np.ndarray, labels: np.ndarray, groups: np.ndarray | None
) -> dict[str, float]:
    count = len(labels)
    if task.kind == "binary":
        res = {
            "auc": auc(preds, labels),
            "logloss": logloss(preds, labels),
            "pos_rate": _mean(labels),
            "pred_mean": _mean(preds),
            "count": count,
        }
        if groups is not None:
            res["gauc"] = gauc(preds, labels, groups)
        return res
    if task.kind == "regression":
        return {
            "mse": mse(preds, labels),
            "mae": mae(preds, labels),
            "rmse": rmse(preds, labels),
            "label_mean": _mean(labels),
            "pred_mean": _mean(preds),
            "count": count,
        }
    return {
        "accuracy": accuracy(preds, labels),
        "logloss": multiclass_logloss(preds, labels),
        "count": count,
    }
