"""Fusion formulas: weighted sum, weighted product, the extended product, rank fusion.

These are the "formula-based" multi-task fusion functions of industrial ranking (the fused score
is a fixed monotone formula of the task predictions with a few tuned coefficients: Zhao et al.,
"Recommending What Video to Watch Next: A Multitask Ranking System", RecSys 2019, Section 4.4
"a weighted combination ... with weights manually tuned"; Cao et al., "xMTF: A Formula-Free Model
for Reinforcement-Learning-Based Multi-Task Fusion", WWW 2025, Section 2, which lists the
weighted-sum and weighted-product families). With non-negative weights every formula is
non-decreasing in each task's probability. Vectorised: one matrix product per evaluation.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mtlrec.fusion.base import ParametricFusion
from mtlrec.fusion.calibration import EPS, _logit
from mtlrec.fusion.rank import group_buckets
from mtlrec.registry import FUSIONS

PerTask = dict[str, float]


def _check_keys(primary: str, tasks: PerTask, **others: PerTask) -> None:
    if not tasks:
        raise ValueError(f"{primary} must name at least one task")
    for name, d in others.items():
        unknown = sorted(set(d) - set(tasks))
        if unknown:
            raise ValueError(f"{name} names tasks {unknown} that are not in {primary}")


class SumParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: PerTask
    transform: Literal["identity", "log", "logit"] = "identity"

    @model_validator(mode="after")
    def _keys(self) -> SumParams:
        _check_keys("weights", self.weights)
        return self


@FUSIONS.register("weighted_sum", params=SumParams, paper="Zhao et al., RecSys 2019")
class WeightedSum(ParametricFusion):
    """Weighted sum ``sum_i w_i * f(p_i)`` with ``f`` identity, log or logit.

    Example:
        >>> f = WeightedSum(SumParams(weights={"click": 1.0, "buy": 2.0}))
        >>> f({"click": np.array([0.5, 0.1]), "buy": np.array([0.1, 0.4])}).round(3).tolist()
        [0.7, 0.9]
    """

    kind = "weighted_sum"
    search: ClassVar[dict[str, tuple[float, float]]] = {"weights": (0.0, 5.0)}

    def prepare(self, p: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        t = self.params.transform
        if t == "log":
            return np.log(np.clip(p, EPS, None))
        if t == "logit":
            return _logit(p)
        return p


class ProductParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exponents: PerTask
    offsets: PerTask = Field(default_factory=dict)

    @model_validator(mode="after")
    def _keys(self) -> ProductParams:
        _check_keys("exponents", self.exponents, offsets=self.offsets)
        if any(v < 0 for v in self.offsets.values()):
            raise ValueError("offsets must be >= 0")
        return self


@FUSIONS.register("weighted_product", params=ProductParams, paper="Cao et al., WWW 2025")
class WeightedProduct(ParametricFusion):
    """Weighted product ``prod_i (a_i + p_i) ** b_i``.

    Offsets ``a_i`` default to 0; the base is clipped at 1e-7; computed as
    ``exp(sum_i b_i * log(a_i + p_i))``.

    Example:
        >>> f = WeightedProduct(ProductParams(exponents={"a": 1.0, "b": 2.0}))
        >>> f({"a": np.array([0.5]), "b": np.array([0.5])}).round(4).tolist()
        [0.125]
    """

    kind = "weighted_product"
    primary = "exponents"
    search: ClassVar[dict[str, tuple[float, float]]] = {"exponents": (0.0, 3.0)}

    def prepare(self, p: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        a = np.array([self.params.offsets.get(t, 0.0) for t in self.tasks])  # [T]
        return np.log(np.clip(p + a, EPS, None))

    def combine(self, z: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.exp(np.clip(super().combine(z, x), -700.0, 700.0))


class ExtendedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exponents: PerTask
    slopes: PerTask = Field(default_factory=dict)
    factors: PerTask = Field(default_factory=dict)
    floors: PerTask = Field(default_factory=dict)

    @model_validator(mode="after")
    def _keys(self) -> ExtendedParams:
        _check_keys(
            "exponents",
            self.exponents,
            slopes=self.slopes,
            factors=self.factors,
            floors=self.floors,
        )
        if any(v <= 0 for v in self.factors.values()):
            raise ValueError("factors must be > 0")
        return self


@FUSIONS.register("extended_product", params=ExtendedParams, paper="Cao et al., WWW 2025")
class ExtendedProduct(ParametricFusion):
    """Extended product: factor, score-dependent exponent and floor per task.

    ``prod_i (1 + c_i * max(p_i, f_i)) ** (b_i + d_i * p_i)``: a per-task factor ``c_i``
    (default 1), a score-dependent exponent ``b_i + d_i * p_i`` and a floor ``f_i`` (default 0)
    under which a task's score stops lowering the product. The base is at least 1, so for
    ``b_i, d_i >= 0`` the score is non-decreasing in every ``p_i``. ``b`` and ``d`` are searched.

    Computed in log space: ``sum_i b_i * L_i + d_i * p_i * L_i`` with
    ``L_i = log1p(c_i * max(p_i, f_i))``, then ``exp``.
    """

    kind = "extended_product"
    primary = "exponents"
    search: ClassVar[dict[str, tuple[float, float]]] = {
        "exponents": (0.0, 3.0),
        "slopes": (0.0, 3.0),
    }

    def prepare(self, p: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        c = np.array([self.params.factors.get(t, 1.0) for t in self.tasks])  # [T]
        f = np.array([self.params.floors.get(t, 0.0) for t in self.tasks])  # [T]
        log_base = np.log1p(c * np.maximum(p, f))  # [N, T]
        return np.concatenate([log_base, p * log_base], axis=1)  # [N, 2T]

    def combine(self, z: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.exp(np.clip(super().combine(z, x), -700.0, 700.0))


class RankParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: PerTask
    buckets: int | None = Field(default=100, ge=2)

    @model_validator(mode="after")
    def _keys(self) -> RankParams:
        _check_keys("weights", self.weights)
        return self


@FUSIONS.register("rank", params=RankParams, paper="Cao et al., WWW 2025")
class RankFusion(ParametricFusion):
    """Rank fusion ``sum_i w_i * bucket(percentile of p_i in its request)``.

    Each task's score becomes its percentile within the request (``groups``; the whole input
    when there are none), cut into ``buckets`` equal buckets (None: raw percentiles). Invariant
    to any strictly increasing transform of a task's scores, so it needs no calibration.
    """

    kind = "rank"
    search: ClassVar[dict[str, tuple[float, float]]] = {"weights": (0.0, 5.0)}

    def prepare(self, p: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        cols = [group_buckets(p[:, j], groups, self.params.buckets) for j in range(p.shape[1])]
        return np.stack(cols, axis=1) if cols else np.zeros((len(p), 0))  # [N, T]
