"""Dynamic Weight Average."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

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

    A task's averages count only the steps in which it had rows (``count [T]``): a batch where a
    masked task has no valid row adds nothing to its window, and a window in which it never had
    a row leaves its last two averages as they were. In such a step the weights are over the
    present tasks (``T_p softmax`` of their ratios), and weight 1 is used while a present task
    has fewer than two recorded windows.
    """

    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: DWAParams) -> None:
        super().__init__(task_names)
        self.temperature = params.temperature
        self.unit = params.unit
        self.window = params.window
        t = self.num_tasks
        self.register_buffer("loss_sum", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(t, dtype=torch.int64))  # steps with rows
        self.register_buffer("units", torch.zeros((), dtype=torch.int64))  # steps or epochs
        self.register_buffer("history", torch.zeros(2, t, dtype=torch.float64))  # k-2, k-1
        self.register_buffer("windows", torch.zeros((), dtype=torch.int64))
        self.register_buffer("recorded", torch.zeros(t, dtype=torch.int64))  # windows per task
        self.accept_legacy_state(scalars=("count",), added=("recorded",))
        self.register_load_state_dict_post_hook(_recorded_from_windows)

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        idx = self.present_index()
        w = torch.zeros_like(losses)
        if bool((self.recorded[idx] < 2).any()):
            w[idx] = 1.0
            return w
        r = self.history[1, idx] / self.history[0, idx].clamp_min(1e-12)
        w[idx] = (idx.numel() * torch.softmax(r / self.temperature, dim=0)).to(losses.dtype)
        return w

    def _close_window(self) -> None:
        seen = self.count > 0
        if not bool(seen.any()):
            return
        avg = self.loss_sum / self.count.clamp_min(1)
        self.history[0] = torch.where(seen, self.history[1], self.history[0])
        self.history[1] = torch.where(seen, avg, self.history[1])
        self.recorded += seen.to(self.recorded.dtype)
        self.windows += 1
        self.loss_sum.zero_()
        self.count.zero_()

    @torch.no_grad()
    def on_step_end(self, losses: Tensor) -> None:
        on = self.present
        self.loss_sum += torch.where(on, losses.detach().to(torch.float64), 0.0)
        self.count += on.to(self.count.dtype)
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


def _recorded_from_windows(module: nn.Module, keys: object) -> None:
    """After loading a checkpoint written before per-task window counts existed (``recorded``
    all 0 while windows were closed), every task has every closed window (at most the two the
    weights read)."""
    dwa: DWA = module  # type: ignore[assignment]
    if int(dwa.windows) > 0 and not bool(dwa.recorded.any()):
        dwa.recorded.fill_(min(int(dwa.windows), 2))
