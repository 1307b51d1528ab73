"""Drift between a run's training data and new data: why yesterday's model degrades.

At training time a run saves a **reference** in ``summary.json`` (``drift_reference``),
measured on its validation rows (drawn like its training rows, and held in memory in every
mode, streaming and data-parallel included):

* the **OOV rate** of every categorical feature: the share of its values (sequence elements)
  that take the OOV row: unknown values, values too rare for the vocabulary, missing values;
* per task: the **positive rate** (binary; the mean label for regression) over the task's
  valid rows, and the **mean prediction** over the same rows.

``mtlrec evaluate RUN --data NEWFILE`` measures the same on the new file and reports each beside
its reference: a rising OOV rate means new users or items the model has no rows for; a shift of
the positive rate is a change of the world; a mean prediction that no longer follows the
positive rate is calibration drift (``calibration`` = mean prediction / positive rate, 1 when
calibrated on average).

Example:
    >>> from mtlrec.testing import tiny_dataset
    >>> pre, ds = tiny_dataset(50)
    >>> rates = oov_rates(ds)
    >>> sorted(rates), rates["user"]
    (['hist', 'item', 'user'], 0.0)
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlrec.batch import OOV_ID, PAD_ID
from mtlrec.data.dataset import ColumnarDataset


def oov_rates(ds: ColumnarDataset) -> dict[str, float]:
    """Per categorical feature, the share of its values at the OOV id (sequences: of their
    non-padding elements; NaN for a sequence without elements)."""
    out: dict[str, float] = {}
    n = len(ds)
    for j, f in enumerate(ds.schema.sparse):
        hits = int((ds.sparse[:, j] == OOV_ID).sum()) if n else 0
        out[f.name] = hits / n if n else math.nan
    for name, ids in ds.sequences.items():
        total = int((ids != PAD_ID).sum())
        out[name] = int((ids == OOV_ID).sum()) / total if total else math.nan
    return out


def task_rates(
    ds: ColumnarDataset, predictions: Mapping[str, np.ndarray] | None
) -> dict[str, dict[str, float]]:
    """Per binary or regression task: valid rows, positive rate (mean label) and mean
    prediction over those rows (multiclass tasks are left out).

    Args:
        ds: labelled rows.
        predictions: task -> ``[N]`` predictions of every row (probabilities for binary
            tasks), or None to leave the mean prediction out.
    """
    if ds.labels is None or ds.masks is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    for j, t in enumerate(ds.schema.tasks):
        if t.kind == "multiclass":
            continue
        mask = ds.masks[:, j]
        rows = int(mask.sum())
        entry: dict[str, float] = {"rows": float(rows)}
        label = ds.labels[:, j][mask].to(torch.float64)
        entry["positive_rate"] = float(label.mean()) if rows else math.nan
        if predictions is not None and t.name in predictions:
            p = torch.as_tensor(np.asarray(predictions[t.name]))[mask].to(torch.float64)
            entry["mean_prediction"] = float(p.mean()) if rows else math.nan
        out[t.name] = entry
    return out


def drift_reference(
    ds: ColumnarDataset, predictions: Mapping[str, np.ndarray] | None
) -> dict[str, Any]:
    """What a run saves to compare new data with (``summary.json``'s ``drift_reference``)."""
    return {
        "split": "valid",
        "rows": len(ds),
        "oov_rate": oov_rates(ds),
        "tasks": task_rates(ds, predictions),
    }


def _calibration(entry: Mapping[str, float]) -> float:
    pos, pred = entry.get("positive_rate", math.nan), entry.get("mean_prediction", math.nan)
    return pred / pos if pos and math.isfinite(pos) and math.isfinite(pred) else math.nan


def drift_report(reference: Mapping[str, Any] | None, current: Mapping[str, Any]) -> dict:
    """The new data's measures beside the reference's.

    Args:
        reference: a run's ``drift_reference`` (None for a run saved without one).
        current: :func:`drift_reference` of the new data.

    Returns:
        ``{"features": {name: {"reference", "current", "change"}}, "tasks": {name:
        {"positive_rate": {...}, "mean_prediction": {...}, "calibration": {...}}}}``;
        reference values are NaN without a reference.
    """
    ref = reference or {}
    feats = {}
    for name, now in current["oov_rate"].items():
        was = ref.get("oov_rate", {}).get(name, math.nan)
        feats[name] = {"reference": was, "current": now, "change": now - was}
    tasks = {}
    for name, now in current["tasks"].items():
        was = ref.get("tasks", {}).get(name, {})
        entry = {}
        for key in ("positive_rate", "mean_prediction"):
            a, b = was.get(key, math.nan), now.get(key, math.nan)
            entry[key] = {"reference": a, "current": b, "change": b - a}
        a, b = _calibration(was), _calibration(now)
        entry["calibration"] = {"reference": a, "current": b, "change": b - a}
        entry["rows"] = {"reference": was.get("rows", math.nan), "current": now["rows"]}
        tasks[name] = entry
    return {"reference_split": ref.get("split"), "features": feats, "tasks": tasks}


def run_drift(
    run: str | Path, ds: ColumnarDataset, predictions: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """The drift report of new labelled rows ``ds`` (encoded with the run's encoders) against
    the reference saved in the run folder's ``summary.json`` (none for runs saved before it
    was kept: reference values are then NaN)."""
    summary = Path(run) / "summary.json"
    reference = None
    if summary.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            reference = json.loads(summary.read_text()).get("drift_reference")
    return drift_report(reference, drift_reference(ds, predictions))
