"""Per-task calibration of predicted probabilities, applied before a fusion formula.

A model trained on negatively down-sampled data over-estimates its positive rate; fusing such
scores with another task's mixes scales. Three monotone steps, in this order, each optional:

- **down-sampling correction** (He et al., "Practical Lessons from Predicting Clicks on Ads at
  Facebook", ADKDD 2014, Section 6.2): with negatives kept at rate ``r``,
  ``q = p / (p + (1 - p) / r)``;
- **Platt scaling** (Platt, "Probabilistic Outputs for Support Vector Machines", 1999):
  ``q = sigmoid(a * logit(p) + b)``, ``a > 0``, fitted on held-out labels (Platt's smoothed
  targets, Newton's method with a line search as in Lin, Lin & Weng 2007);
- **isotonic regression** (Zadrozny & Elkan, KDD 2002) by pool-adjacent-violators (Ayer et al.,
  1955), applied by linear interpolation between the fitted block end points.

Every step is non-decreasing in ``p``, so calibration never reverses a task's ranking.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mtlrec.errors import DataError

EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def downsample_correction(p: np.ndarray, rate: float) -> np.ndarray:
    """Undo negative down-sampling at rate ``rate`` (He et al. 2014): ``p / (p + (1-p)/rate)``.

    Example:
        >>> float(downsample_correction(np.array([0.5]), 0.1)[0])  # doctest: +ELLIPSIS
        0.0909...
    """
    p = np.asarray(p, dtype=np.float64)
    return p / (p + (1.0 - p) / rate)


def _fit_inputs(p: np.ndarray, y: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """``p`` and ``y`` as float64 vectors of one length, or a DataError naming the first bad
    row: scores must be probabilities in [0, 1] and labels finite (a NaN used to make every
    Platt target, or an isotonic block, NaN without a word)."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if p.ndim != 1 or p.shape != y.shape:
        raise DataError(
            f"{method} calibration needs one label per score, as vectors: got scores of shape "
            f"{p.shape} and labels of shape {y.shape}"
        )
    bad = np.flatnonzero(~((p >= 0) & (p <= 1)))  # NaN fails both comparisons
    if bad.size:
        raise DataError(
            f"{method} calibration needs probabilities in [0, 1], got {float(p[bad[0]])}",
            row=int(bad[0]) + 1,
        )
    bad = np.flatnonzero(~np.isfinite(y))
    if bad.size:
        raise DataError(
            f"{method} calibration needs finite labels, got {float(y[bad[0]])}",
            row=int(bad[0]) + 1,
        )
    return p, y


_PLATT_RIDGE = 1e-6
_MIN_SLOPE = 1e-6


def _platt_newton(
    x: np.ndarray, t: np.ndarray, offset: np.ndarray, theta: np.ndarray, iters: int
) -> np.ndarray:
    """Minimise ``sum CE(t, sigmoid(offset + x @ theta)) + ridge / 2 * |theta|^2`` (convex) by
    Newton's method with a backtracking (Armijo) line search, from ``theta``.

    It stops, after one last full step, when the squared Newton decrement ``g^T H^-1 g``
    (twice the gain a full step promises) is at most ``1e-14`` times the objective: below that
    the line search cannot tell a gain from the objective's rounding, and a full step is
    accurate to second order. Along a direction that only the ridge curves (every score the
    same), the steps are then rounding noise magnified by ``1 / ridge``: without this stop they
    wandered until the step cap, taking 50 s on a million rows. It also stops, where it is,
    when no step down to ``1e-10`` of Newton's gains a ``1e-4`` share of what it promises (Lin
    et al.'s "line search fails")."""

    def objective(th: np.ndarray) -> float:
        s = offset + x @ th  # -log q = softplus(-s), -log(1 - q) = softplus(s): no overflow
        loss = t * np.logaddexp(0.0, -s) + (1.0 - t) * np.logaddexp(0.0, s)
        return float(loss.sum() + 0.5 * _PLATT_RIDGE * th @ th)

    value = objective(theta)
    for _ in range(iters):
        q = _sigmoid(offset + x @ theta)
        g = x.T @ (q - t) + _PLATT_RIDGE * theta  # gradient
        h = (x * (q * (1 - q))[:, None]).T @ x + _PLATT_RIDGE * np.eye(len(theta))  # Hessian
        step = np.linalg.solve(h, g)
        decrease = float(g @ step)  # what a full step promises to first order (h is PD)
        if decrease <= 1e-14 * value:  # the gain is below the objective's rounding: finish
            return theta - step
        size = 1.0
        while True:  # halve the step until the objective decreases enough (Armijo)
            trial = theta - size * step
            trial_value = objective(trial)
            if trial_value <= value - 1e-4 * size * decrease:
                break
            size *= 0.5
            if size < 1e-10:  # the line search fails: theta is as good as rounding allows
                return theta
        theta, value = trial, trial_value
    return theta


def fit_platt(p: np.ndarray, y: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """Fit ``sigmoid(a * logit(p) + b)`` to 0/1 labels ``y`` by Platt's method.

    Platt (1999) fits the sigmoid to smoothed targets, ``(N+ + 1) / (N+ + 2)`` for the ``N+``
    positives and ``1 / (N- + 2)`` for the ``N-`` negatives, so that labels a score separates
    perfectly still give a finite slope. The cross-entropy to these targets, plus a ridge
    ``1e-6 / 2 * (a^2 + b^2)`` that keeps it strictly convex when every score is the same, is
    minimised by Newton's method with a backtracking line search (Lin, Lin & Weng, "A Note on
    Platt's Probabilistic Outputs for Support Vector Machines", Machine Learning 2007). The
    line search makes it converge from any data: a full Newton step can overshoot into the
    flat tails of the sigmoid, where the Hessian vanishes and the next step runs away. It
    starts, as Platt's pseudo-code does, from ``a = 0`` and the prior's log-odds
    ``b = log((N+ + 1) / (N- + 1))``, where no score saturates the sigmoid (from ``a = 1``,
    scores near 0 or 1 do, and the first steps need many halvings). At most ``iters`` steps;
    it stops when the Newton decrement says the rest is below rounding (see
    :func:`_platt_newton`). The hardest inputs measured (separable, ranked the wrong way,
    saturated, constant, up to a million rows) stop within 23 steps. No rows give the
    identity map ``(1, 0)``.

    ``a`` is kept at least 1e-6 so that the map stays increasing: when the best slope is
    smaller (scores that rank the labels the wrong way round), the best fit with ``a = 1e-6``
    is returned (the problem is convex, so that is the best fit with ``a >= 1e-6``).

    Raises:
        DataError: scores outside [0, 1] or NaN, labels other than 0/1, or lengths that
            differ, naming the first bad row.
    """
    p, y = _fit_inputs(p, y, "Platt")
    if p.size == 0:  # no rows: the identity map, as fit_isotonic
        return 1.0, 0.0
    z = _logit(p)
    bad = np.flatnonzero((y != 0) & (y != 1))
    if bad.size:
        raise DataError(
            f"Platt calibration needs 0/1 labels, got {float(y[bad[0]])}", row=int(bad[0]) + 1
        )
    pos = float(y.sum())
    t = np.where(y == 1, (pos + 1.0) / (pos + 2.0), 1.0 / (y.size - pos + 2.0))  # targets
    x = np.stack([z, np.ones_like(z)], axis=1)  # [N, 2]
    start = np.array([0.0, np.log((pos + 1.0) / (y.size - pos + 1.0))])  # Platt's prior
    a, b = _platt_newton(x, t, np.zeros_like(z), start, iters)
    if a >= _MIN_SLOPE:
        return float(a), float(b)
    # the slope on its bound: refit the intercept alone
    (b,) = _platt_newton(x[:, 1:], t, _MIN_SLOPE * z, np.array([b]), iters)
    return _MIN_SLOPE, float(b)


def fit_isotonic(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Isotonic (non-decreasing) regression of ``y`` on ``p`` by pool-adjacent-violators.

    Vectorised: rows are pooled by distinct ``p`` first, then every adjacent pair of blocks
    whose means decrease is merged at once, until none is left (pooling adjacent violators
    never separates rows of one block of the unique solution, so the order of merges does not
    matter).

    Returns:
        ``(x, v)``: block end points (each block's smallest and largest ``p``) and their values,
        for :func:`numpy.interp`. Shapes ``[2 * blocks]``. No rows give the identity map.

    Raises:
        DataError: scores outside [0, 1] or NaN, labels NaN or infinite, or lengths that
            differ, naming the first bad row.
    """
    p, y = _fit_inputs(p, y, "isotonic")
    if p.size == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    uniq, inv = np.unique(p, return_inverse=True)
    w = np.bincount(inv, minlength=len(uniq)).astype(np.float64)  # rows per distinct p
    wy = np.bincount(inv, y, minlength=len(uniq))
    lo, hi = uniq.copy(), uniq.copy()
    while True:
        mean = wy / w
        viol = mean[:-1] > mean[1:]  # [B-1]: block i and i+1 must be pooled
        if not viol.any():
            break
        starts = np.flatnonzero(np.concatenate(([True], ~viol)))  # first block of each pool
        w = np.add.reduceat(w, starts)
        wy = np.add.reduceat(wy, starts)
        ends = np.concatenate((starts[1:], [len(lo)])) - 1
        lo, hi = lo[starts], hi[ends]
    mean = wy / w
    x = np.stack([lo, hi], axis=1).reshape(-1)  # [2B]: lo0, hi0, lo1, hi1, ...
    v = np.repeat(mean, 2)
    return x, v


class Calibration(BaseModel):
    """One task's calibration (JSON-serialisable).

    Args:
        downsample_rate: the rate negatives were kept at in training (None: not down-sampled).
        method: ``none``, ``platt`` or ``isotonic``.
        a, b: Platt slope and intercept.
        x, y: isotonic block end points and values.
    """

    model_config = ConfigDict(extra="forbid")
    downsample_rate: float | None = Field(default=None, gt=0, le=1)
    method: Literal["none", "platt", "isotonic"] = "none"
    a: float = Field(default=1.0, gt=0)
    b: float = 0.0
    x: list[float] = Field(default_factory=list)
    y: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Calibration:
        if self.method == "isotonic":
            if len(self.x) != len(self.y) or len(self.x) < 1:
                raise ValueError("isotonic calibration needs x and y of the same, non-zero length")
            if np.any(np.diff(self.x) < 0) or np.any(np.diff(self.y) < 0):
                raise ValueError("isotonic calibration x and y must be non-decreasing")
        return self

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, shape as ``p``."""
        q = np.asarray(p, dtype=np.float64)
        if self.downsample_rate is not None:
            q = downsample_correction(q, self.downsample_rate)
        if self.method == "platt":
            q = _sigmoid(self.a * _logit(q) + self.b)
        elif self.method == "isotonic":
            q = np.interp(q, np.asarray(self.x), np.asarray(self.y))
        return q

    @classmethod
    def fit(
        cls,
        p: np.ndarray,
        y: np.ndarray,
        method: Literal["none", "platt", "isotonic"],
        downsample_rate: float | None = None,
    ) -> Calibration:
        """Fit on held-out probabilities ``p`` and 0/1 labels ``y`` (after the correction)."""
        base = cls(downsample_rate=downsample_rate)
        q = base(np.asarray(p, dtype=np.float64))
        if method == "platt":
            a, b = fit_platt(q, y)
            return cls(downsample_rate=downsample_rate, method="platt", a=a, b=b)
        if method == "isotonic":
            x, v = fit_isotonic(q, y)
            return cls(
                downsample_rate=downsample_rate, method="isotonic", x=x.tolist(), y=v.tolist()
            )
        return base
