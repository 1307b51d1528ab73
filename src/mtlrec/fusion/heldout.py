"""Held-out task predictions of a trained run, with labels, sample spaces and requests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtlrec.errors import ConfigError


@dataclass
class HeldOut:
    """Predictions and targets of one split, keyed by task.

    Shapes: every array ``[N]``; ``groups`` None when the schema has no group column.
    """

    name: str
    probs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    groups: np.ndarray | None
    binary_tasks: list[str]

    def __len__(self) -> int:
        return len(next(iter(self.probs.values()))) if self.probs else 0


def run_predictions(run: Any, split: str) -> HeldOut:
    """Score a run's ``valid`` or ``test`` split with its best checkpoint.

    Args:
        run: a run folder or a :class:`mtlrec.train.run.LoadedRun`.
        split: ``valid`` (to fit a fusion) or ``test`` (to report it).
    """
    from mtlrec.data.loading import load_datasets
    from mtlrec.train.run import LoadedRun, load_run

    if split not in ("valid", "test"):
        raise ConfigError(f"split must be valid or test, got {split!r}")
    loaded = run if isinstance(run, LoadedRun) else load_run(Path(run))
    sets = load_datasets(loaded.config, loaded.preprocessor)
    ds = sets.get(split)
    if ds is None or ds.labels is None or ds.masks is None:
        raise ConfigError(f"the run's data has no labelled {split} split")
    preds = loaded.trainer().predict(ds)
    tasks = loaded.schema.primary_tasks  # auxiliary tasks are never fused
    probs = {
        t.name: np.asarray(preds[t.name], dtype=np.float64) for t in tasks if t.kind != "multiclass"
    }
    labels = ds.labels.numpy().astype(np.float64)  # [N, T]
    masks = ds.masks.numpy()  # [N, T]
    names = list(loaded.schema.task_names)
    return HeldOut(
        name=sets.names[split],
        probs=probs,
        labels={t: labels[:, j] for j, t in enumerate(names) if t in probs},
        masks={t: masks[:, j] for j, t in enumerate(names) if t in probs},
        groups=None if ds.groups is None else ds.groups.numpy(),
        binary_tasks=[t.name for t in tasks if t.kind == "binary"],
    )
