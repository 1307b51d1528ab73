"""MGDA-UB: min-norm task weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting._solvers import min_norm_weights
from mtlrec.weighting.base import GradParams, SharedUpdateWeighting

PAPER = "Sener, Koltun. Multi-Task Learning as Multi-Objective Optimization. NeurIPS 2018"


class MGDAParams(GradParams):
    normalization: Literal["none", "l2", "loss", "loss+"] = Field(
        default="none",
        description="gradient normalisation before the min-norm solve (the paper's code: "
        "none, l2 = unit norm, loss = divide by the loss, loss+ = by loss * norm)",
    )
    scale: Literal["one", "num_tasks"] = Field(
        default="one",
        description="weights sum to 1 (the paper) or to T (the scale of equal weights)",
    )


@WEIGHTINGS.register("mgda", params=MGDAParams, paper=PAPER)
class MGDA(SharedUpdateWeighting):
    """Multiple-gradient descent with the min-norm solver (Sener & Koltun, NeurIPS 2018).

    Weights ``w = argmin_{w in simplex} ||sum_t w_t g_t||^2`` from the Gram matrix of the task
    gradients: the closed form ``w_1 = clip((g2-g1).g2 / ||g1-g2||^2, 0, 1)`` for two tasks,
    Frank-Wolfe with exact line search otherwise. With ``grad_target: representation`` the
    gradients are taken of the shared representation (the towers' input) instead of the shared
    parameters: the paper's MGDA-UB upper bound, whose cost is a backward through the towers
    only (it needs a model whose towers read one shared tensor, e.g. shared_bottom).
    As in the paper's Algorithm 2, only the shared update is ``alpha @ J``; task-specific
    parameters get their own task's gradient.
    """

    needs_grads = True
    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: MGDAParams) -> None:
        super().__init__(task_names)
        self.set_grad_options(params)
        self.init_shared_update()
        self.normalization = params.normalization
        self.scale = params.scale

    def shared_weights(self, losses: Tensor, jacobian: Tensor) -> Tensor:
        """The weights ``alpha [T]`` of the task gradients in the shared update."""
        j = jacobian.detach()
        raw = (j @ j.T).to(torch.float64)  # [T, T]
        norms = raw.diagonal().clamp_min(1e-24).sqrt()
        if self.normalization == "l2":
            scale = norms
        elif self.normalization == "loss":
            scale = losses.detach().to(torch.float64).clamp_min(1e-12)
        elif self.normalization == "loss+":
            scale = losses.detach().to(torch.float64).clamp_min(1e-12) * norms
        else:
            scale = torch.ones_like(norms)
        gram = raw / (scale[:, None] * scale[None, :])
        w = min_norm_weights(gram) / scale  # weights of the un-normalised gradients
        w = w / w.sum()
        if self.scale == "num_tasks":
            w = w * self.num_tasks
        return w
