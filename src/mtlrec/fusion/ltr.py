"""Learned fusion: a LightGBM ranker and a small monotone neural layer over the task scores.

Both are trained on the task predictions of a held-out split (never the model's training
rows) against a *business label* defined from the task labels (:func:`business_label`), with
early stopping on a validation part of that split (a split by request when there are requests).

- :class:`LGBMFusion`: LightGBM (Ke et al., NeurIPS 2017) with ``lambdarank`` per request
  (Burges, "From RankNet to LambdaRank to LambdaMART", MSR-TR-2010-82) or, without requests,
  cross-entropy on the business label scaled to [0, 1]. Monotone constraints (+1 on every task)
  keep the fused score non-decreasing in each task's probability. Saved in LightGBM's text
  format next to the JSON (never pickle). Needs the ``ltr`` extra.
- :class:`NeuralFusion`: ``s = w2+ . tanh(W1+ z + b1) + b2`` on standardised logits ``z``, with
  ``W1+ = softplus(W1)`` and ``w2+ = softplus(w2)`` positive, so ``s`` is non-decreasing in every
  task (a monotone network in the sense of Sill, "Monotonic Networks", NIPS 1998; the idea of
  xMTF's monotonic fusion cell, Cao et al., WWW 2025). Trained in torch; applied in numpy.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mtlrec.errors import CheckpointError, ConfigError
from mtlrec.fusion.base import Fusion
from mtlrec.fusion.calibration import Calibration, _logit
from mtlrec.registry import FUSIONS

# -- business label ---------------------------------------------------------------------------
_BINOPS = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.Div: np.divide,
    ast.Pow: np.power,
}
_CMPOPS = {
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Eq: np.equal,
    ast.NotEq: np.not_equal,
}


def business_label(expression: str, labels: Mapping[str, np.ndarray]) -> np.ndarray:
    """Evaluate an arithmetic expression of task labels, e.g. ``"click + 4 * conv"``.

    Labels missing outside a task's sample space (NaN) count as 0. Allowed: task names, numbers,
    ``+ - * / **``, comparisons (true = 1), ``min(a, b)``, ``max(a, b)``.

    Example:
        >>> business_label("a + 2*b", {"a": np.array([1., 0.]), "b": np.array([1., np.nan])})
        array([3., 0.])
    """
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ConfigError(f"business label {expression!r} is not a valid expression") from None
    arrays = {k: np.nan_to_num(np.asarray(v, dtype=np.float64), nan=0.0) for k, v in labels.items()}

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in arrays:
                raise ConfigError(
                    f"business label {expression!r}: unknown task {node.id!r} "
                    f"(tasks: {', '.join(arrays)})"
                )
            return arrays[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
            return _CMPOPS[type(node.ops[0])](ev(node.left), ev(node.comparators[0])) * 1.0
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("min", "max")
            and len(node.args) == 2
            and not node.keywords
        ):
            f = np.minimum if node.func.id == "min" else np.maximum
            return f(ev(node.args[0]), ev(node.args[1]))
        raise ConfigError(f"business label {expression!r}: {ast.dump(node)[:40]} is not allowed")

    n = len(next(iter(arrays.values()))) if arrays else 0
    out = np.broadcast_to(np.asarray(ev(tree), dtype=np.float64), (n,)).copy()
    if not np.isfinite(out).all():
        raise ConfigError(f"business label {expression!r} is not finite on every row")
    return out


def validation_split(n: int, groups: np.ndarray | None, fraction: float, seed: int) -> np.ndarray:
    """Boolean ``[N]`` mask of the validation part: whole requests when there are requests."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.random(n) < fraction
    uniq, inv = np.unique(groups, return_inverse=True)
    return (rng.random(len(uniq)) < fraction)[inv.reshape(-1)]


# -- LightGBM ---------------------------------------------------------------------------------
# LightGBM stores labels as float32: integer grades above 2**24 would no longer be distinct
MAX_GRADES = 2**24


def lambdarank_grades(
    target: np.ndarray, max_grades: int = MAX_GRADES
) -> tuple[np.ndarray, list[float]]:
    """The business label as LightGBM lambdarank wants it: integer relevance grades, and the
    gain of each grade.

    The distinct values ``v_0 < v_1 < ... < v_{K-1}`` of ``target`` become grades ``0..K-1``
    (order kept: a click-only row labelled 0.5 stays above a non-click at 0, where rounding to
    the nearest integer would merge them), and grade ``k`` gains ``v_k`` (``label_gain``), so
    NDCG and its lambda gradients weigh each row by its business value, as "gain = relevance"
    does for integer labels (Burges, MSR-TR-2010-82).

    Args:
        target: ``[N]`` business label, ``>= 0``.
        max_grades: the most distinct values accepted.

    Returns:
        ``(grades [N] int64, label_gain [K])``.

    Raises:
        ConfigError: more distinct values than ``max_grades`` (LightGBM keeps labels in
            float32, so at most 2**24 grades stay distinct).

    Example:
        >>> lambdarank_grades(np.array([0.0, 1.5, 0.5, 0.0]))
        (array([0, 2, 1, 0]), [0.0, 0.5, 1.5])
    """
    values, grades = np.unique(np.asarray(target, dtype=np.float64), return_inverse=True)
    if len(values) > max_grades:
        raise ConfigError(
            f"the business label takes {len(values)} distinct values; lambdarank needs one "
            f"integer grade per value and supports at most {max_grades}: define a label with "
            "fewer levels (e.g. 'click + 4*conv'), or fit with the cross_entropy objective"
        )
    return grades.reshape(-1).astype(np.int64), values.tolist()


class LGBMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(min_length=1)
    model_file: str
    objective: Literal["lambdarank", "cross_entropy"] = "cross_entropy"


@FUSIONS.register("lgbm", params=LGBMParams, paper="Ke et al., NeurIPS 2017; Burges 2010")
class LGBMFusion(Fusion):
    """A LightGBM model over the task probabilities (see the module docstring)."""

    kind = "lgbm"

    def __init__(
        self,
        params: LGBMParams,
        calibration: Mapping[str, Calibration] | None = None,
        meta: dict[str, Any] | None = None,
        *,
        booster: Any = None,
        base_dir: str | Path | None = None,
    ) -> None:
        super().__init__(params, calibration, meta)
        if booster is None:
            booster = self._load(Path(base_dir or ".") / params.model_file)
        if booster.num_feature() != len(params.tasks):
            raise CheckpointError(
                f"{params.model_file}: the LightGBM model reads {booster.num_feature()} "
                f"features, the fusion names {len(params.tasks)} tasks"
            )
        self.booster = booster

    @staticmethod
    def _load(path: Path) -> Any:
        import lightgbm as lgb

        if not path.is_file():
            raise CheckpointError(f"{path}: LightGBM model file not found")
        try:
            return lgb.Booster(model_file=str(path))
        except lgb.basic.LightGBMError as e:
            raise CheckpointError(f"{path}: not a LightGBM text model ({e})") from None

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.params.tasks)

    def score(self, p: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        return np.asarray(self.booster.predict(p), dtype=np.float64)

    def save_artifacts(self, json_path: Path) -> None:
        """Write the model in LightGBM's text format next to the JSON file (atomically)."""
        from mtlrec.utils.atomic import write_text

        write_text(json_path.parent / self.params.model_file, self.booster.model_to_string())


def fit_lgbm(
    p: np.ndarray,
    target: np.ndarray,
    tasks: list[str],
    *,
    groups: np.ndarray | None = None,
    objective: Literal["lambdarank", "cross_entropy"] | None = None,
    model_file: str = "fusion.lgbm.txt",
    valid_fraction: float = 0.2,
    seed: int = 0,
    num_leaves: int = 15,
    learning_rate: float = 0.05,
    max_rounds: int = 500,
    patience: int = 30,
    monotone: bool = True,
    num_threads: int = 0,
) -> LGBMFusion:
    """Train :class:`LGBMFusion` on held-out task probabilities ``p [N, T]`` and a business
    label ``target [N]`` (lambdarank when ``groups`` are given, unless told otherwise)."""
    try:
        import lightgbm as lgb
    except ImportError:
        raise ConfigError(
            "LightGBM fusion needs the ltr extra: pip install 'mtlrec[ltr]'"
        ) from None
    objective = objective or ("lambdarank" if groups is not None else "cross_entropy")
    if objective == "lambdarank" and groups is None:
        raise ConfigError("lambdarank fusion needs a request/group column (schema.group_column)")
    if target.min() < 0:
        raise ConfigError("the business label must be >= 0 for LightGBM fusion")
    order = np.arange(len(p)) if groups is None else np.argsort(groups, kind="stable")
    p, target = p[order], target[order]
    g = None if groups is None else groups[order]
    is_valid = validation_split(len(p), g, valid_fraction, seed)
    params: dict[str, Any] = {
        "objective": objective,
        "num_leaves": num_leaves,
        "learning_rate": learning_rate,
        "min_data_in_leaf": 50,
        "verbose": -1,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": num_threads,
    }
    if monotone:
        params["monotone_constraints"] = [1] * p.shape[1]
    if objective == "lambdarank":
        y, params["label_gain"] = lambdarank_grades(target)  # ordered grades, gain = value
        params["metric"] = "ndcg"
        params["eval_at"] = [10]
    else:
        top = float(target.max())
        y = target / top if top > 0 else target
        params["metric"] = "cross_entropy"

    def dataset(sel: np.ndarray, ref: Any = None) -> Any:
        group_sizes = None
        if g is not None:
            gs = g[sel]
            group_sizes = np.diff(
                np.flatnonzero(np.concatenate(([True], gs[1:] != gs[:-1], [True])))
            )
        return lgb.Dataset(p[sel], y[sel], group=group_sizes, reference=ref, free_raw_data=False)

    train = dataset(~is_valid)
    valid = dataset(is_valid, train)
    booster = lgb.train(
        params,
        train,
        num_boost_round=max_rounds,
        valid_sets=[valid],
        callbacks=[lgb.early_stopping(patience, verbose=False)],
    )
    fusion = LGBMFusion(
        LGBMParams(tasks=tasks, model_file=model_file, objective=objective),
        booster=booster,
        meta={"best_iteration": booster.best_iteration},
    )
    # keep only the trees up to the best iteration in the saved text
    fusion.booster = lgb.Booster(
        model_str=booster.model_to_string(
            num_iteration=-1 if booster.best_iteration <= 0 else booster.best_iteration
        )
    )
    return fusion


# -- neural -----------------------------------------------------------------------------------
class NeuralParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(min_length=1)
    mean: list[float]
    scale: list[float]
    w1: list[list[float]]  # [T, H], already positive
    b1: list[float]  # [H]
    w2: list[float]  # [H], already positive
    b2: float = 0.0

    @model_validator(mode="after")
    def _shapes(self) -> NeuralParams:
        t, h = len(self.tasks), len(self.b1)
        if len(self.mean) != t or len(self.scale) != t or any(s <= 0 for s in self.scale):
            raise ValueError("mean and scale need one value per task, scale > 0")
        if len(self.w1) != t or any(len(r) != h for r in self.w1) or len(self.w2) != h:
            raise ValueError(f"w1 must be [{t}, {h}] and w2 [{h}]")
        if any(v < 0 for r in self.w1 for v in r) or any(v < 0 for v in self.w2):
            raise ValueError("weights must be >= 0 (monotone fusion)")
        return self


@FUSIONS.register("neural", params=NeuralParams, paper="Sill, NIPS 1998; Cao et al., WWW 2025")
class NeuralFusion(Fusion):
    """A monotone one-hidden-layer network over the task logits (see the module docstring)."""

    kind = "neural"

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.params.tasks)

    def score(self, p: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        q = self.params
        z = (_logit(p) - np.asarray(q.mean)) / np.asarray(q.scale)  # [N, T]
        h = np.tanh(z @ np.asarray(q.w1) + np.asarray(q.b1))  # [N, H]
        return h @ np.asarray(q.w2) + q.b2  # [N]


def fit_neural(
    p: np.ndarray,
    target: np.ndarray,
    tasks: list[str],
    *,
    groups: np.ndarray | None = None,
    hidden: int = 16,
    epochs: int = 100,
    lr: float = 0.02,
    batch_size: int = 4096,
    valid_fraction: float = 0.2,
    patience: int = 10,
    seed: int = 0,
) -> NeuralFusion:
    """Train :class:`NeuralFusion` with cross-entropy against the business label scaled to
    [0, 1], selecting the epoch with the lowest validation loss."""
    import torch
    import torch.nn.functional as F
    from torch.optim import Adam

    from mtlrec.autograd import multitask_backward
    from mtlrec.weighting.build import build_weighting

    if target.min() < 0:
        raise ConfigError("the business label must be >= 0 for neural fusion")
    top = float(target.max())
    y_all = target / top if top > 0 else target
    z_all = _logit(p)
    is_valid = validation_split(len(p), groups, valid_fraction, seed)
    mean = z_all[~is_valid].mean(axis=0)
    scale = np.maximum(z_all[~is_valid].std(axis=0), 1e-6)
    z = torch.from_numpy(((z_all - mean) / scale).astype(np.float32))
    y = torch.from_numpy(y_all.astype(np.float32))
    tr = torch.from_numpy(np.flatnonzero(~is_valid))
    va = torch.from_numpy(np.flatnonzero(is_valid))
    gen = torch.Generator().manual_seed(seed)
    t = len(tasks)
    w1 = torch.nn.Parameter(torch.randn(t, hidden, generator=gen) * 0.5 - 1.0)
    b1 = torch.nn.Parameter(torch.randn(hidden, generator=gen) * 0.1)
    w2 = torch.nn.Parameter(torch.randn(hidden, generator=gen) * 0.5 - 1.0)
    b2 = torch.nn.Parameter(torch.zeros(()))
    params = [w1, b1, w2, b2]
    opt = Adam(params, lr=lr)
    strategy = build_weighting("static", ["fusion"])

    def forward(idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(z[idx] @ F.softplus(w1) + b1)  # [B, H]
        return h @ F.softplus(w2) + b2  # [B]

    best = (math.inf, [x.detach().clone() for x in params])
    bad = 0
    for _ in range(epochs):
        perm = tr[torch.randperm(len(tr), generator=gen)]
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            loss = F.binary_cross_entropy_with_logits(forward(idx), y[idx])
            opt.zero_grad()
            multitask_backward({"fusion": loss}, strategy)
            opt.step()
        with torch.no_grad():
            vloss = (
                float(F.binary_cross_entropy_with_logits(forward(va), y[va])) if len(va) else 0.0
            )
        if vloss < best[0] - 1e-5:
            best, bad = (vloss, [x.detach().clone() for x in params]), 0
        else:
            bad += 1
            if bad >= patience:
                break
    bw1, bb1, bw2, bb2 = best[1]
    return NeuralFusion(
        NeuralParams(
            tasks=tasks,
            mean=mean.tolist(),
            scale=scale.tolist(),
            w1=F.softplus(bw1).double().tolist(),
            b1=bb1.double().tolist(),
            w2=F.softplus(bw2).double().tolist(),
            b2=float(bb2),
        ),
        meta={"valid_loss": best[0]},
    )
