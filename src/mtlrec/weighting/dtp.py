"""Dynamic Task Prioritization."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtlrec.errors import ConfigError
from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting.base import Weighting

if TYPE_CHECKING:
    from mtlrec.batch import Batch
    from mtlrec.models.base import ModelOutput

PAPER = (
    "Guo, Haque, Huang, Yeung, Fei-Fei. Dynamic Task Prioritization for Multitask Learning. "
    "ECCV 2018"
)


class DTPParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kpi: Literal["accuracy", "auc"] = Field(
        default="auc", description="KPI of binary tasks: batch accuracy or batch AUC"
    )
    gamma: float = Field(default=1.0, ge=0, description="focusing parameter gamma_t")
    smoothing: float = Field(
        default=0.1, gt=0, le=1, description="alpha of the KPI's exponential moving average"
    )
    kinds: dict[str, Literal["binary", "multiclass", "regression"]] = Field(
        default_factory=dict,
        description="task kinds (default: inferred per batch: [B, C] logits multiclass, labels "
        "all 0/1 binary, otherwise regression)",
    )


def batch_auc(score: Tensor, y: Tensor) -> Tensor | None:
    """ROC AUC of one batch (Mann-Whitney, ties averaged); None without both classes."""
    pos = y > 0.5
    n_pos = int(pos.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    uniq, inverse, counts = torch.unique(score, return_inverse=True, return_counts=True)
    del uniq
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg_rank = ends - (counts.to(torch.float64) - 1) / 2  # 1-based mean rank of each value
    ranks = avg_rank[inverse]
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


@WEIGHTINGS.register("dtp", params=DTPParams, paper=PAPER)
class DTP(Weighting):
    """Dynamic Task Prioritization (Guo et al., ECCV 2018, eq. 5 and 7).

    Each task has a KPI ``kappa_t`` in (0, 1), smoothed as ``kbar_t <- alpha kappa_t +
    (1 - alpha) kbar_t`` over training batches; its weight is the focal-style priority

        ``w_t = -(1 - kbar_t)^gamma log(kbar_t)``

    so that hard tasks (low KPI) get large weights. KPIs: AUC (or accuracy) for binary tasks,
    accuracy for multiclass, and the batch R^2 clipped to (0, 1) for regression (an
    accuracy-like score; the paper's tasks are classification). Rows outside a task's mask are
    ignored. The smoothed KPIs are buffers (a resumed run continues them).
    """

    needs_outputs = True
    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: DTPParams) -> None:
        super().__init__(task_names)
        unknown = set(params.kinds) - set(self.task_names)
        if unknown:
            raise ConfigError(f"dtp kinds name unknown tasks {sorted(unknown)}")
        self.kpi_name = params.kpi
        self.gamma = params.gamma
        self.smoothing = params.smoothing
        self.kinds = dict(params.kinds)
        self.register_buffer("kpi", torch.full((self.num_tasks,), 0.5, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(self.num_tasks, dtype=torch.bool))

    def _kind(self, task: str, logits: Tensor | None, y: Tensor) -> str:
        if task in self.kinds:
            return self.kinds[task]
        if logits is not None and logits.ndim == 2:
            return "multiclass"
        return "binary" if bool(((y == 0) | (y == 1)).all()) else "regression"

    @torch.no_grad()
    def batch_kpi(self, task: str, output: ModelOutput, batch: Batch) -> Tensor | None:
        m = batch.masks[task]
        if not bool(m.any()):
            return None
        y = batch.labels[task][m]
        if task in output.log_probs:
            score, logits = output.log_probs[task][m], None
        else:
            logits = output.logits[task][m]
            score = logits
        kind = self._kind(task, logits, y)
        if kind == "multiclass":
            assert logits is not None
            return (logits.argmax(dim=-1) == y.long()).double().mean()
        if kind == "binary":
            if self.kpi_name == "auc":
                return batch_auc(score.detach().double(), y)
            thr = 0.0 if logits is not None else float(torch.log(torch.tensor(0.5)))
            return ((score > thr) == (y > 0.5)).double().mean()
        pred = score.detach().double()
        var = y.double().var(unbiased=False)
        if float(var) <= 0:
            return None
        r2 = 1 - ((pred - y.double()) ** 2).mean() / var
        return r2

    @torch.no_grad()
    def observe(self, output: ModelOutput, batch: Batch) -> None:
        for i, t in enumerate(self.task_names):
            k = self.batch_kpi(t, output, batch)
            if k is None:
                continue
            k = k.clamp(1e-4, 1 - 1e-4)
            if bool(self.seen[i]):
                self.kpi[i] = self.smoothing * k + (1 - self.smoothing) * self.kpi[i]
            else:
                self.kpi[i] = k
                self.seen[i] = True

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        k = self.kpi.clamp(1e-4, 1 - 1e-4)
        w = -((1 - k) ** self.gamma) * torch.log(k)
        return w.to(losses.dtype)
