"""Dynamic Weight Average."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting.base import Weighting

PAPER = "Liu, Johns, Davison. End-to-End Multi-Task Learning with Attention. CVPR 2019"


class DWAParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=2.0, gt=0, description="T of the softmax (paper: 2)")
    unit: Literal["epoch", "steps"] = Field(
        default="epoch", description="loss averages per epoch (paper) or per `window` steps"
    )
    window: int = Field(default=1, ge=1, description="epochs or steps per averaging window")


@WEIGHTINGS.register("dwa", params=DWAParams, paper=PAPER)
class DWA(Weighting):
    """Dynamic Weight Average (Liu et al., CVPR 2019, eq. 4).

    ``w_t = T exp(r_t / temp) / sum_j exp(r_j / temp)``, ``r_t = Lbar_t(k-1) / Lbar_t(k-2)``,
    where ``Lbar_t(k)`` is the mean *unweighted* loss of task t over window k (an epoch, as in the
    paper, or ``window`` steps for single-pass streaming training). The first two windows use
    weight 1. Weights sum to T. The window sums and the last two averages are buffers.
    """

    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: DWAParams) -> None:
        super().__init__(task_names)
        self.temperature = params.temperature
        self.unit = params.unit
        self.window = params.window
        t = self.num_tasks
        self.register_buffer("loss_sum", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("units", torch.zeros((), dtype=torch.int64))  # steps or epochs
        self.register_buffer("history", torch.zeros(2, t, dtype=torch.float64))  # k-2, k-1
        self.register_buffer("windows", torch.zeros((), dtype=torch.int64))

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        if int(self.windows) < 2:
            return torch.ones_like(losses)
        r = self.history[1] / self.history[0].clamp_min(1e-12)
        w = self.num_tasks * torch.softmax(r / self.temperature, dim=0)
        return w.to(losses.dtype)

    def _close_window(self) -> None:
        if int(self.count) == 0:
            return
        avg = self.loss_sum / self.count
        self.history[0] = self.history[1]
        self.history[1] = avg
        self.windows += 1
        self.loss_sum.zero_()
        self.count.zero_()

    @torch.no_grad()
    def on_step_end(self, losses: Tensor) -> None:
        self.loss_sum += losses.detach().to(torch.float64)
        self.count += 1
        if self.unit == "steps":
            self.units += 1
            if int(self.units) % self.window == 0:
                self._close_window()

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> None:
        if self.unit == "epoch":
            self.units += 1
            if int(self.units) % self.window == 0:
                self._close_window()
