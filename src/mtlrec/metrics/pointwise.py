"""Pointwise metrics: log loss (binary, multiclass; from probabilities, logits or
log-probabilities), accuracy, MSE, MAE, RMSE."""

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


def logloss_from_logits(
    logits: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None
) -> float:
    """Binary cross-entropy computed from logits in float64, without clipping:
    ``softplus(z) - y z``, the exact ``-(y log p + (1 - y) log(1 - p))`` for ``p = sigmoid(z)``.

    Unlike :func:`logloss` on float32 probabilities (which all read 1.0 above ``1 - 6e-8``),
    a confident mistake is charged its full loss.

    Args:
        logits: predicted log-odds of the positive class.
        labels: 0/1 labels (soft labels in [0, 1] are accepted).
        weights: optional sample weights (weighted mean).

    Returns:
        Mean log loss (natural log), ``nan`` for empty input.

    Shapes:
        logits, labels, weights: ``[N]``.

    Example:
        >>> round(logloss_from_logits([40.0], [0.0]), 6)  # p = 1 - 4e-18, label 0
        40.0
    """
    z, y, w = _vector(logits, "logits"), _vector(labels, "labels"), _weights(weights)
    _check_lengths(logits=z, labels=y, weights=w)
    return _mean(np.logaddexp(0.0, z) - y * z, w)


# float32 holds no log-probability strictly between this and 0 (smallest subnormal, 2**-149)
_LOG_P_FLOOR = -float(np.finfo(np.float32).smallest_subnormal)


def logloss_from_log_probs(
    log_probs: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None
) -> float:
    """Binary cross-entropy computed from ``log p`` in float64 (for derived probabilities
    such as ESMM's pCTCVR, which have no logit): ``-(y log p + (1 - y) log(1 - p))`` with
    ``log(1 - p)`` from ``expm1`` / ``log1p``, exact wherever ``log p < 0``. A ``log p`` of 0
    (``p`` rounded to 1) is read as the largest float32 value below 0, so a label 0 there costs
    about 103 instead of infinity.

    Args:
        log_probs: natural log of the predicted probability of the positive class (``<= 0``).
        labels: 0/1 labels (soft labels in [0, 1] are accepted).
        weights: optional sample weights (weighted mean).

    Returns:
        Mean log loss (natural log), ``nan`` for empty input.

    Shapes:
        log_probs, labels, weights: ``[N]``.
    """
    lp, y, w = _vector(log_probs, "log_probs"), _vector(labels, "labels"), _weights(weights)
    _check_lengths(log_probs=lp, labels=y, weights=w)
    lp = np.where(lp < 0.0, lp, _LOG_P_FLOOR)
    half = np.log(0.5)
    # log(1 - p): log(-expm1) near 0, log1p(-exp) below log 1/2 (each where it is accurate)
    log_q = np.where(
        lp > half, np.log(-np.expm1(np.maximum(lp, half))), np.log1p(-np.exp(np.minimum(lp, half)))
    )
    return _mean(-(y * lp + (1.0 - y) * log_q), w)


def multiclass_logloss_from_log_probs(
    log_probs: ArrayLike, labels: ArrayLike, weights: ArrayLike | None = None
) -> float:
    """Categorical cross-entropy from log-probabilities (e.g. ``log_softmax`` of the logits):
    the mean of ``-log p[label]``, without clipping.

    Args:
        log_probs: class log-probabilities.
        labels: class indices ``0..C-1`` (floats holding integers are accepted).
        weights: optional sample weights (weighted mean).

    Returns:
        Mean log loss (natural log), ``nan`` for empty input.

    Shapes:
        log_probs: ``[N, C]``; labels, weights: ``[N]``.

    Raises:
        ValueError: a label is outside ``0..C-1`` or shapes do not fit.
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"log_probs must be [N, C], got shape {lp.shape}")
    y = _class_index(labels, lp.shape[1])
    w = _weights(weights)
    n = _check_lengths(log_probs=lp, labels=y, weights=w)
    return _mean(-lp[np.arange(n), y], w)


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
