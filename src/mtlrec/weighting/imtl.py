"""IMTL-G: impartial gradient weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting._solvers import gram64
from mtlrec.weighting.base import GradParams, SharedUpdateWeighting

PAPER = (
    "Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang. Towards Impartial Multi-task Learning. "
    "ICLR 2021 (IMTL-G)"
)


@WEIGHTINGS.register("imtl", params=GradParams, paper=PAPER)
class IMTL(SharedUpdateWeighting):
    """IMTL-G (Liu et al., ICLR 2021): weights whose combined gradient has equal projections on
    every task's unit gradient.

    With ``u_t = g_t / ||g_t||``, ``D = [g_1 - g_t]_{t>=2}`` and ``U = [u_1 - u_t]_{t>=2}``, the
    closed form is ``alpha_{2:T} = g_1 U^T (D U^T)^{-1}``, ``alpha_1 = 1 - sum alpha_{2:T}``
    (computed from the Gram matrix, ``T x T`` only). The shared update is ``T alpha @ J`` (the
    paper's alpha sums to 1; times T gives the scale of equal weights); task-specific parameters
    get their own task's gradient, as in the paper (alpha may be negative).
    """

    needs_grads = True
    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: GradParams) -> None:
        super().__init__(task_names)
        self.set_grad_options(params)
        self.init_shared_update()

    def shared_weights(self, losses: Tensor, jacobian: Tensor) -> Tensor:
        """The weights ``alpha [T]`` of the task gradients in the shared update."""
        t = jacobian.shape[0]  # the tasks present in the step
        if t == 1:
            return torch.ones_like(losses)
        j = jacobian.detach()
        gram = gram64(j)  # g_i . g_j
        if not bool(torch.isfinite(gram).all()):  # lstsq raises on them: equal weights
            return torch.ones(t, dtype=torch.float64, device=gram.device)
        norms = gram.diagonal().clamp_min(1e-30).sqrt()
        gu = gram / norms[None, :]  # g_i . u_j
        # (D U^T)_{ab} = (g_1 - g_a).(u_1 - u_b) for a, b in 2..T
        a = torch.arange(1, t)
        du = gu[0, 0] - gu[0, a][None, :] - gu[a, 0][:, None] + gu[a][:, a]
        g1u = gu[0, 0] - gu[0, a]  # g_1 . (u_1 - u_b)
        sol = torch.linalg.lstsq(du.T, g1u[:, None]).solution[:, 0]  # alpha D U^T = g1 U^T
        alpha = torch.cat([(1 - sol.sum()).reshape(1), sol])
        if not bool(torch.isfinite(alpha).all()):
            alpha = torch.full((t,), 1.0 / t, dtype=torch.float64, device=gram.device)
        return t * alpha
