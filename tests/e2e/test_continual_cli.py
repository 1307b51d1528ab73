"""The daily loop from the command line: ``synth ctr --days``, ``train --init-from`` (one
process, ``--nproc 2``, streaming), ``list-params``, ``evaluate --data`` with the drift report,
``export`` of a warm-started run, and a refused warm start naming what differs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from mtlrec.data.synthetic.daily import daily_ctr_schema


def _config(train: str, out: str) -> dict[str, Any]:
    return {
        "data": {"train": train, "split": {"fractions": [0.7, 0.15, 0.15], "seed": 0}},
        "schema": json.loads(daily_ctr_schema(embedding_dim=4).to_json()),
        "model": {
            "name": "mmoe",
            "params": {"num_experts": 2, "expert_hidden": [16], "tower_hidden": [8]},
        },
        "training": {"epochs": 2, "batch_size": 128, "optimizer": {"lr": 0.01}},
        "output_dir": out,
    }


def _ok(res: Any) -> None:
    assert res.returncode == 0, str(res)
    assert "Traceback" not in res.stderr, str(res)


@pytest.fixture(scope="module")
def loop(cli: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("continual")
    res = {
        "synth": cli.run(
            "synth",
            "ctr",
            "--output",
            "log.parquet",
            "--days",
            "3",
            "--rows",
            "1500",
            "--seed",
            "3",
            cwd=d,
        )
    }
    _ok(res["synth"])
    log = pq.read_table(d / "log.parquet")
    for day in (1, 2, 3):
        part = log.filter(pc.equal(log.column("day"), day))
        pq.write_table(part, d / f"day{day}.parquet", row_group_size=300)
    for day in (1, 2):
        (d / f"day{day}.yaml").write_text(yaml.safe_dump(_config(f"day{day}.parquet", "runs/x")))
    res["day1"] = cli.run("train", "day1.yaml", "--no-progress", "--output", "runs/d1", cwd=d)
    _ok(res["day1"])
    warm = ["train", "day2.yaml", "--no-progress", "--init-from", "runs/d1"]
    stream = ["--set", "data.streaming=true", "--set", "data.shuffle_buffer=400"]
    res |= cli.run_all(
        {
            "warm": [*warm, "--output", "runs/w", "--set", "training.init_optimizer=carry"],
            "warm_two": [
                *warm,
                "--output",
                "runs/w2",
                "--nproc",
                "2",
                "--set",
                "training.init_optimizer=carry",
            ],
            "warm_stream": [*warm, "--output", "runs/ws", *stream],
            "warm_stream_two": [*warm, "--output", "runs/ws2", "--nproc", "2", *stream],
            "bad": [*warm, "--output", "runs/bad", "--set", "model.params.num_experts=3"],
            "params": ["list-params", "runs/d1", "--freeze", "experts.*"],
            "drift": [
                "evaluate",
                "runs/d1",
                "--data",
                "day3.parquet",
                "--drift-json",
                "drift.json",
            ],
        },
        cwd=d,
    )
    res |= cli.run_all(
        {
            "export": ["export", "runs/w", "--format", "torchscript"],
            "frozen": [*warm, "--output", "runs/f", "--set", "training.freeze=[experts.*]"],
        },
        cwd=d,
    )
    return d, res


def _summary(d: Path, run: str) -> dict[str, Any]:
    return json.loads((d / "runs" / run / "summary.json").read_text())


@pytest.mark.slow
def test_warm_start_in_one_and_two_processes(loop: tuple[Path, dict[str, Any]]) -> None:
    d, res = loop
    for name in ("warm", "warm_two", "warm_stream", "warm_stream_two"):
        _ok(res[name])
        run = {"warm": "w", "warm_two": "w2", "warm_stream": "ws", "warm_stream_two": "ws2"}[name]
        lineage = json.loads((d / "runs" / run / "lineage.json").read_text())
        assert lineage["parent"]["run"] == str((d / "runs" / "d1").resolve())
        grown = lineage["init"]["warm_start"]["vocabularies"]["item"]
        assert grown["added"] > 0 and grown["rows_after"] > grown["rows_before"]
        assert (d / "runs" / run / "vocab_counts.parquet").is_file()
    assert "warm start: vocabularies" in res["warm"].stderr
    # two processes end where one does (the carried optimiser state and streaming included)
    for a, b in (("w", "w2"), ("ws", "ws2")):
        sa, sb = _summary(d, a), _summary(d, b)
        assert sa["best_epoch"] == sb["best_epoch"]
        for task, metrics in sa["test"].items():
            for k, v in metrics.items():
                assert sb["test"][task][k] == pytest.approx(v, abs=1e-5), (a, task, k)


@pytest.mark.slow
def test_a_warm_start_of_another_architecture_is_refused(loop: tuple[Path, Any]) -> None:
    _, res = loop
    assert res["bad"].returncode == 2, str(res["bad"])
    assert "num_experts: 2 there, 3 here" in res["bad"].stderr
    assert "Traceback" not in res["bad"].stderr


@pytest.mark.slow
def test_list_params_and_freeze(loop: tuple[Path, Any]) -> None:
    _, res = loop
    _ok(res["params"])
    assert "embedding.tables.d4.weight" in res["params"].stdout
    assert "frozen: 2 of" in res["params"].stdout
    _ok(res["frozen"])
    assert "frozen: 2 of" in res["frozen"].stderr


@pytest.mark.slow
def test_evaluate_reports_drift(loop: tuple[Path, Any]) -> None:
    d, res = loop
    _ok(res["drift"])
    assert "OOV rate per feature" in res["drift"].stdout
    assert "calibration" in res["drift"].stdout
    report = json.loads((d / "drift.json").read_text())
    item = report["features"]["item"]
    assert item["current"] > item["reference"] + 0.05  # day 3 brings items day 1 never saw
    assert set(report["tasks"]) == {"click", "conversion"}


@pytest.mark.slow
def test_export_takes_a_warm_started_run(loop: tuple[Path, Any]) -> None:
    d, res = loop
    _ok(res["export"])
    assert "parity" in res["export"].stdout
    assert (d / "runs" / "w" / "export-torchscript").is_dir()
