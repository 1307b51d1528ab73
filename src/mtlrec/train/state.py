"""What the trainer's loop carries between steps, and what callbacks see of the trainer.

:class:`TrainState` is saved in every checkpoint, so a resumed run continues exactly;
:class:`TrainerView` is the part of the trainer that callbacks use (they are typed against it,
so :mod:`mtlrec.train.callbacks` does not import the trainer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from mtlrec.config import TrainingConfig


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint, so a resumed run continues exactly."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    monitor_key: str = ""
    best_value: float | None = None
    best_epoch: int | None = None
    epochs_since_best: int = 0
    loss_sums: list[float] = field(default_factory=list)
    loss_batches: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    should_stop: bool = False
    stop_reason: str = ""
    is_best: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("is_best")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**d)


@dataclass
class FitResult:
    best_epoch: int | None
    best_value: float | None
    monitor: str
    epochs_run: int
    stop_reason: str
    history: list[dict[str, Any]]


class TrainerView(Protocol):
    """What a callback may use of the trainer that calls it."""

    config: TrainingConfig
    model: nn.Module

    def save(self, path: str | Path, state: TrainState) -> None:
        """Write a checkpoint of the current model, strategy and optimiser."""
        ...
