"""The fusion interface: per-task probabilities in, one ranking score per row out.

A fusion runs after the model (probabilities only from here on, DESIGN.md). It holds its task
names, its parameters (a pydantic model, so the JSON file is validated on load) and an optional
per-task :class:`~mtlrec.fusion.calibration.Calibration` applied first.

Parametric formulas split scoring in two: ``prepare(P, groups) -> Z`` (everything that does not
depend on the searched parameters: transforms, calibration, ranks) and ``combine(Z, x)`` (a
matrix product with the parameter vector), so a searcher evaluates thousands of parameter
vectors for the cost of one matrix product each.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from mtlrec.errors import ConfigError, DataError
from mtlrec.fusion.calibration import Calibration

FUSION_FORMAT = 1


def _to_numpy(v: Any, task: str) -> np.ndarray:
    if type(v).__module__.startswith("torch"):
        v = v.detach().cpu().numpy()
    a = np.asarray(v, dtype=np.float64)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise DataError(f"task {task!r}: expected one score per row (shape [N]), got {a.shape}")
    return a


class Fusion(ABC):
    """Base class of every fusion: ``fusion(probs, groups=None) -> scores``.

    Args:
        params: the validated parameters of the registered fusion kind.
        calibration: optional per-task calibration applied before the formula.
        meta: free-form information kept in the JSON file (objective, metrics, searcher).

    Shapes:
        probs[task]: ``[N]`` (numpy array or torch tensor); groups: ``[N]`` request ids or None
        (the whole input is one list; only rank fusion uses it); returns ``[N]`` (a tensor if
        the input was torch, else numpy float64).
    """

    kind: ClassVar[str] = ""

    def __init__(
        self,
        params: BaseModel,
        calibration: Mapping[str, Calibration] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.params = params
        self.calibration = dict(calibration or {})
        self.meta = dict(meta or {})
        unknown = sorted(set(self.calibration) - set(self.tasks))
        if unknown:
            raise ConfigError(
                f"fusion {self.kind!r}: calibration for unknown tasks {unknown} "
                f"(fused tasks: {list(self.tasks)})"
            )

    @property
    @abstractmethod
    def tasks(self) -> tuple[str, ...]:
        """The fused tasks, in the order of the matrix columns."""

    # -- inputs ---------------------------------------------------------------------------------
    def check_tasks(self, available: Sequence[str]) -> None:
        """Raise :class:`ConfigError` naming the fused tasks missing from ``available``."""
        missing = [t for t in self.tasks if t not in available]
        if missing:
            raise ConfigError(
                f"fusion uses tasks {missing} that are not predicted "
                f"(available: {', '.join(available)})"
            )

    def matrix(self, probs: Mapping[str, Any], *, calibrate: bool = True) -> np.ndarray:
        """``[N, T]`` float64 matrix of the fused tasks (calibrated unless told otherwise)."""
        self.check_tasks(list(probs))
        cols = [_to_numpy(probs[t], t) for t in self.tasks]
        n = {len(c) for c in cols}
        if len(n) > 1:
            lengths = {t: len(c) for t, c in zip(self.tasks, cols, strict=True)}
            raise DataError(f"fusion inputs differ in length: {lengths}")
        for t, c in zip(self.tasks, cols, strict=True):
            if not np.isfinite(c).all():
                row = int(np.flatnonzero(~np.isfinite(c))[0]) + 1
                raise DataError("the task's score is not a finite number", column=t, row=row)
        if calibrate:
            cols = [
                self.calibration[t](c) if t in self.calibration else c
                for t, c in zip(self.tasks, cols, strict=True)
            ]
        if not cols:
            return np.zeros((0, 0))
        return np.stack(cols, axis=1)  # [N, T]

    def __call__(self, probs: Mapping[str, Any], groups: Any = None) -> Any:
        """Fused scores of every row (see the class docstring for shapes)."""
        as_torch = any(type(v).__module__.startswith("torch") for v in probs.values())
        p = self.matrix(probs)
        g = None if groups is None else _to_numpy(groups, "groups")
        if g is not None and len(g) != len(p):
            raise DataError(f"groups has {len(g)} rows, the scores {len(p)}")
        s = self.score(p, g)
        if as_torch:
            import torch

            return torch.from_numpy(np.ascontiguousarray(s))
        return s

    @abstractmethod
    def score(self, p: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        """Scores ``[N]`` of a calibrated ``[N, T]`` matrix."""

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FUSION_FORMAT,
            "kind": self.kind,
            "tasks": list(self.tasks),
            "params": self.params.model_dump(mode="json"),
            "calibration": {t: c.model_dump(mode="json") for t, c in self.calibration.items()},
            "meta": _json_safe(self.meta),
        }


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


class ParametricFusion(Fusion):
    """A formula with a vector of searchable parameters (see the module docstring).

    Subclasses set ``search`` (parameter group -> default (low, high) bounds, each group one
    value per task) and implement ``prepare`` and ``combine``.
    """

    search: ClassVar[dict[str, tuple[float, float]]] = {}
    primary: ClassVar[str] = "weights"

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(getattr(self.params, self.primary))

    def vector(self) -> np.ndarray:
        """The searchable parameters as one vector ``[G * T]`` (group-major)."""
        return np.array(
            [getattr(self.params, g).get(t, 0.0) for g in self.search for t in self.tasks],
            dtype=np.float64,
        )

    def dimension_names(self) -> list[str]:
        return [f"{g}.{t}" for g in self.search for t in self.tasks]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo = np.repeat([b[0] for b in self.search.values()], len(self.tasks)).astype(np.float64)
        hi = np.repeat([b[1] for b in self.search.values()], len(self.tasks)).astype(np.float64)
        return lo, hi

    def with_vector(self, x: np.ndarray, meta: dict[str, Any] | None = None) -> ParametricFusion:
        """A copy with the searchable parameters replaced by ``x``."""
        x = np.asarray(x, dtype=np.float64).reshape(len(self.search), len(self.tasks))
        update = {
            g: {t: float(v) for t, v in zip(self.tasks, row, strict=True)}
            for g, row in zip(self.search, x, strict=True)
        }
        params = self.params.model_validate({**self.params.model_dump(), **update})
        return type(self)(params, self.calibration, meta if meta is not None else self.meta)

    @abstractmethod
    def prepare(self, p: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        """Features ``[N, G * T]`` that do not depend on the searched parameters."""

    def combine(self, z: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Scores from prepared features; ``x`` is ``[G * T]`` or a batch ``[K, G * T]``."""
        return z @ np.asarray(x, dtype=np.float64).T  # [N] or [N, K]

    def score(self, p: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        return self.combine(self.prepare(p, groups), self.vector())
