"""MGDA-UB: min-norm task weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting._solvers import gram64, min_norm_weights
from mtlrec.weighting.base import GradParams, SharedUpdateWeighting

PAPER = "Sener, Koltun. Multi-Task Learning as Multi-Objective Optimization. NeurIPS 2018"


class MGDAParams(GradParams):
    normalization: Literal["none", "l2", "loss", "loss+"] = Field(
        default="none",
        description="gradient normalisation s_t before the min-norm solve (the authors' "
        "options: none, l2 = divide by ||g_t||, loss = by L_t, loss+ = by L_t ||g_t||)",
    )
    apply_to: Literal["raw", "normalized"] = Field(
        default="raw",
        description="what the weights solved on the normalised gradients multiply: 'raw' "
        "(the authors' code: the raw losses, update sum a_t g_t) or 'normalized' (LibMTL: the "
        "normalised gradients, update sum a_t g_t / s_t, here rescaled so that the raw "
        "weights a_t / s_t sum to 1); the same when normalization is none",
    )
    scale: Literal["one", "num_tasks"] = Field(
        default="one",
        description="weights sum to 1 (the paper) or to T (the scale of equal weights)",
    )


@WEIGHTINGS.register("mgda", params=MGDAParams, paper=PAPER)
class MGDA(SharedUpdateWeighting):
    """Multiple-gradient descent with the min-norm solver (Sener & Koltun, NeurIPS 2018).

    Weights ``a = argmin_{a in simplex} ||sum_t a_t g_t / s_t||^2`` from the Gram matrix of the
    (optionally normalised, ``normalization``) task gradients: the closed form
    ``a_1 = clip((u2-u1).u2 / ||u1-u2||^2, 0, 1)`` for two tasks, Frank-Wolfe with exact line
    search otherwise. With ``grad_target: representation`` the gradients are taken of the
    shared representation (the towers' input) instead of the shared parameters: the paper's
    MGDA-UB upper bound, whose cost is a backward through the towers only (it needs a model
    whose towers read one shared tensor, e.g. shared_bottom).

    Normalisation has two readings, both offered (``apply_to``):

    * ``raw`` (default; the authors' code, ``train_multi_task.py``): the min-norm weights of
      the normalised gradients scale the raw losses, so the shared update is ``sum_t a_t g_t``;
    * ``normalized`` (LibMTL's ``MGDA``): the update is the min-norm element of the normalised
      gradients, ``sum_t a_t g_t / s_t``, i.e. raw-gradient weights ``a_t / s_t``; here they
      are rescaled to sum to 1 (LibMTL leaves them unscaled; the direction is the same).

    With ``normalization: none`` (the default, and the paper's method) both are the plain
    min-norm weights. As in the paper's Algorithm 2, only the shared update is ``alpha @ J``;
    task-specific parameters get their own task's gradient. Tasks absent from a step are left
    out (``scale: num_tasks`` then means the number of present tasks).
    """

    needs_grads = True
    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: MGDAParams) -> None:
        super().__init__(task_names)
        self.set_grad_options(params)
        self.init_shared_update()
        self.normalization = params.normalization
        self.apply_to = params.apply_to
        self.scale = params.scale

    def normalizers(self, losses: Tensor, gram: Tensor) -> Tensor:
        """The gradient normalisers ``s [T]`` (float64) of the option ``normalization``."""
        norms = gram.diagonal().clamp_min(1e-24).sqrt()
        if self.normalization == "l2":
            return norms
        if self.normalization == "loss":
            return losses.detach().to(torch.float64).clamp_min(1e-12)
        if self.normalization == "loss+":
            return losses.detach().to(torch.float64).clamp_min(1e-12) * norms
        return torch.ones_like(norms)

    def shared_weights(self, losses: Tensor, jacobian: Tensor) -> Tensor:
        """The weights ``alpha [T]`` of the task gradients in the shared update."""
        j = jacobian.detach()
        raw = gram64(j)  # [T, T]
        s = self.normalizers(losses, raw)
        gram = raw / (s[:, None] * s[None, :])  # Gram matrix of g_t / s_t
        a = min_norm_weights(gram)
        if self.apply_to == "normalized":
            a = a / s  # weights of the raw gradients
            a = a / a.sum()
        if self.scale == "num_tasks":
            a = a * j.shape[0]
        return a
