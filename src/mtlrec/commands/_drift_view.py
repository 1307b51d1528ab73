"""The drift report of ``mtlrec evaluate --data`` as tables (rich); no command here."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table


def _num(v: Any, *, pct: bool = False, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if pct:
        return f"{v:+.2%}" if sign else f"{v:.2%}"
    return f"{v:+.4f}" if sign else f"{v:.4f}"


def _shift(e: dict[str, Any], *, pct: bool = False) -> str:
    """``reference -> current (change)``."""
    return (
        f"{_num(e['reference'], pct=pct)} → {_num(e['current'], pct=pct)} "
        f"({_num(e['change'], pct=pct, sign=True)})"
    )


def drift_tables(report: dict[str, Any], what: str) -> list[Table]:
    """Two tables, each value as ``the run's reference -> the file's (change)``: the OOV rate
    per feature, and per task the positive rate, mean prediction and calibration (mean
    prediction / positive rate)."""
    ref = report.get("reference_split") or "none saved"
    feats = Table(title=f"drift: OOV rate per feature (the run's {ref} split → {what})")
    feats.add_column("feature")
    feats.add_column("OOV rate", justify="right")
    for name, e in report["features"].items():
        feats.add_row(name, _shift(e, pct=True))
    tasks = Table(title=f"drift: labels and predictions per task (the run's {ref} split → {what})")
    tasks.add_column("task")
    for c in ("positive rate", "mean prediction", "calibration"):
        tasks.add_column(c, justify="right")
    for name, e in report["tasks"].items():
        tasks.add_row(
            name, _shift(e["positive_rate"]), _shift(e["mean_prediction"]), _shift(e["calibration"])
        )
    return [feats, tasks]
