"""Pointwise metrics: log loss (binary, multiclass), accuracy, MSE, MAE, RMSE."""

from __future__ import annotations

import math

import numpy as np

from mtlrec.metrics._inputs import ArrayLike, _check_lengths, _mean, _vector, _weights


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
