"""Drift at evaluation: OOV rates per feature, positive rate and mean prediction per task, the
reference a run saves, and the report against it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtlrec.analysis.drift import drift_reference, drift_report, oov_rates, run_drift, task_rates
from mtlrec.config import ExperimentConfig
from mtlrec.testing import tiny_dataset, tiny_schema, tiny_table
from mtlrec.train.run import load_run, train_run

pytestmark = pytest.mark.filterwarnings("ignore::mtlrec.errors.DataWarning")


def test_oov_rates_count_unknown_rare_and_missing_values() -> None:
    pre, _ = tiny_dataset(100)
    t = tiny_table(10, seed=5)
    users = t.column("user").to_pylist()
    users[:3] = ["new1", "new2", None]  # two unknown, one missing: all three at the OOV row
    t = t.set_column(0, "user", pa.array(users))
    t = t.set_column(
        t.column_names.index("hist"), "hist", pa.array(["i1|zz|i2", "zz", "", *["i1"] * 7])
    )
    ds = pre.encode(t)
    rates = oov_rates(ds)
    assert rates["user"] == pytest.approx(0.3)
    assert rates["hist"] == pytest.approx(2 / 11)  # 2 unknown of 11 elements
    assert rates["item"] == 0.0


def test_task_rates_use_each_tasks_rows() -> None:
    _, ds = tiny_dataset(100)
    preds = {"click": np.full(len(ds), 0.25), "watch": np.full(len(ds), 2.0)}
    rates = task_rates(ds, preds)
    clicks = ds.labels[:, 0].numpy()
    assert rates["click"]["positive_rate"] == pytest.approx(clicks.mean())
    assert rates["click"]["mean_prediction"] == pytest.approx(0.25)
    assert rates["watch"]["rows"] == clicks.sum()  # watch: clicked rows only
    assert rates["watch"]["mean_prediction"] == pytest.approx(2.0)


def test_report_shifts_and_calibration() -> None:
    ref = {
        "split": "valid",
        "oov_rate": {"item": 0.01},
        "tasks": {"click": {"rows": 10, "positive_rate": 0.2, "mean_prediction": 0.2}},
    }
    now = {
        "oov_rate": {"item": 0.31},
        "tasks": {"click": {"rows": 5, "positive_rate": 0.1, "mean_prediction": 0.2}},
    }
    rep = drift_report(ref, now)
    assert rep["features"]["item"]["change"] == pytest.approx(0.30)
    click = rep["tasks"]["click"]
    assert click["positive_rate"]["change"] == pytest.approx(-0.1)
    assert click["calibration"]["reference"] == pytest.approx(1.0)
    assert click["calibration"]["current"] == pytest.approx(2.0)
    missing = drift_report(None, now)
    assert math.isnan(missing["features"]["item"]["reference"])


def test_a_run_saves_its_reference_and_new_data_is_compared(tmp_path: Path) -> None:
    pq.write_table(tiny_table(300, seed=1), tmp_path / "a.parquet")
    cfg = ExperimentConfig.from_dict(
        {
            "data": {"train": "a.parquet", "split": {"fractions": [0.8, 0.2, 0.0]}},
            "schema": json.loads(tiny_schema().to_json()),
            "model": {"name": "mmoe", "params": {"num_experts": 2, "expert_hidden": [8]}},
            "training": {"epochs": 1, "batch_size": 64, "progress": False},
            "output_dir": str(tmp_path / "run"),
        },
        base_dir=str(tmp_path),
    )
    res = train_run(cfg)
    ref = json.loads((res.path / "summary.json").read_text())["drift_reference"]
    assert ref["split"] == "valid" and set(ref["oov_rate"]) == {"user", "item", "hist"}
    assert 0 < ref["tasks"]["click"]["positive_rate"] < 1
    assert 0 < ref["tasks"]["click"]["mean_prediction"] < 1
    loaded = load_run(res.path)
    t = tiny_table(200, seed=9)
    t = t.set_column(
        t.column_names.index("item"), "item", pa.array([f"x{i}" for i in range(200)])
    )  # all new items
    ds = loaded.preprocessor.encode(t)
    rep = run_drift(res.path, ds, loaded.trainer().predict(ds))
    assert rep["features"]["item"]["current"] == 1.0
    assert rep["features"]["item"]["change"] == pytest.approx(1.0 - ref["oov_rate"]["item"])
    assert (
        rep["tasks"]["click"]["positive_rate"]["reference"]
        == ref["tasks"]["click"]["positive_rate"]
    )
    assert drift_reference(ds, None)["tasks"]["click"].get("mean_prediction") is None
