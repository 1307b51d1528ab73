"""Typed hooks of the trainer: progress bar, JSONL log, checkpoints, early stopping."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from mtlrec.metrics.selection import is_better
from mtlrec.train.state import TrainerView, TrainState


class Callback:
    """Base class: override the hooks you need (all no-ops here)."""

    def on_fit_start(self, trainer: TrainerView, state: TrainState) -> None: ...

    def on_epoch_start(self, trainer: TrainerView, state: TrainState, num_batches: int) -> None: ...

    def on_step_end(self, trainer: TrainerView, state: TrainState) -> None: ...

    def on_epoch_record(
        self, trainer: TrainerView, state: TrainState, record: dict[str, Any]
    ) -> None:
        """Add entries to the epoch's record before it is stored (history, log, checkpoint)."""

    def on_epoch_end(
        self, trainer: TrainerView, state: TrainState, record: dict[str, Any]
    ) -> None: ...

    def on_fit_end(self, trainer: TrainerView, state: TrainState) -> None: ...


class ProgressBar(Callback):
    """A rich progress bar per epoch on stderr (refreshed a few times a second)."""

    def __init__(self, description: str = "train") -> None:
        self.description = description
        self._progress: Any = None
        self._task: Any = None

    def on_epoch_start(self, trainer: TrainerView, state: TrainState, num_batches: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn(
                f"[bold]{self.description}[/] epoch {state.epoch + 1}/{trainer.config.epochs}"
            ),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[loss]}"),
            console=Console(file=sys.stderr),
            transient=True,
            refresh_per_second=4,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            "", total=num_batches, completed=state.batch_in_epoch, loss=""
        )

    def on_step_end(self, trainer: TrainerView, state: TrainState) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1)

    def on_epoch_end(self, trainer: TrainerView, state: TrainState, record: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        from rich.console import Console

        mon = record.get("monitor")
        val = "" if mon is None else f"  valid {mon['key']}={mon['value']:.5f}"
        loss = " ".join(f"{k}={v:.4f}" for k, v in record["train_loss"].items())
        Console(file=sys.stderr).print(
            f"[dim]{self.description} epoch {record['epoch']}: loss {loss}{val} "
            f"({record['samples_per_s']:.0f} samples/s)[/]"
        )

    def on_fit_end(self, trainer: TrainerView, state: TrainState) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class JsonlLogger(Callback):
    """Appends one JSON line per epoch to ``path`` (flushed and fsynced)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: TrainerView, state: TrainState) -> None:
        """Rewrite the log from the (resumed) state's history: an epoch logged after the last
        checkpoint was saved is dropped, because training repeats it."""
        from mtlrec.utils.atomic import write_text

        lines = "".join(json.dumps(_jsonable(r)) + "\n" for r in state.history)
        write_text(self.path, lines)

    def on_epoch_end(self, trainer: TrainerView, state: TrainState, record: dict[str, Any]) -> None:
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_jsonable(record), allow_nan=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


class Checkpointer(Callback):
    """Saves ``last`` every epoch (and every ``every_steps`` steps) and ``best`` on improvement.

    Files (in ``folder``): ``last.safetensors``, ``best.safetensors``; both atomic.
    """

    def __init__(self, folder: str | Path, every_steps: int | None = None) -> None:
        self.folder = Path(folder)
        self.every_steps = every_steps

    def on_step_end(self, trainer: TrainerView, state: TrainState) -> None:
        if self.every_steps and state.step % self.every_steps == 0:
            trainer.save(self.folder / "last.safetensors", state)

    def on_epoch_end(self, trainer: TrainerView, state: TrainState, record: dict[str, Any]) -> None:
        if state.is_best:
            trainer.save(self.folder / "best.safetensors", state)
        trainer.save(self.folder / "last.safetensors", state)


class EarlyStopping(Callback):
    """Stops when the monitored validation metric has not improved for ``patience`` epochs."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta

    def on_epoch_end(self, trainer: TrainerView, state: TrainState, record: dict[str, Any]) -> None:
        if state.epochs_since_best >= self.patience:
            state.should_stop = True
            state.stop_reason = (
                f"early stopping: {state.monitor_key} did not improve for {self.patience} epochs"
            )


def improved(metric: str, new: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Whether ``new`` beats ``best`` by more than ``min_delta`` in the metric's direction."""
    if new is None or (isinstance(new, float) and math.isnan(new)):
        return False
    if best is None:
        return True
    if not is_better(metric, new, best):
        return False
    return abs(new - best) > min_delta


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
