"""PCGrad: project conflicting task gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting.base import GradParams, Weighting

PAPER = (
    "Yu, Kumar, Gupta, Levine, Hausman, Finn. Gradient Surgery for Multi-Task Learning. "
    "NeurIPS 2020"
)


class PCGradParams(GradParams):
    seed: int = Field(default=0, description="seed of the per-step random task orders")


@WEIGHTINGS.register("pcgrad", params=PCGradParams, paper=PAPER)
class PCGrad(Weighting):
    """Projecting Conflicting Gradients (Yu et al., NeurIPS 2020, Algorithm 1).

    For each task i, its gradient ``g_i^PC`` starts as ``g_i``; for the other tasks j in a
    random order (drawn per task and per step from ``seed`` and the step counter, so a resumed
    run draws the same orders), if ``g_i^PC . g_j < 0`` then
    ``g_i^PC -= (g_i^PC . g_j) / ||g_j||^2 g_j``. The shared update is ``sum_i g_i^PC``; task-
    specific parameters get their plain task gradients (weights 1). Works on one gradient per
    task (the rows of ``J [T, P]``), never per parameter.
    """

    needs_grads = True
    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: PCGradParams) -> None:
        super().__init__(task_names)
        self.set_grad_options(params)
        self.seed = params.seed
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        return torch.ones_like(losses)

    def orders(self) -> list[list[int]]:
        """For each task, the order in which the other tasks are visited this step."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.step))
        t = self.num_tasks
        out = []
        for i in range(t):
            perm = torch.randperm(t, generator=gen).tolist()
            out.append([j for j in perm if j != i])
        return out

    def aggregate(self, jacobian: Tensor, weights: Tensor) -> Tensor:
        j = jacobian.detach()
        sq = (j * j).sum(dim=1).clamp_min(1e-20)  # [T]
        on = self.present.tolist()  # absent tasks (zero gradients) are skipped
        total = torch.zeros_like(j[0])
        for i, order in enumerate(self.orders()):
            if not on[i]:
                continue
            g = j[i].clone()  # g_i^PC, projected in turn against each other task's g_k
            for k in order:
                dot = g @ j[k]
                if on[k] and float(dot) < 0:
                    g -= (dot / sq[k]) * j[k]
            total += weights[i].detach() * g
        return total

    @torch.no_grad()
    def on_step_end(self, losses: Tensor) -> None:
        self.step += 1
