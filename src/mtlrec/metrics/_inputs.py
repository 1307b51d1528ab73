"""Input checks and weighted means shared by the metric functions (float64 throughout)."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

ArrayLike = npt.ArrayLike


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
