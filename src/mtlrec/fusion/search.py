"""Offline search of a formula's parameters on held-out predictions.

The objective of a parameter vector ``x`` is ``sum_t c_t * AUC_t(fused score)``: the AUC (or
GAUC, per request, when there are requests) of the *fused* score against each task's labels,
over the task's sample space, weighted by the user's coefficients ``c_t``. A task may have a
floor: a vector whose AUC on that task is below the floor is infeasible and scored
``objective - 1000 * shortfall`` so that every searcher prefers feasible points.

Searchers (all maximise, in the box given by the formula's bounds, and record every point):

- ``grid``: a regular grid, ``round(budget ** (1 / D))`` points per dimension;
- ``random``: uniform samples;
- ``cem``: the cross-entropy method (Rubinstein, "The Cross-Entropy Method for Combinatorial
  and Continuous Optimization", 1999) as practised for fusion weights: sample a Gaussian around
  the current best, refit its spread to the top-k samples, iterate;
- ``es``: a (mu, lambda) evolution strategy with the 1/5 success rule for its step size
  (Beyer & Schwefel, "Evolution strategies - A comprehensive introduction", 2002);
- ``tpe`` / ``cmaes``: optuna's TPE (Bergstra et al., NeurIPS 2011) and CMA-ES (Hansen 2016,
  through the ``cmaes`` package) samplers; the ``search`` extra.

Every searcher starts from the formula's current parameters (equal weights by default), so the
best point found is never worse than the start on the search data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtlrec.errors import ConfigError
from mtlrec.fusion.base import ParametricFusion
from mtlrec.metrics.ranking import _grouped_auc

SEARCHERS = ("grid", "random", "cem", "es", "tpe", "cmaes")


class FusionObjective:
    """Weighted per-task AUC/GAUC of fused scores; vectorised over rows.

    Args:
        labels: task -> ``[N]`` 0/1 labels (NaN outside the sample space allowed).
        masks: task -> ``[N]`` bool sample space (None: every row with a label).
        coefficients: task -> weight in the objective (tasks not named are not scored).
        groups: ``[N]`` request ids: GAUC instead of AUC when given and ``grouped``.
        floors: task -> the lowest acceptable AUC of that task.
    """

    def __init__(
        self,
        labels: Mapping[str, np.ndarray],
        coefficients: Mapping[str, float],
        *,
        masks: Mapping[str, np.ndarray] | None = None,
        groups: np.ndarray | None = None,
        grouped: bool = True,
        floors: Mapping[str, float] | None = None,
    ) -> None:
        unknown = sorted(set(coefficients) - set(labels))
        unknown += sorted(set(floors or {}) - set(labels))
        if unknown:
            raise ConfigError(
                f"objective names tasks {sorted(set(unknown))} without labels "
                f"(tasks: {', '.join(labels)})"
            )
        self.tasks = list(coefficients)
        self.coefficients = np.array([coefficients[t] for t in self.tasks], dtype=np.float64)
        self.floors = np.array([(floors or {}).get(t, -math.inf) for t in self.tasks])
        self.metric = "gauc" if groups is not None and grouped else "auc"
        self._rows: list[np.ndarray] = []
        self._y: list[np.ndarray] = []
        self._g: list[tuple[np.ndarray | None, int, np.ndarray | None]] = []
        for t in self.tasks:
            y = np.asarray(labels[t], dtype=np.float64).reshape(-1)
            m = ~np.isnan(y)
            if masks is not None and t in masks:
                m &= np.asarray(masks[t], dtype=bool).reshape(-1)
            rows = np.flatnonzero(m)
            self._rows.append(rows)
            self._y.append(y[rows])
            if self.metric == "gauc":
                assert groups is not None
                uniq, inv = np.unique(np.asarray(groups).reshape(-1)[rows], return_inverse=True)
                inv = inv.reshape(-1)
                self._g.append((inv, len(uniq), np.bincount(inv, minlength=len(uniq)) * 1.0))
            else:
                self._g.append((None, 1, None))

    def per_task(self, scores: np.ndarray) -> np.ndarray:
        """``[T]`` AUC (or GAUC) of each scored task."""
        out = np.empty(len(self.tasks))
        for j, (rows, y, (gi, ng, sizes)) in enumerate(
            zip(self._rows, self._y, self._g, strict=True)
        ):
            a = _grouped_auc(scores[rows], y, None, gi, ng)
            if sizes is None:
                out[j] = a[0]
            else:
                ok = ~np.isnan(a)
                out[j] = (a[ok] * sizes[ok]).sum() / sizes[ok].sum() if ok.any() else math.nan
        return out

    def value(self, per_task: np.ndarray) -> tuple[float, bool]:
        """The objective and whether every floor holds."""
        base = float(np.nansum(self.coefficients * per_task))
        short = np.maximum(self.floors - np.nan_to_num(per_task, nan=-math.inf), 0.0)
        short = np.where(np.isfinite(short), short, 1.0)
        return base - 1000.0 * float(short.sum()), bool((short <= 0).all())


@dataclass
class Trial:
    x: np.ndarray
    metrics: np.ndarray  # [T] per-task AUC
    objective: float
    feasible: bool


@dataclass
class SearchResult:
    """Every point explored, the best one and the fusion built from it."""

    method: str
    tasks: list[str]
    dimension_names: list[str]
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0
    fusion: ParametricFusion | None = None

    @property
    def best(self) -> Trial:
        return max(self.trials, key=lambda t: (t.feasible, t.objective))

    @property
    def start(self) -> Trial:
        return self.trials[0]

    def pareto(self) -> list[Trial]:
        """The trials whose per-task metrics no other trial dominates (sorted by objective)."""
        m = np.array([t.metrics for t in self.trials])  # [K, T]
        m = np.nan_to_num(m, nan=-math.inf)
        ge = (m[:, None, :] >= m[None, :, :]).all(-1)  # [K, K]: i >= j on every task
        gt = (m[:, None, :] > m[None, :, :]).any(-1)
        dominated = (ge & gt).any(0)  # j is dominated by some i
        _, first = np.unique(m, axis=0, return_index=True)  # one trial per distinct point
        keep = [i for i in sorted(first) if not dominated[i]]
        return sorted((self.trials[i] for i in keep), key=lambda t: -t.objective)


class _Evaluator:
    def __init__(
        self,
        fusion: ParametricFusion,
        z: np.ndarray,
        objective: FusionObjective,
        result: SearchResult,
        budget: int,
    ) -> None:
        self.fusion, self.z, self.objective, self.result = fusion, z, objective, result
        self.budget = budget

    @property
    def left(self) -> int:
        return self.budget - len(self.result.trials)

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        """Objectives ``[K]`` of a batch ``[K, D]`` of parameter vectors (budget permitting)."""
        xs = np.atleast_2d(xs)[: max(self.left, 0)]
        if len(xs) == 0:
            return np.zeros(0)
        scores = self.fusion.combine(self.z, xs)  # [N, K]
        out = np.empty(len(xs))
        for k in range(len(xs)):
            m = self.objective.per_task(np.ascontiguousarray(scores[:, k]))
            v, ok = self.objective.value(m)
            self.result.trials.append(Trial(xs[k].copy(), m, v, ok))
            out[k] = v
        return out


def search_fusion(
    fusion: ParametricFusion,
    probs: Mapping[str, np.ndarray],
    objective: FusionObjective,
    *,
    method: str = "cem",
    budget: int = 200,
    seed: int = 0,
    groups: np.ndarray | None = None,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
    population: int = 20,
    elite_fraction: float = 0.25,
) -> SearchResult:
    """Search ``fusion``'s parameters to maximise ``objective`` on held-out ``probs``.

    Args:
        fusion: the formula with its starting parameters (and calibration, applied first).
        probs: task -> ``[N]`` probabilities of the held-out rows.
        objective: see :class:`FusionObjective`.
        method: one of :data:`SEARCHERS`.
        budget: number of parameter vectors evaluated (the start included).
        seed: the searcher's random seed (same seed, same result).
        groups: ``[N]`` request ids (rank fusion ranks within them).
        bounds: ``(low, high)`` per dimension (default: the formula's).
        population, elite_fraction: samples per round and the share kept (cem, es).

    Returns:
        A :class:`SearchResult` whose ``fusion`` holds the best parameters.
    """
    if method not in SEARCHERS:
        raise ConfigError(f"unknown search method {method!r}; choose from {', '.join(SEARCHERS)}")
    if budget < 1:
        raise ConfigError("search budget must be >= 1")
    t0 = time.perf_counter()
    lo, hi = bounds if bounds is not None else fusion.bounds()
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    z = fusion.prepare(fusion.matrix(probs), groups)  # [N, D]
    result = SearchResult(method, objective.tasks, fusion.dimension_names())
    ev = _Evaluator(fusion, z, objective, result, budget)
    x0 = np.clip(fusion.vector(), lo, hi)
    ev(x0[None])
    rng = np.random.default_rng(seed)
    runner: Callable[..., None] = {
        "grid": _grid,
        "random": _random,
        "cem": _cem,
        "es": _es,
        "tpe": _optuna,
        "cmaes": _optuna,
    }[method]
    runner(
        ev,
        x0=x0,
        lo=lo,
        hi=hi,
        rng=rng,
        method=method,
        seed=seed,
        population=population,
        elite_fraction=elite_fraction,
    )
    best = result.best
    result.seconds = time.perf_counter() - t0
    result.fusion = fusion.with_vector(
        best.x,
        meta={
            "method": method,
            "seed": seed,
            "budget": budget,
            "metric": objective.metric,
            "objective": best.objective,
            "feasible": best.feasible,
            "per_task": dict(zip(objective.tasks, best.metrics.tolist(), strict=True)),
            "start_objective": result.start.objective,
        },
    )
    return result


def _grid(ev: _Evaluator, *, lo: np.ndarray, hi: np.ndarray, **_: Any) -> None:
    d = len(lo)
    per_dim = max(2, math.floor((ev.left) ** (1.0 / d) + 1e-9)) if d else 1
    axes = [np.linspace(lo[i], hi[i], per_dim) for i in range(d)]
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, d)  # [P^D, D]
    for start in range(0, len(mesh), 256):
        if ev.left <= 0:
            break
        ev(mesh[start : start + 256])


def _random(
    ev: _Evaluator, *, lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator, **_: Any
) -> None:
    while ev.left > 0:
        ev(rng.uniform(lo, hi, size=(min(ev.left, 256), len(lo))))


def _cem(
    ev: _Evaluator,
    *,
    x0: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    rng: np.random.Generator,
    population: int,
    elite_fraction: float,
    **_: Any,
) -> None:
    best_x, best_v = x0, ev.result.trials[0].objective
    sigma = (hi - lo) / 4.0
    n_elite = max(2, round(population * elite_fraction))
    while ev.left > 0:
        xs = np.clip(best_x + sigma * rng.standard_normal((population, len(lo))), lo, hi)
        vs = ev(xs)
        if len(vs) == 0:
            break
        xs = xs[: len(vs)]
        elite = xs[np.argsort(-vs)[:n_elite]]  # [k, D] top-k of the round
        if vs.max() > best_v:
            best_v, best_x = float(vs.max()), xs[int(np.argmax(vs))]
        # refit the spread to the elites around the best, never collapsing to zero
        sigma = 0.7 * np.sqrt(((elite - best_x) ** 2).mean(0)) + 0.3 * sigma
        sigma = np.maximum(sigma, 1e-3 * (hi - lo))


def _es(
    ev: _Evaluator,
    *,
    x0: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    rng: np.random.Generator,
    population: int,
    elite_fraction: float,
    **_: Any,
) -> None:
    mu = max(1, round(population * elite_fraction))
    mean, step = x0.copy(), 0.25
    best_v = ev.result.trials[0].objective
    scale = hi - lo
    while ev.left > 0:
        xs = np.clip(mean + step * scale * rng.standard_normal((population, len(lo))), lo, hi)
        vs = ev(xs)
        if len(vs) == 0:
            break
        xs = xs[: len(vs)]
        parents = xs[np.argsort(-vs)[:mu]]
        mean = parents.mean(0)  # intermediate recombination of the mu best
        success = float((vs > best_v).mean())
        best_v = max(best_v, float(vs.max()))
        step *= math.exp((success - 0.2) / 0.8)  # 1/5 success rule
        step = float(np.clip(step, 1e-4, 1.0))


def _optuna(
    ev: _Evaluator,
    *,
    x0: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    method: str,
    seed: int,
    **_: Any,
) -> None:
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            f"search method {method!r} needs the search extra: pip install 'mtlrec[search]'"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if method == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError(
                "search method 'cmaes' needs the cmaes package: pip install 'mtlrec[search]'"
            ) from None
        sampler: Any = optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    names = [f"x{i}" for i in range(len(lo))]
    # the start point (already evaluated) is told to the study so that the samplers use it
    study.add_trial(
        optuna.trial.create_trial(
            params=dict(zip(names, x0.tolist(), strict=True)),
            distributions={
                n: optuna.distributions.FloatDistribution(float(a), float(b))
                for n, a, b in zip(names, lo, hi, strict=True)
            },
            value=ev.result.trials[0].objective,
        )
    )

    def objective(trial: Any) -> float:
        x = np.array(
            [
                trial.suggest_float(n, float(a), float(b))
                for n, a, b in zip(names, lo, hi, strict=True)
            ]
        )
        return float(ev(x[None])[0])

    study.optimize(objective, n_trials=max(ev.left, 0))
