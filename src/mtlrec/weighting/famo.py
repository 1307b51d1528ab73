"""FAMO: fast adaptive multitask optimisation."""

from __future__ import annotations

from collections.abc import Sequence

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


@WEIGHTINGS.register("famo", params=FAMOParams, paper=PAPER)
class FAMO(Weighting):
    """FAMO (Liu et al., NeurIPS 2023): balances the tasks' rates of log-loss decrease at O(1)
    cost (loss-based: no per-task gradients).

    With logits ``xi`` and ``z = softmax(xi)``, the update direction is
    ``d = c sum_t z_t grad L_t / L_t``, ``c = (sum_t z_t / L_t)^{-1}``: task weights
    ``w_t = c z_t / L_t``. After each step the logits move by Adam (``lr`` = beta, L2 decay
    ``gamma``) along ``grad_xi = J_softmax(xi)^T delta``,
    ``delta_t = log L_t(prev) - log L_t(now)``.
    Here ``L_t(now)`` is the next step's loss (another batch): the paper's cheap online variant,
    without a second forward pass. Logits, the previous losses and the Adam moments are buffers.
    """

    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: FAMOParams) -> None:
        super().__init__(task_names)
        self.lr = params.lr
        self.weight_decay = params.weight_decay
        self.eps = params.eps
        t = self.num_tasks
        self.register_buffer("logits", torch.zeros(t))
        self.register_buffer("prev_loss", torch.zeros(t))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))
        self.register_buffer("m", torch.zeros(t))
        self.register_buffer("v", torch.zeros(t))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.int64))

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        z = torch.softmax(self.logits, dim=0)
        inv = z / (losses.detach().float() + self.eps)
        w = inv / inv.sum()
        # w sums to 1 in the paper's update; times T keeps the scale of equal weights
        return (self.num_tasks * w).to(losses.dtype)

    @torch.no_grad()
    def on_step_end(self, losses: Tensor) -> None:
        cur = losses.detach().float().clamp_min(0)
        if bool(self.has_prev):
            delta = torch.log(self.prev_loss + self.eps) - torch.log(cur + self.eps)  # [T]
            z = torch.softmax(self.logits, dim=0)
            grad = z * (delta - (z * delta).sum())  # J_softmax^T delta
            grad = grad + self.weight_decay * self.logits
            b1, b2 = 0.9, 0.999
            self.adam_step += 1
            k = float(self.adam_step)
            self.m.mul_(b1).add_(grad, alpha=1 - b1)
            self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            mhat = self.m / (1 - b1**k)
            vhat = self.v / (1 - b2**k)
            self.logits.sub_(self.lr * mhat / (vhat.sqrt() + 1e-8))
        self.prev_loss.copy_(cur)
        self.has_prev.fill_(True)
