"""The streaming :class:`MetricSet`: per-task metrics over an evaluation pass, each task over
its own mask."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mtlrec.batch import Batch
from mtlrec.metrics._inputs import _mean
from mtlrec.metrics.pointwise import (
    accuracy,
    logloss,
    logloss_from_log_probs,
    logloss_from_logits,
    mae,
    mse,
    multiclass_logloss,
    multiclass_logloss_from_log_probs,
    rmse,
)
from mtlrec.metrics.ranking import auc, gauc
from mtlrec.models.base import ModelOutput
from mtlrec.schema import Schema, TaskSpec

Gather = Callable[[np.ndarray], np.ndarray]

#: What a task's accumulated scores are: probabilities (``prob``: class probabilities for a
#: multiclass task), logits, log-probabilities (``log_prob``: ESMM's derived pCTCVR, or the
#: log-softmax of a multiclass task's logits) or regression values.
ScoreForm = Literal["prob", "logit", "log_prob", "value"]
_FORMS: tuple[ScoreForm, ...] = ("prob", "logit", "log_prob", "value")


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

    Given a :class:`~mtlrec.models.base.ModelOutput` (what :func:`mtlrec.train.step.evaluate`
    passes), the set keeps each binary task's logit (or its log-probability when the model
    derives it, as ESMM's pCTCVR) rather than its probability: float32 rounds every probability
    above ``1 - 6e-8`` to 1.0, which ties confident rows and can move the AUC by tens of points,
    while the logit keeps their order. AUC and GAUC are computed on those scores (any monotone
    transform ranks alike), the log loss exactly from them in float64, and ``pred_mean`` from the
    probabilities they give in float64. Multiclass tasks keep the log-softmax of their logits.
    Given probabilities (a mapping), it uses them as they are. One float tensor per task is
    kept, in the dtype it arrives in (float32 for float32 models).

    Args:
        schema: the schema whose tasks are evaluated.
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self._preds: dict[str, list[Tensor]] = {}
        self._labels: dict[str, list[Tensor]] = {}
        self._groups: dict[str, list[Tensor]] = {}
        self._forms: dict[str, ScoreForm] = {}
        self._has_groups: bool | None = None
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        names = self.schema.task_names
        self._preds = {n: [] for n in names}
        self._labels = {n: [] for n in names}
        self._groups = {n: [] for n in names}
        self._forms = {}
        self._has_groups = None

    def update(self, predictions: ModelOutput | Mapping[str, Tensor], batch: Batch) -> None:
        """Add one batch.

        Args:
            predictions: the model's :class:`~mtlrec.models.base.ModelOutput` (preferred: its
                logits and log-probabilities keep the precision that probabilities lose), or
                task name -> probabilities for binary tasks, values for regression tasks,
                class probabilities for multiclass tasks.
            batch: the batch the predictions were made on (labels, masks, groups).

        Shapes:
            predictions[task]: ``[B]`` (or ``[B, 1]``) for binary and regression, ``[B, C]``
            for multiclass (likewise a ModelOutput's logits and log-probabilities).

        Raises:
            KeyError: a task has no prediction or no label.
            ValueError: a prediction has the wrong shape, a task's scores change form between
                batches (a ModelOutput after probabilities), or some batches carry groups and
                others do not.
        """
        has_groups = batch.groups is not None
        if self._has_groups is None:
            self._has_groups = has_groups
        elif self._has_groups != has_groups:
            raise ValueError("some batches carry groups and others do not; gauc needs all")
        for task in self.schema.tasks:
            name = task.name
            if name not in batch.labels:
                raise KeyError(f"batch has no labels for task {name!r}")
            labels = batch.labels[name].detach()
            size = int(labels.shape[0])
            raw, form = _scores(task, predictions)
            if self._forms.setdefault(name, form) != form:
                raise ValueError(
                    f"task {name!r}: scores given as {form} after {self._forms[name]} in the "
                    "same evaluation; pass ModelOutputs or probabilities throughout"
                )
            pred = _shape_prediction(task, raw.detach(), size)
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
                predictions, then labels, then groups (when groups are tracked), then a
                one-element int64 array coding the form of the scores (``-1`` before any
                update), including empty arrays, so every process makes the same calls and a
                process that saw no rows reads the others' scores as they are. Default:
                identity.

        Returns:
            task name -> metric name -> value.

        Raises:
            ValueError: processes hold scores of different forms for a task.
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
            form = self._forms.get(name)
            codes = np.asarray(g(np.array([_FORMS.index(form) if form else -1], np.int64)))
            known = sorted({_FORMS[int(c)] for c in codes.reshape(-1) if c >= 0})
            if len(known) > 1:
                raise ValueError(f"task {name!r}: scores of different forms {known} to combine")
            out[name] = _task_metrics(task, preds, labels, groups, known[0] if known else None)
        return out


def _scores(
    task: TaskSpec, predictions: ModelOutput | Mapping[str, Tensor]
) -> tuple[Tensor, ScoreForm]:
    """The tensor to keep for ``task`` and what it holds."""
    name = task.name
    if not isinstance(predictions, ModelOutput):
        if name not in predictions:
            raise KeyError(f"no prediction for task {name!r}")
        return predictions[name], "value" if task.kind == "regression" else "prob"
    if name in predictions.log_probs:  # a derived probability: no logit exists
        return predictions.log_probs[name], "log_prob"
    if name not in predictions.logits:
        raise KeyError(f"no prediction for task {name!r}")
    z = predictions.logits[name]
    if task.kind == "binary":
        return z, "logit"
    if task.kind == "multiclass":
        return torch.log_softmax(z.float() if z.dtype != torch.float64 else z, dim=-1), "log_prob"
    return z, "value"


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
    task: TaskSpec,
    preds: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None,
    form: ScoreForm | None,
) -> dict[str, float]:
    count = len(labels)
    if task.kind == "binary":
        # rank metrics on the scores as kept (logit, log p or p: monotone in p, same ranking);
        # calibration metrics on the probabilities and the exact log loss, in float64
        if form == "logit":
            loss, probs = logloss_from_logits(preds, labels), _sigmoid(preds)
        elif form == "log_prob":
            loss, probs = logloss_from_log_probs(preds, labels), np.exp(preds)
        else:
            loss, probs = logloss(preds, labels), preds
        res = {
            "auc": auc(preds, labels),
            "logloss": loss,
            "pos_rate": _mean(labels),
            "pred_mean": _mean(probs),
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
        "accuracy": accuracy(preds, labels),  # argmax: the same on log-probabilities
        "logloss": (
            multiclass_logloss_from_log_probs(preds, labels)
            if form == "log_prob"
            else multiclass_logloss(preds, labels)
        ),
        "count": count,
    }


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` without overflow warnings (float64)."""
    return np.exp(-np.logaddexp(0.0, -z))
