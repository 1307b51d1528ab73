"""FAMO: fast adaptive multitask optimisation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting.base import Weighting

PAPER = "Liu, Liu, Zhou, Stone, Liu. FAMO: Fast Adaptive Multitask Optimization. NeurIPS 2023"


class FAMOParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(default=0.025, gt=0, description="step size beta of the task logits")
    weight_decay: float = Field(default=1e-3, ge=0, description="decay gamma of the logits")
    eps: float = Field(default=1e-8, gt=0, description="added to losses inside the logs")
    update: Literal["rescore", "next_batch"] = Field(
        default="rescore",
        description="how the logits learn: 'rescore' (the paper's form) re-scores the step's "
        "batch after the update, one extra forward pass without gradient per step; "
        "'next_batch' compares the step's losses with the previous step's (another batch), "
        "no extra pass",
    )


@WEIGHTINGS.register("famo", params=FAMOParams, paper=PAPER)
class FAMO(Weighting):
    """FAMO (Liu et al., NeurIPS 2023): balances the tasks' rates of log-loss decrease at O(1)
    cost (loss-based: no per-task gradients).

    With logits ``xi`` and ``z = softmax(xi)``, the update direction is
    ``d = c sum_t z_t grad L_t / L_t``, ``c = (sum_t z_t / L_t)^{-1}``: task weights
    ``w_t = c z_t / L_t`` (times T here, the scale of equal weights). After each step the
    logits move by Adam (``lr`` = beta, L2 decay ``gamma``) along
    ``grad_xi = J_softmax(xi)^T delta``, ``delta_t = log L_t(theta_k) - log L_t(theta_{k+1})``:
    how much each task's log loss fell with the step.

    ``update: rescore`` (default) is the paper's Algorithm 1 and the authors' code: both losses
    are of the same batch, ``L_t(theta_{k+1})`` from re-scoring it after the optimiser step (the
    train step calls :meth:`after_update`); cost: one forward pass without gradient per step, on
    top of the step's forward and backward (no per-task gradient, so still O(1) in the number of
    tasks). ``update: next_batch`` takes ``L_t(theta_{k+1})`` from the next step's batch instead
    (no extra pass, but ``delta`` then mixes the step's effect with the change of batch).

    Absent tasks (no valid row in the batch): the weights are over the present tasks (the
    softmax of their logits), only the present tasks' logits move, and the Adam moments of an
    absent task's logit stay as they were (lazy, as ``SparseAdam``). Logits, the previous losses
    and the Adam moments are buffers.
    """

    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: FAMOParams) -> None:
        super().__init__(task_names)
        self.lr = params.lr
        self.weight_decay = params.weight_decay
        self.eps = params.eps
        self.update = params.update
        self.needs_rescore = params.update == "rescore"
        t = self.num_tasks
        self.register_buffer("logits", torch.zeros(t))
        self.register_buffer("prev_loss", torch.zeros(t))
        self.register_buffer("has_prev", torch.zeros(t, dtype=torch.bool))
        self.register_buffer("m", torch.zeros(t))
        self.register_buffer("v", torch.zeros(t))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.int64))
        self.accept_legacy_state(scalars=("has_prev",))

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        idx = self.present_index()
        z = torch.softmax(self.logits[idx], dim=0)
        inv = z / (losses.detach()[idx].float() + self.eps)
        w = torch.zeros_like(losses)
        # w sums to 1 in the paper's update; times T_p keeps the scale of equal weights
        w[idx] = (idx.numel() * inv / inv.sum()).to(losses.dtype)
        return w

    @torch.no_grad()
    def update_logits(self, before: Tensor, after: Tensor, tasks: Tensor) -> None:
        """One Adam step of the logits of ``tasks`` (``[T]`` bool) from the losses of the same
        batch before and after a model update; other logits (and their moments) unchanged."""
        ok = tasks & torch.isfinite(before) & torch.isfinite(after)
        idx = ok.nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        b, a = before.float()[idx].clamp_min(0), after.float()[idx].clamp_min(0)
        delta = torch.log(b + self.eps) - torch.log(a + self.eps)  # [T_p]
        xi = self.logits[idx]
        z = torch.softmax(xi, dim=0)
        grad = z * (delta - (z * delta).sum()) + self.weight_decay * xi  # J_softmax^T delta
        b1, b2 = 0.9, 0.999
        self.adam_step += 1
        k = float(self.adam_step)
        self.m[idx] = b1 * self.m[idx] + (1 - b1) * grad
        self.v[idx] = b2 * self.v[idx] + (1 - b2) * grad * grad
        mhat = self.m[idx] / (1 - b1**k)
        vhat = self.v[idx] / (1 - b2**k)
        self.logits[idx] = xi - self.lr * mhat / (vhat.sqrt() + 1e-8)

    def after_update(self, losses: Tensor, rescore: Callable[[], Tensor]) -> None:
        if self.update == "rescore" and bool(self.present.any()):
            self.update_logits(losses.detach(), rescore().detach(), self.present)

    @torch.no_grad()
    def on_step_end(self, losses: Tensor) -> None:
        if self.update != "next_batch":
            return
        cur = losses.detach().float()
        self.update_logits(self.prev_loss, cur, self.present & self.has_prev)
        self.prev_loss.copy_(torch.where(self.present, cur.clamp_min(0), self.prev_loss))
        self.has_prev |= self.present
