"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting._solvers import project_simplex_np
from mtlrec.weighting.base import GradParams, Weighting

PAPER = (
    "Liu, Liu, Jin, Stone, Liu. Conflict-Averse Gradient Descent for Multi-task Learning. "
    "NeurIPS 2021"
)


class CAGradParams(GradParams):
    c: float = Field(default=0.4, ge=0, description="radius factor c (paper: 0.4 to 0.5)")
    iterations: int = Field(default=50, ge=1, description="projected-gradient steps of the dual")
    rescale: bool = Field(default=True, description="divide the update by 1 + c^2 (paper)")


@WEIGHTINGS.register("cagrad", params=CAGradParams, paper=PAPER)
class CAGrad(Weighting):
    """Conflict-Averse Gradient descent (Liu et al., NeurIPS 2021, Algorithm 1).

    With ``g0`` the average gradient and ``phi = c^2 ||g0||^2``, solve the dual
    ``min_{w in simplex} g_w . g0 + sqrt(phi) ||g_w||`` (``g_w = sum w_t g_t``; projected
    gradient descent on the ``T x T`` Gram matrix) and update the shared parameters along
    ``d = g0 + sqrt(phi) / ||g_w|| g_w`` (divided by ``1 + c^2`` with ``rescale``). The update is
    multiplied by T so that ``c = 0`` equals the sum of the task gradients (the static step);
    task-specific parameters get their plain task gradients.
    """

    needs_grads = True
    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: CAGradParams) -> None:
        super().__init__(task_names)
        self.set_grad_options(params)
        self.c = params.c
        self.iterations = params.iterations
        self.rescale = params.rescale

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        return torch.ones_like(losses)

    def dual_weights(self, gram: Tensor) -> Tensor:
        """The simplex weights ``w`` of the dual problem, from ``G [T, T]``."""
        g = gram.detach().cpu().double().numpy()
        t = g.shape[0]
        mean_col = g.mean(axis=1)  # G 1/T: g_t . g0
        sqrt_phi = self.c * float(np.sqrt(max(float(mean_col.mean()), 0.0)))
        w = np.full(t, 1.0 / t)
        step = 1.0 / ((1.0 + self.c) * float(np.linalg.norm(g, 2)) + 1e-30)
        for _ in range(self.iterations):
            gw_norm = float(np.sqrt(max(float(w @ g @ w), 1e-30)))
            grad = mean_col + sqrt_phi * (g @ w) / gw_norm
            w = project_simplex_np(w - step * grad, 1.0)
        return torch.from_numpy(w).to(gram.dtype)

    def aggregate(self, jacobian: Tensor, weights: Tensor) -> Tensor:
        j = jacobian.detach()
        gram = (j @ j.T).to(torch.float64)
        g0 = j.mean(dim=0)
        if self.c == 0:
            return self.num_tasks * g0
        w = self.dual_weights(gram)
        gw = (w.to(j.dtype)) @ j
        gw_norm = gw.norm().clamp_min(1e-20)
        sqrt_phi = self.c * g0.norm()
        d = g0 + (sqrt_phi / gw_norm) * gw
        if self.rescale:
            d = d / (1.0 + self.c**2)
        return self.num_tasks * d
