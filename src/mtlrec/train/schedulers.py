"""Learning-rate schedules: linear warm-up, then constant, cosine or step decay, per optimiser step.

The schedule is a multiplier of every parameter group's own learning rate (so per-task learning
rates keep their ratios), applied by ``torch.optim.lr_scheduler.LambdaLR``; the multiplier is a
small object (:class:`Schedule`) whose fields are saved in the scheduler's state dict, so a
resumed run continues the schedule exactly.

With ``warmup_steps = W`` the multiplier rises linearly from ``warmup_start`` at step 0 to 1 at
step W; after it (``s`` steps past the warm-up, ``D = total_steps - W`` decay steps):

* ``constant``: 1;
* ``cosine``: ``min_factor + (1 - min_factor) * (1 + cos(pi * min(s, D) / D)) / 2``
  (Loshchilov & Hutter, "SGDR", ICLR 2017, without restarts);
* ``step``: ``gamma ** floor(s / step_size)``.

Example:
    >>> s = Schedule("cosine", warmup_steps=2, total_steps=6, warmup_start=0.0)
    >>> [round(s(i), 3) for i in range(7)]
    [0.0, 0.5, 1.0, 0.854, 0.5, 0.146, 0.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from mtlrec.config import SchedulerConfig


@dataclass
class Schedule:
    """The learning-rate multiplier at optimiser step ``step`` (see the module docstring)."""

    name: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    warmup_start: float = 0.01
    min_factor: float = 0.0
    step_size: int = 1
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        w = self.warmup_steps
        if step < w:
            return self.warmup_start + (1.0 - self.warmup_start) * step / w
        s = step - w
        if self.name == "cosine":
            d = max(self.total_steps - w, 1)
            return self.min_factor + (1.0 - self.min_factor) * 0.5 * (
                1.0 + math.cos(math.pi * min(s, d) / d)
            )
        if self.name == "step":
            return self.gamma ** (s // self.step_size)
        return 1.0


def build_scheduler(
    optimizer: Optimizer, cfg: SchedulerConfig, total_steps: int
) -> LRScheduler | None:
    """A ``LambdaLR`` over ``optimizer`` for the configured schedule (None for a constant
    learning rate without warm-up: nothing to schedule).

    Args:
        optimizer: the optimiser (every group's ``lr`` is its base rate).
        cfg: ``training.scheduler``.
        total_steps: optimiser steps planned for the whole run (epochs x batches per epoch),
            the horizon of the cosine decay.
    """
    if cfg.name == "constant" and cfg.warmup_steps == 0:
        return None
    schedule = Schedule(
        cfg.name,
        cfg.warmup_steps,
        total_steps,
        cfg.warmup_start,
        cfg.min_factor,
        cfg.step_size,
        cfg.gamma,
    )
    return LambdaLR(optimizer, [schedule] * len(optimizer.param_groups))
