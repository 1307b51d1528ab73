"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting._solvers import EXACT_MAX_TASKS, cagrad_dual, gram64
from mtlrec.weighting.base import GradParams, Weighting

PAPER = (
    "Liu, Liu, Jin, Stone, Liu. Conflict-Averse Gradient Descent for Multi-task Learning. "
    "NeurIPS 2021"
)


class CAGradParams(GradParams):
    c: float = Field(default=0.4, ge=0, description="radius factor c (paper: 0.4 to 0.5)")
    iterations: int = Field(
        default=5000,
        ge=1,
        description="iteration cap of the iterative dual solver used above "
        f"{EXACT_MAX_TASKS} tasks (up to that the dual is solved exactly)",
    )
    rescale: bool = Field(default=True, description="divide the update by 1 + c^2 (paper)")


@WEIGHTINGS.register("cagrad", params=CAGradParams, paper=PAPER)
class CAGrad(Weighting):
    """Conflict-Averse Gradient descent (Liu et al., NeurIPS 2021, Algorithm 1).

    With ``g0`` the average gradient and ``phi = c^2 ||g0||^2``, solve the dual
    ``min_{w in simplex} g_w . g0 + sqrt(phi) ||g_w||`` (``g_w = sum w_t g_t``) on the ``T x T``
    Gram matrix, and update the shared parameters along
    ``d = g0 + sqrt(phi) / ||g_w|| g_w`` (divided by ``1 + c^2`` with ``rescale``). The update is
    multiplied by T so that ``c = 0`` equals the sum of the task gradients (the static step);
    task-specific parameters get their plain task gradients.

    The dual is solved exactly (:func:`~mtlrec.weighting._solvers.cagrad_dual`: every face of
    the simplex, scale-free), so task gradients of very different sizes (norms 1000x apart) get
    the exact conflict-averse direction; above 8 tasks an iterative solver runs to a tolerance.
    Tasks absent from a step (no valid row) are left out: ``g0``, the dual and T are over the
    present tasks.
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
        return torch.from_numpy(cagrad_dual(g, self.c, self.iterations)).to(gram.dtype)

    def aggregate(self, jacobian: Tensor, weights: Tensor) -> Tensor:
        idx = self.present_index()
        j = jacobian.detach()[idx]  # [T_p, P]
        t = j.shape[0]
        g0 = j.mean(dim=0)
        if self.c == 0:
            return t * g0
        gram = gram64(j)
        w = self.dual_weights(gram)
        gw = (w.to(j.dtype)) @ j
        gw_norm = gw.norm().clamp_min(1e-20)
        sqrt_phi = self.c * g0.norm()
        d = g0 + (sqrt_phi / gw_norm) * gw
        if self.rescale:
            d = d / (1.0 + self.c**2)
        return t * d
