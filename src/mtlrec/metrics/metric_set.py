"""The streaming :class:`MetricSet`: per-task metrics over an evaluation pass, each task over
its own mask."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from mtlrec.batch import Batch
from mtlrec.metrics._inputs import _mean
from mtlrec.metrics.pointwise import accuracy, logloss, mae, mse, multiclass_logloss, rmse
from mtlrec.metrics.ranking import auc, gauc
from mtlrec.schema import Schema, TaskSpec

Gather = Callable[[np.ndarray], np.ndarray]


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
