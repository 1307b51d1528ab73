"""Degenerate data through the real ``mtlrec`` command (issue 13): one error line and exit
status 2 for data that would train on nothing, a warning and n = 0 in the metric table for a
test split without a task's rows."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import experiment
from mtlrec.testing import tiny_table


def assert_ok(res: Any) -> None:
    assert res.returncode == 0, str(res)
    assert "Traceback" not in res.stderr, str(res)


def assert_one_error_line(res: Any, *needles: str) -> str:
    """Exit status 2 and one ``error: ...`` line on stderr holding every needle."""
    assert res.returncode == 2, str(res)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), str(res)
    for needle in needles:
        assert needle in lines[0], str(res)
    return lines[0]


def _set(t: pa.Table, name: str, values: Any) -> pa.Table:
    return t.set_column(t.schema.get_field_index(name), name, pa.array(values))


@pytest.fixture(scope="module")
def results(cli: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("data_cli")
    n = 300
    t = tiny_table(n)
    pacsv.write_csv(_set(t, "price", pa.array([None] * n, pa.float64())), d / "noprice.csv")
    pacsv.write_csv(t, d / "semicolon.csv", write_options=pacsv.WriteOptions(delimiter=";"))
    dup = pa.Table.from_arrays([*t.columns, t.column("item")], names=[*t.column_names, "item"])
    pq.write_table(dup, d / "dup.parquet")
    noclick = _set(_set(t, "click", np.zeros(n, dtype=np.int64)), "watch", np.full(n, np.nan))
    pacsv.write_csv(noclick, d / "noclick.csv")
    pq.write_table(t, d / "train.parquet")
    pq.write_table(noclick.slice(0, 60), d / "test_noclick.parquet")
    calls: dict[str, list[str]] = {}
    for name in ("noprice.csv", "semicolon.csv", "dup.parquet", "noclick.csv"):
        cfg = experiment(name, epochs=1, output_dir=f"runs/{name}", progress=False)
        (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        calls[name] = ["train", f"{name}.yaml", "--no-progress"]
    cfg = experiment("train.parquet", epochs=1, output_dir="runs/ok", progress=False)
    cfg["data"] = {
        "train": "train.parquet",
        "valid": "train.parquet",
        "test": "test_noclick.parquet",
    }
    (d / "emptytest.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    calls["emptytest"] = ["train", "emptytest.yaml", "--no-progress"]
    return {"dir": d, "res": cli.run_all(calls, cwd=d)}


def test_dense_column_empty_on_every_row_exits_2(results: dict[str, Any]) -> None:
    line = assert_one_error_line(results["res"]["noprice.csv"], "noprice.csv", "'price'")
    assert "empty or NaN on every training row" in line and "remove the feature" in line


def test_wrong_delimiter_exits_2_naming_the_setting(results: dict[str, Any]) -> None:
    assert_one_error_line(
        results["res"]["semicolon.csv"], "semicolon.csv", 'set data.delimiter: ";"'
    )


def test_repeated_column_exits_2(results: dict[str, Any]) -> None:
    assert_one_error_line(results["res"]["dup.parquet"], "dup.parquet", "'item'", "2 times")


def test_task_without_training_rows_exits_2(results: dict[str, Any]) -> None:
    line = assert_one_error_line(results["res"]["noclick.csv"], "noclick.csv", "'click'")
    assert "task 'watch' has no valid training row" in line


def test_test_split_without_a_tasks_rows_warns_and_shows_n_0(results: dict[str, Any]) -> None:
    res = results["res"]["emptytest"]
    assert_ok(res)
    assert "test data test_noclick.parquet: no valid row for task 'watch'" in res.stderr
    watch = next(x for x in res.stdout.splitlines() if x.lstrip("│ ").startswith("watch"))
    cells = [c.strip() for c in watch.split("│") if c.strip()]
    assert cells[-1] == "0" and set(cells[1:-1]) == {"—"}, res.stdout
    assert re.search(r"click\s*│.*│\s*60\s*│", res.stdout), res.stdout
    assert Path(results["dir"] / "runs/ok/summary.json").is_file()
