"""Alternating training: one task per step (or per group of steps)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting.base import Weighting

PAPER = (
    "alternating training of task heads over a shared model, e.g. Caruana, Multitask Learning, "
    "Machine Learning 28, 1997; Ma et al., Entire Space Multi-Task Model, SIGIR 2018 (baselines)"
)


class AlternatingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(default=1, ge=1, description="consecutive batches per task")
    order: Literal["cyclic", "random"] = Field(
        default="cyclic", description="visit tasks in turn, or draw one at random (seeded)"
    )
    seed: int = 0


@WEIGHTINGS.register("alternating", params=AlternatingParams, paper=PAPER)
class Alternating(Weighting):
    """Trains one task at a time: weight 1 for the active task, 0 for the others.

    The active task changes every ``every`` batches (cyclic or seeded random order; the step
    counter is a buffer, so resume continues the schedule). Each task has its own optimiser
    (and learning rate: ``training.optimizer.task_lr``) over the shared parameters and its own
    task parameters; only the active task's optimiser steps, so the tower (and optimiser
    moments) of task A stay untouched while task B trains.
    """

    per_task_optimizers = True
    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: AlternatingParams) -> None:
        super().__init__(task_names)
        self.every = params.every
        self.order = params.order
        self.seed = params.seed
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def active(self) -> int:
        """Index of the task trained at this step: the schedule runs over the tasks present in
        the step (all of them, unless a masked task has no row in the batch), so a step never
        trains an absent task, and with a task absent the schedule is the one the remaining
        tasks would follow without it."""
        idx = self.present_index().tolist() or list(range(self.num_tasks))
        block = int(self.step) // self.every
        if self.order == "cyclic":
            return idx[block % len(idx)]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
        return idx[int(torch.randint(len(idx), (1,), generator=gen))]

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        w = torch.zeros_like(losses)
        w[self.active()] = 1.0
        return w

    @torch.no_grad()
    def on_step_end(self, losses: Tensor) -> None:
        self.step += 1
