"""The ``mtlrec`` command end to end: train, evaluate, predict, list, synth, demo; bad input;
a training run killed with SIGKILL and resumed.

Every call runs the installed console script in a subprocess (see ``conftest.py``), on tiny data.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from mtlrec.testing import tiny_table

FORMATS = ("csv", "parquet")
TASK_NAMES = ("click", "watch")
MODEL_NAMES = ("mmoe", "omoe", "shared_bottom", "single_task")


# -- helpers -----------------------------------------------------------------------------------
def read_any(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        return pq.read_table(path)
    return pacsv.read_csv(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_ok(res: Any) -> None:
    assert res.returncode == 0, str(res)
    assert "Traceback" not in res.stderr, str(res)


def assert_one_error_line(res: Any, *needles: str) -> str:
    """Exit status 2 and exactly one ``error: ...`` line on stderr that contains ``needles``."""
    assert res.returncode == 2, str(res)
    assert "Traceback" not in res.stderr, str(res)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, str(res)
    line = lines[0]
    assert line.startswith("error:"), str(res)
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def wait_for(
    cond: Callable[[], bool],
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    interval: float = 0.01,
) -> bool:
    """Poll ``cond`` until it holds, ``timeout`` passes or ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return cond()
        time.sleep(interval)
    return False


def write_csv_rows(path: Path, table: pa.Table, edits: dict[tuple[int, str], str]) -> Path:
    """Write ``table`` as a plain CSV, with ``edits[(0-based row, column)] = raw text``."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return v if isinstance(v, str) else repr(v)

    names = table.column_names
    cols = [table.column(c).to_pylist() for c in names]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for i in range(table.num_rows):
            w.writerow(
                [edits.get((i, n), cell(col[i])) for n, col in zip(names, cols, strict=True)]
            )
    return path


# -- 1. end to end ----------------------------------------------------------------------------
@dataclass
class EndToEnd:
    dir: Path
    results: dict[str, Any]

    def run(self, name: str) -> Path:
        return self.dir / "runs" / name


@pytest.fixture(scope="module")
def e2e(cli: Any, tiny_dir: Path, experiment_yaml: Any) -> EndToEnd:
    """Train on the CSV and on the Parquet copy (and without the sequence feature), then
    evaluate and predict with the first two runs."""
    d = tiny_dir
    experiment_yaml(d / "csv.yaml", "tiny.csv", output_dir="runs/csv")
    experiment_yaml(d / "parquet.yaml", "tiny.parquet", output_dir="runs/parquet")
    experiment_yaml(d / "nohist.yaml", "tiny.csv", without=("hist",), output_dir="runs/nohist")
    train = cli.run_all(
        {
            "train:csv": ["train", "csv.yaml", "--no-progress"],
            "train:parquet": ["train", "parquet.yaml", "--no-progress"],
            # another schema (for a checkpoint that does not fit), one epoch by --set
            "train:nohist": ["train", "nohist.yaml", "--no-progress", "--set", "training.epochs=1"],
        },
        cwd=d,
    )
    calls: dict[str, list[str]] = {}
    for fmt, other in zip(FORMATS, reversed(FORMATS), strict=True):
        run = f"runs/{fmt}"
        calls[f"evaluate_json:{fmt}"] = ["evaluate", run, "--json"]
        calls[f"evaluate_data:{fmt}"] = ["evaluate", run, "--data", f"tiny.{other}"]
        # features in the run's format, scores written in the other one
        calls[f"predict:{fmt}"] = [
            *("predict", run, "--input", f"score.{fmt}"),
            *("--output", f"pred_{fmt}.{other}", "--keep", "user,item"),
        ]
    return EndToEnd(d, {**train, **cli.run_all(calls, cwd=d)})


@pytest.mark.parametrize("fmt", FORMATS)
def test_train_prints_test_metrics(e2e: EndToEnd, fmt: str) -> None:
    res = e2e.results[f"train:{fmt}"]
    assert_ok(res)
    assert f"run: runs/{fmt}" in res.stdout
    assert "test metrics (best epoch)" in res.stdout
    for word in ("auc", "logloss", "mse", *TASK_NAMES):
        assert word in res.stdout, str(res)
    assert re.search(r"click\s*│\s*0\.\d{5}", res.stdout), str(res)


@pytest.mark.parametrize("fmt", FORMATS)
def test_run_folder_contents(e2e: EndToEnd, fmt: str) -> None:
    assert_ok(e2e.results[f"train:{fmt}"])
    run = e2e.run(fmt)
    for f in ("config.yaml", "schema.json", "encoders.json", "model.json", "summary.json"):
        assert (run / f).is_file(), f
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    snap = snapshot(run / "checkpoints")
    assert set(snap["states"]) == {"last.safetensors", "best.safetensors"}
    assert assert_checkpoints_sound(snap)["epoch"] == 3
    lines = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert set(r["train_loss"]) == set(TASK_NAMES)
        assert set(r["valid"]) == set(TASK_NAMES)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "mmoe"
    assert summary["epochs_run"] == 3
    assert summary["best_epoch"] in (1, 2, 3)
    best = lines[summary["best_epoch"] - 1]["valid"]["click"]["auc"]
    assert summary["best_value"] == pytest.approx(best)
    assert 0.0 <= summary["test"]["click"]["auc"] <= 1.0
    assert summary["test"]["watch"]["mse"] >= 0.0
    model = json.loads((run / "model.json").read_text())
    assert model["name"] == "mmoe"
    assert model["params"]["num_experts"] == 3


def test_csv_and_parquet_fit_the_same_encoders(e2e: EndToEnd) -> None:
    for fmt in FORMATS:
        assert_ok(e2e.results[f"train:{fmt}"])
    enc = [json.loads((e2e.run(fmt) / "encoders.json").read_text()) for fmt in FORMATS]
    assert enc[0] == enc[1]


def test_same_data_and_config_train_the_same_model(e2e: EndToEnd) -> None:
    """The CSV and Parquet runs read the same rows, split and encoded alike (see above), with
    the same seed."""
    for fmt in FORMATS:
        assert_ok(e2e.results[f"train:{fmt}"])
    a, b = (json.loads((e2e.run(fmt) / "summary.json").read_text()) for fmt in FORMATS)
    assert a["test"] == b["test"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_evaluate_default_split_as_json(e2e: EndToEnd, fmt: str) -> None:
    res = e2e.results[f"evaluate_json:{fmt}"]
    assert_ok(res)
    metrics = json.loads(res.stdout)
    assert set(metrics) == set(TASK_NAMES)
    assert {"auc", "logloss", "count"} <= set(metrics["click"])
    assert {"mse", "mae", "count"} <= set(metrics["watch"])
    # the test split, scored with the best epoch's weights, as at the end of training
    summary = json.loads((e2e.run(fmt) / "summary.json").read_text())
    for task in TASK_NAMES:
        assert metrics[task] == pytest.approx(summary["test"][task], rel=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_evaluate_on_a_file(e2e: EndToEnd, fmt: str) -> None:
    res = e2e.results[f"evaluate_data:{fmt}"]
    assert_ok(res)
    other = "parquet" if fmt == "csv" else "csv"
    assert f"mmoe on tiny.{other}" in res.stdout
    # every row of the file counts for click; watch only on clicked rows
    clicks = sum(tiny_table(600).column("click").to_pylist())
    assert re.search(r"click\s*│.*│\s*600\s*│", res.stdout), str(res)
    assert re.search(rf"watch\s*│.*│\s*{clicks}\s*│", res.stdout), str(res)


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict(e2e: EndToEnd, fmt: str) -> None:
    res = e2e.results[f"predict:{fmt}"]
    assert_ok(res)
    other = "parquet" if fmt == "csv" else "csv"
    path = e2e.dir / f"pred_{fmt}.{other}"
    assert f"wrote 50 rows to {path.name}" in res.stdout
    pred = read_any(path)
    source = read_any(e2e.dir / f"score.{fmt}")
    assert pred.column_names == ["user", "item", "click", "watch"]
    assert pred.num_rows == source.num_rows == 50
    assert pred.column("user").to_pylist() == source.column("user").to_pylist()
    assert pred.column("item").to_pylist() == source.column("item").to_pylist()
    click = np.asarray(pred.column("click").to_pylist(), dtype=float)
    watch = np.asarray(pred.column("watch").to_pylist(), dtype=float)
    assert ((click >= 0) & (click <= 1)).all()
    assert np.isfinite(watch).all()
    assert len(np.unique(click)) > 1  # the model looks at the features


def test_set_override_takes_effect(e2e: EndToEnd) -> None:
    assert_ok(e2e.results["train:nohist"])
    run = e2e.run("nohist")
    assert len(read_jsonl(run / "metrics.jsonl")) == 1
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["epochs"] == 1


@pytest.fixture(scope="module")
def misc(cli: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """``list`` and the two ``synth`` commands."""
    d = tmp_path_factory.mktemp("synth")
    results = cli.run_all(
        {
            "list": ["list"],
            "mmoe": ["synth", "mmoe", "--output", "x.csv", "--correlation", "0.5", "--rows", "100"],
            "ctr": ["synth", "ctr", "--output", "ctr.parquet", "--rows", "100"],
        },
        cwd=d,
    )
    return d, results


def test_list_names_models_and_strategies(misc: tuple[Path, dict[str, Any]]) -> None:
    res = misc[1]["list"]
    assert_ok(res)
    for name in (*MODEL_NAMES, "static"):
        assert re.search(rf"│ {name}\s+│", res.stdout), f"{name}\n{res}"


def test_synth_mmoe(misc: tuple[Path, dict[str, Any]]) -> None:
    d, results = misc
    assert_ok(results["mmoe"])
    assert "wrote 100 rows to x.csv" in results["mmoe"].stdout
    table = pacsv.read_csv(d / "x.csv")
    assert table.num_rows == 100
    assert {"y1", "y2", "x0"} <= set(table.column_names)
    meta = json.loads((d / "x.csv.json").read_text())
    assert meta["correlation"] == 0.5
    assert meta["n"] == 100


def test_synth_ctr(misc: tuple[Path, dict[str, Any]]) -> None:
    d, results = misc
    assert_ok(results["ctr"])
    table = pq.read_table(d / "ctr.parquet")
    assert table.num_rows == 100
    assert {"click", "conversion"} <= set(table.column_names)


# -- 2. bad input ------------------------------------------------------------------------------
@dataclass
class Bad:
    dir: Path
    results: dict[str, Any]
    needles: dict[str, tuple[str, ...]]


@pytest.fixture(scope="module")
def bad(
    cli: Any, e2e: EndToEnd, experiment_yaml: Any, tmp_path_factory: pytest.TempPathFactory
) -> Bad:
    """Bad files, configs, run folders and checkpoints, each given to the command that reads
    it; every call runs here, concurrently, and the tests look at the results."""
    d = tmp_path_factory.mktemp("bad")
    for name in ("csv", "nohist"):
        assert_ok(e2e.results[f"train:{name}"])
    good_run = e2e.run("csv")
    table = tiny_table(300)
    clicked = [i for i, c in enumerate(table.column("click").to_pylist()) if c == 1]
    missing_row = clicked[2]  # 0-based; inside the sample space of watch (mask: click)

    files = {
        "nocol.csv": lambda p: pacsv.write_csv(table.drop(["price"]), p),
        "badnum.csv": lambda p: write_csv_rows(p, table, {(4, "price"): "abc"}),
        "badlabel.csv": lambda p: write_csv_rows(p, table, {(6, "click"): "2"}),
        "misslabel.csv": lambda p: write_csv_rows(p, table, {(missing_row, "watch"): ""}),
        "empty.csv": lambda p: p.write_bytes(b""),
        "header.csv": lambda p: p.write_text(",".join(table.column_names) + "\n"),
    }
    for name, write in files.items():
        write(d / name)
        experiment_yaml(d / f"{name[:-4]}.yaml", name, output_dir=f"runs/{name[:-4]}")
    # a bad value after the first 65,536-row block of the streaming reader
    big = tiny_table(70_000, seed=3)
    prices = [repr(v) for v in big.column("price").to_pylist()]
    prices[68_000] = "n/a?"
    big = big.set_column(big.column_names.index("price"), "price", pa.array(prices))
    pacsv.write_csv(big, d / "big.csv")
    experiment_yaml(d / "big.yaml", "big.csv", output_dir="runs/big")
    experiment_yaml(d / "good.yaml", str(e2e.dir / "tiny.csv"), output_dir="runs/good")

    # run folders: another schema's checkpoint, a truncated checkpoint, a broken model.json,
    # another config
    other = shutil.copytree(good_run, d / "other_schema")
    shutil.copy(e2e.run("nohist") / "checkpoints" / "best.safetensors", other / "checkpoints")
    trunc = shutil.copytree(good_run, d / "truncated")
    best = trunc / "checkpoints" / "best.safetensors"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    broken = shutil.copytree(good_run, d / "broken_model_json")
    (broken / "model.json").write_text(json.dumps({"format": 1}))
    another = shutil.copytree(good_run, d / "another_config")
    (d / "not_a_run").mkdir()
    (d / "not_a_run" / "notes.txt").write_text("hello")

    score = tiny_table(40, seed=5).drop(["click", "watch"])
    pacsv.write_csv(score.drop(["item"]), d / "noitem.csv")
    users = score.column("user").to_pylist()
    unseen = [f"new{i}" if i < 10 else u for i, u in enumerate(users)]
    pacsv.write_csv(score.set_column(0, "user", pa.array(unseen)), d / "unseen.csv")
    labelled = e2e.dir / "tiny.csv"

    train = ["train", "--no-progress"]
    calls: dict[str, list[str]] = {
        "missing_feature_column": [*train, "nocol.yaml"],
        "non_numeric_dense_value": [*train, "badnum.yaml"],
        "binary_label_outside_0_1": [*train, "badlabel.yaml"],
        "missing_label_in_sample_space": [*train, "misslabel.yaml"],
        "bad_value_after_first_block": [*train, "big.yaml"],
        "empty_file": [*train, "empty.yaml"],
        "header_only_file": [*train, "header.yaml"],
        "unknown_model": [*train, "good.yaml", "--set", "model.name=transformer"],
        "mistyped_model": [*train, "good.yaml", "--set", "model.name=mmoee"],
        "switch_model_strictly": [*train, "good.yaml", "--set", "model.name=ple", "--strict"],
        "unknown_config_key": [*train, "good.yaml", "--set", "training.epochz=3"],
        "override_without_value": [*train, "good.yaml", "--set", "training.epochs"],
        "run_folder_of_another_config": [
            *train,
            *("good.yaml", "--output", str(another), "--set", "training.optimizer.lr=0.5"),
        ],
        "checkpoint_of_another_schema": ["evaluate", "other_schema"],
        "truncated_checkpoint": ["evaluate", "truncated"],
        "evaluate_not_a_run": ["evaluate", "not_a_run"],
        "predict_missing_feature_column": [
            *("predict", str(good_run), "--input", "noitem.csv", "--output", "p.csv"),
        ],
        "predict_unknown_output_suffix": [
            *("predict", str(good_run), "--input", "unseen.csv", "--output", "scores.xlsx"),
        ],
        # not errors
        "predict_unseen_users": [
            *("predict", str(good_run), "--input", "unseen.csv", "--output", "unseen_out.csv"),
        ],
        "broken_model_json": ["evaluate", "broken_model_json"],
        "keep_a_label_column": [
            *("predict", str(good_run), "--input", str(labelled), "--output", "kept.csv"),
            *("--keep", "user,click"),
        ],
    }
    needles: dict[str, tuple[str, ...]] = {
        "missing_feature_column": ("nocol.csv", "'price'", "missing column"),
        "non_numeric_dense_value": ("badnum.csv", "'price'", "row 5", "'abc'"),
        "binary_label_outside_0_1": ("badlabel.csv", "'click'", "row 7", "0 or 1"),
        "missing_label_in_sample_space": (
            *("misslabel.csv", "'watch'", f"row {missing_row + 1}", "missing"),
        ),
        "bad_value_after_first_block": ("big.csv", "'price'", "row 68001", "n/a?"),
        "empty_file": ("empty.csv", "empty"),
        "header_only_file": ("header.csv", "no data rows"),
        "unknown_model": ("unknown model", "'transformer'", "mmoe"),
        "unknown_config_key": ("training.epochz", "unknown key", "did you mean 'epochs'?"),
        "mistyped_model": ("unknown model", "'mmoee'", "did you mean 'mmoe'?"),
        "switch_model_strictly": (
            *("model 'ple' has no parameter num_experts", "experts_per_task", "list ple"),
        ),
        "override_without_value": ("'training.epochs'", "key.path=value"),
        "run_folder_of_another_config": (
            *(str(another), "another config", "training.optimizer.lr: 0.01 -> 0.5"),
            *("--overwrite", "another output folder"),
        ),
        "checkpoint_of_another_schema": ("best.safetensors", "another schema"),
        "truncated_checkpoint": (
            *("best.safetensors", "corrupt or truncated", "last.safetensors loads"),
            "--overwrite",
        ),
        "evaluate_not_a_run": ("not_a_run", "not an mtlrec run folder"),
        "predict_missing_feature_column": ("noitem.csv", "'item'", "missing column"),
        "predict_unknown_output_suffix": ("scores.xlsx", "cannot tell the format"),
        "broken_model_json": ("model.json",),
    }
    return Bad(d, cli.run_all(calls, cwd=d), needles)


ERROR_CASES = (
    "missing_feature_column",
    "non_numeric_dense_value",
    "binary_label_outside_0_1",
    "missing_label_in_sample_space",
    "bad_value_after_first_block",
    "empty_file",
    "header_only_file",
    "unknown_model",
    "mistyped_model",
    "switch_model_strictly",
    "unknown_config_key",
    "override_without_value",
    "run_folder_of_another_config",
    "checkpoint_of_another_schema",
    "truncated_checkpoint",
    "evaluate_not_a_run",
    "predict_missing_feature_column",
    "predict_unknown_output_suffix",
)


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_input_gives_one_error_line(bad: Bad, case: str) -> None:
    assert_one_error_line(bad.results[case], *bad.needles[case])


def test_failed_runs_write_no_output(bad: Bad) -> None:
    assert not (bad.dir / "scores.xlsx").exists()
    assert not (bad.dir / "p.csv").exists()
    for name in ("nocol", "badnum", "empty", "header"):
        assert not (bad.dir / "runs" / name / "checkpoints").exists()


def test_predict_reports_unknown_categories(bad: Bad) -> None:
    res = bad.results["predict_unseen_users"]
    assert_ok(res)
    assert "unknown categories" in res.stderr
    assert "user=10" in res.stderr
    out = pacsv.read_csv(bad.dir / "unseen_out.csv")
    assert out.num_rows == 40
    click = np.asarray(out.column("click").to_pylist(), dtype=float)
    assert ((click >= 0) & (click <= 1)).all()


def test_broken_model_json_gives_one_error_line(bad: Bad) -> None:
    assert_one_error_line(bad.results["broken_model_json"], *bad.needles["broken_model_json"])


def test_predict_keep_of_a_column_named_like_a_task_is_refused(bad: Bad) -> None:
    # the decision and its other cases: tests/e2e/test_predict_cli.py
    assert_one_error_line(bad.results["keep_a_label_column"], "--keep click", "--prefix")
    assert not (bad.dir / "kept.csv").exists()


# -- 3. kill and resume ------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, Any]:
    """The files of a checkpoint folder and, for each complete one, its trainer state or why
    it cannot be loaded."""
    from mtlrec.errors import CheckpointError
    from mtlrec.train.checkpoint import load_checkpoint

    files = sorted(p.name for p in folder.iterdir())
    states: dict[str, Any] = {}
    for f in files:
        if not f.endswith(".tmp"):
            try:
                states[f] = load_checkpoint(folder / f).meta["trainer"]
            except CheckpointError as e:
                states[f] = f"unloadable: {e}"
    return {"files": files, "states": states}


def assert_checkpoints_sound(snap: dict[str, Any]) -> dict[str, Any]:
    """Every complete checkpoint loads; a ``*.tmp`` file (an atomic write cut short) lies only
    beside the file it was to replace. Returns the state of ``last``."""
    files, states = snap["files"], snap["states"]
    assert "last.safetensors" in states, files
    assert set(states) <= {"last.safetensors", "best.safetensors"}, files
    for name, state in states.items():
        assert isinstance(state, dict), f"{name}: {state}"
    for tmp in (f for f in files if f.endswith(".tmp")):
        target = tmp[1:].split(".safetensors")[0] + ".safetensors"
        assert target in states, f"{tmp} is the only copy of {target}: {files}"
    return states["last.safetensors"]


@dataclass
class KillTrial:
    run: Path
    after_kill: dict[str, Any]
    summary_before_resume: bool
    resumed: Any


@dataclass
class Kills:
    early: KillTrial
    mid: KillTrial
    reference: Path
    reference_result: Any


def _train_args(run: Path) -> list[str]:
    return ["train", "kill.yaml", "--no-progress", "--output", str(run)]


def _kill_when(job: Any, cond: Callable[[], bool], delay: float = 0.0) -> None:
    """SIGKILL ``job`` once ``cond`` holds (and ``delay`` more seconds); it must be running."""
    try:
        assert wait_for(cond, 120, job.proc), job.output()
        time.sleep(delay)
        assert job.proc.poll() is None, "training ended before it was killed\n" + job.output()
        os.kill(job.proc.pid, signal.SIGKILL)
        job.proc.wait(timeout=30)
    finally:
        job.stop()
    assert job.proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def kills(cli: Any, tmp_path_factory: pytest.TempPathFactory, experiment_yaml: Any) -> Kills:
    """Two runs killed with SIGKILL and run again with the same command (2,000 rows, batch 32,
    3 epochs: 132 steps, a checkpoint after every step).

    ``early`` is killed as soon as its first checkpoint exists. ``mid`` and ``reference`` are
    copies of one run trained for one epoch (``--set training.epochs=1``) that go on to three
    epochs: ``reference`` uninterrupted, ``mid`` killed after some steps of epoch 2. Independent
    runs overlap in time.
    """
    d = tmp_path_factory.mktemp("kill")
    pacsv.write_csv(tiny_table(2000, seed=2), d / "big.csv")
    experiment_yaml(
        d / "kill.yaml", "big.csv", batch_size=32, checkpoint_every_steps=1, output_dir="runs/x"
    )
    early, base = d / "runs" / "early", d / "runs" / "base"
    jobs = [
        cli.start(*_train_args(early), cwd=d, name="early"),
        cli.start(*_train_args(base), "--set", "training.epochs=1", cwd=d, name="base"),
    ]
    try:
        _kill_when(jobs[0], (early / "checkpoints" / "last.safetensors").is_file)
        early_after = snapshot(early / "checkpoints")
        early_summary = (early / "summary.json").exists()
        assert_ok(jobs[1].wait())

        reference = shutil.copytree(base, d / "runs" / "reference")
        mid = shutil.copytree(base, d / "runs" / "mid")
        last = mid / "checkpoints" / "last.safetensors"
        before = (last.stat().st_ino, last.stat().st_mtime_ns)

        def rewritten() -> bool:
            try:
                st = last.stat()
            except FileNotFoundError:
                return False
            return (st.st_ino, st.st_mtime_ns) != before

        jobs += [
            cli.start(*_train_args(reference), cwd=d, name="reference"),
            cli.start(*_train_args(early), cwd=d, name="early_again"),
            cli.start(*_train_args(mid), cwd=d, name="mid"),
        ]
        _kill_when(jobs[4], rewritten, delay=0.3)
        mid_after = snapshot(mid / "checkpoints")
        mid_resumed = cli.run(*_train_args(mid), cwd=d)
        reference_result, early_resumed = jobs[2].wait(), jobs[3].wait()
    finally:
        for job in jobs:
            job.stop()
    return Kills(
        KillTrial(early, early_after, early_summary, early_resumed),
        KillTrial(mid, mid_after, False, mid_resumed),
        reference,
        reference_result,
    )


def test_kill_in_first_epoch_leaves_sound_checkpoints(kills: Kills) -> None:
    state = assert_checkpoints_sound(kills.early.after_kill)
    assert state["epoch"] == 0 and state["step"] >= 1  # within the first epoch
    assert not kills.early.summary_before_resume


def test_kill_in_first_epoch_then_same_command_resumes(kills: Kills) -> None:
    trial = kills.early
    assert_ok(trial.resumed)
    assert "test metrics" in trial.resumed.stdout
    assert [r["epoch"] for r in read_jsonl(trial.run / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((trial.run / "summary.json").read_text())["epochs_run"] == 3
    assert assert_checkpoints_sound(snapshot(trial.run / "checkpoints"))["epoch"] == 3


def test_kill_in_second_epoch_leaves_sound_checkpoints(kills: Kills) -> None:
    state = assert_checkpoints_sound(kills.mid.after_kill)
    assert 1 <= state["epoch"] < 3  # after the first epoch, before the end


def test_kill_in_second_epoch_then_same_command_ends_as_if_never_killed(kills: Kills) -> None:
    trial = kills.mid
    assert_ok(kills.reference_result)
    assert_ok(trial.resumed)
    a = read_jsonl(kills.reference / "metrics.jsonl")
    b = read_jsonl(trial.run / "metrics.jsonl")
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert ra["step"] == rb["step"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-12)
        assert ra["valid"] == rb["valid"]
    sa = json.loads((kills.reference / "summary.json").read_text())
    sb = json.loads((trial.run / "summary.json").read_text())
    assert sa["epochs_run"] == sb["epochs_run"] == 3
    assert sa["best_epoch"] == sb["best_epoch"]
    assert sa["test"] == sb["test"]
    assert_checkpoints_sound(snapshot(trial.run / "checkpoints"))


# -- 4. the demo -------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_one_epoch(cli: Any, tmp_path: Path) -> None:
    res = cli.run(
        "demo", "--epochs", "1", "--no-progress", "--output", ".", cwd=tmp_path, timeout=600
    )
    assert_ok(res)
    assert "census-income test AUC" in res.stdout
    assert re.search(r"income\s*┃\s*never_married", res.stdout), str(res)
    for model in MODEL_NAMES:
        m = re.search(rf"│ {model}\s*│\s*(\d\.\d{{4}})\s*│\s*(\d\.\d{{4}})\s*│", res.stdout)
        assert m, f"{model}\n{res}"
        assert all(0.5 < float(v) <= 1.0 for v in m.groups()), m.group(0)
        # one epoch learns both tasks (AUC ~0.93 and ~0.99), and the table shows demo.json
        income, never = (float(v) for v in m.groups())
        assert income > 0.85 and never > 0.95, m.group(0)
        saved = json.loads((tmp_path / "demo.json").read_text())
        runs = 2 if model == "single_task" else 1  # one single-task network per task
        assert saved["epochs_run"][model] == [1] * runs
        assert saved["best_epochs"][model] == [1] * runs
        shown = [f"{saved['test_auc'][model][t][0]:.4f}" for t in saved["tasks"]]
        assert shown == list(m.groups()), (shown, m.group(0))
    # overall progress: 5 runs (one single-task network per task), with the time left
    progress = [line for line in res.stderr.splitlines() if re.match(r"\[\d/5\] ", line)]
    assert [line[:5] for line in progress] == [f"[{k}/5]" for k in range(1, 6)], res.stderr
    assert all("up to 1 epoch " in line for line in progress), res.stderr
    assert re.search(r"about \d+:\d\d left", progress[-1]), res.stderr
    # one seed: the seesaw is explained and not flagged from noise
    assert "Seesaw:" in res.stdout and "n/a (1 seed)" in res.stdout, res.stdout
    assert not re.search(r"│\s*(yes|no)\s*│", res.stdout), res.stdout
