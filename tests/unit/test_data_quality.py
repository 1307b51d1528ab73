"""Degenerate training data (issue 13.1): errors for data that would train on nothing, warnings
for data that trains but probably not as meant, checked in the single fit pass."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mtlrec.cli import _metrics_table
from mtlrec.config import ExperimentConfig
from mtlrec.data.file_encoding import fit_file, record_batches
from mtlrec.data.io import read_table
from mtlrec.data.loading import load_datasets
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.split import hash_part
from mtlrec.data.stream_dataset import StreamingDataset
from mtlrec.errors import DataError, DataWarning
from mtlrec.metrics import MetricSet
from mtlrec.testing import tiny_schema, tiny_table

SPLIT = ((0.6, 0.2, 0.2), 0)


def _write(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path, row_group_size=50)
    return path


def _with(table: pa.Table, name: str, values: list | np.ndarray | pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(
        i, name, pa.array(values) if not isinstance(values, pa.Array) else values
    )


def _no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        return fn(*args, **kwargs)


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("fill", [None, float("nan")])
def test_dense_column_empty_on_every_training_row_is_an_error(
    tmp_path: Path, suffix: str, fill: float | None
) -> None:
    t = _with(tiny_table(300), "price", pa.array([fill] * 300, pa.float64()))
    path = _write(t, tmp_path / f"d{suffix}")
    with pytest.raises(DataError) as info:
        fit_file(tiny_schema(), path, split=SPLIT, batch_rows=64)
    e = info.value
    assert (e.file, e.column) == (str(path), "price")
    assert "empty or NaN on every training row" in str(e)
    assert "remove the feature" in str(e)
    assert "\n" not in str(e)


def test_dense_column_present_only_outside_the_training_rows_is_an_error(tmp_path: Path) -> None:
    """The check counts training rows only, across the chunks of a streamed file."""
    n = 300
    train = hash_part(np.arange(n, dtype=np.uint64), *SPLIT) == 0
    price = np.where(train, np.nan, 2.0)
    path = _write(_with(tiny_table(n), "price", price), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"'price'.*every training row"):
        fit_file(tiny_schema(), path, split=SPLIT, batch_rows=32)
    # the same file without a split trains: the values are training rows then
    _no_warnings(fit_file, tiny_schema(), path, batch_rows=32)


@pytest.mark.parametrize(
    ("column", "values", "needle"),
    [
        ("user", [None] * 200, "categorical feature 'user' is missing on every training row"),
        ("user", ["NA"] * 100 + [""] * 100, "categorical feature 'user' is missing"),
        ("hist", ["|"] * 200, "sequence feature 'hist' is empty on every training row"),
    ],
)
def test_categorical_or_sequence_missing_on_every_row_is_an_error(
    column: str, values: list, needle: str
) -> None:
    t = _with(tiny_table(200), column, pa.array(values, pa.string()))
    with pytest.raises(DataError, match=re.escape(needle)) as info:
        Preprocessor.fit(tiny_schema(), t, file="t.csv")
    assert (info.value.file, info.value.column) == ("t.csv", column)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_column_named_twice_in_the_header_is_an_error(tmp_path: Path, suffix: str) -> None:
    t = tiny_table(50)
    dup = pa.Table.from_arrays([*t.columns, t.column("price")], names=[*t.column_names, "price"])
    path = tmp_path / f"dup{suffix}"
    if suffix == ".csv":
        pacsv.write_csv(dup, path)
    else:
        pq.write_table(dup, path)
    for read in (
        lambda: fit_file(tiny_schema(), path),
        lambda: list(record_batches(path, ["price"])),
        lambda: read_table(path),
    ):
        with pytest.raises(DataError, match=r"2 times \(columns \[3, 7\]\)") as info:
            read()
        assert (info.value.file, info.value.column) == (str(path), "price")
    if suffix == ".parquet":
        with pytest.raises(DataError, match="2 times"):
            StreamingDataset(Preprocessor.fit(tiny_schema(), t), path)
    # a table named twice is refused too (pyarrow would raise a KeyError)
    with pytest.raises(DataError, match=r"'price'.*2 times"):
        Preprocessor.fit(tiny_schema(), dup)


def test_an_unused_repeated_column_is_not_an_error(tmp_path: Path) -> None:
    t = tiny_table(50)
    extra = pa.array(["x"] * 50)
    dup = pa.Table.from_arrays([*t.columns, extra, extra], names=[*t.column_names, "n", "n"])
    path = tmp_path / "dup.parquet"
    pq.write_table(dup, path)
    fit_file(tiny_schema(), path)


def test_task_whose_mask_selects_no_training_row_is_an_error(tmp_path: Path) -> None:
    n = 300
    train = hash_part(np.arange(n, dtype=np.uint64), *SPLIT) == 0
    t = tiny_table(n)
    click = np.where(train, 0, t.column("click").to_numpy())  # clicks only outside training
    t = _with(t, "click", click)
    t = _with(t, "watch", np.where(click == 1, 0.5, np.nan))
    path = _write(t, tmp_path / "m.csv")
    with pytest.raises(DataError) as info:
        fit_file(tiny_schema(), path, split=SPLIT)
    msg = str(info.value)
    assert info.value.column == "click"
    assert "task 'watch' has no valid training row" in msg
    assert "mask column 'click'" in msg and "tasks:" in msg


def test_task_with_fewer_rows_than_min_task_rows_is_an_error() -> None:
    t = tiny_table(200)
    click = np.zeros(200, dtype=np.int64)
    click[:5] = 1
    t = _with(_with(t, "click", click), "watch", np.where(click == 1, 0.5 + np.arange(200), np.nan))
    with pytest.raises(DataError, match=r"'watch' has 5 valid training rows.*min_task_rows = 6"):
        Preprocessor.fit(tiny_schema(), t, min_task_rows=6)
    Preprocessor.fit(tiny_schema(), t, min_task_rows=5)


def test_min_task_rows_comes_from_the_config(tmp_path: Path) -> None:
    t = tiny_table(200)
    click = np.zeros(200, dtype=np.int64)
    click[:40] = 1
    t = _with(_with(t, "click", click), "watch", np.where(click == 1, 0.5 + np.arange(200), np.nan))
    _write(t, tmp_path / "d.parquet")

    def cfg(k: int) -> ExperimentConfig:
        return ExperimentConfig.from_dict(
            {
                "data": {"train": "d.parquet", "min_task_rows": k},
                "schema": tiny_schema().model_dump(mode="json"),
                "model": {"name": "mmoe"},
            },
            base_dir=str(tmp_path),
        )

    with pytest.raises(DataError, match=r"data\.min_task_rows = 100"):
        load_datasets(cfg(100))
    assert (
        ExperimentConfig.from_dict(
            {"data": {"train": "x.csv"}, "model": {"name": "mmoe"}}
        ).data.min_task_rows
        == 10
    )
    load_datasets(cfg(5))


def test_empty_training_part_is_an_error(tmp_path: Path) -> None:
    path = _write(tiny_table(3), tmp_path / "d.parquet")
    with pytest.raises(DataError, match="no training rows"):
        fit_file(tiny_schema(), path, split=((0.0, 0.5, 0.5), 0))


# -- warnings -------------------------------------------------------------------------------------
def test_constant_label_is_a_warning() -> None:
    t = _with(tiny_table(200), "click", np.ones(200, dtype=np.int64))
    t = _with(t, "watch", np.full(200, 0.5))
    with pytest.warns(DataWarning) as rec:
        Preprocessor.fit(tiny_schema(), t, file="t.csv")
    msgs = [str(w.message) for w in rec]
    assert any(
        "task 'click': every one of its 200 valid training rows has the label 1" in m for m in msgs
    )
    assert any("task 'watch'" in m and "label 0.5" in m for m in msgs)


def test_constant_feature_is_a_warning_and_running_bounds_see_every_chunk(tmp_path: Path) -> None:
    t = _with(tiny_table(200), "user", ["u1"] * 200)
    with pytest.warns(
        DataWarning, match=r"one value on every training row.*'user' \(always 'u1'\)"
    ):
        Preprocessor.fit(tiny_schema(), t)
    t = _with(tiny_table(200), "price", np.full(200, 3.0))
    with pytest.warns(DataWarning, match=r"'price' \(always"):
        Preprocessor.fit(tiny_schema(), t)
    # one value per chunk, another in the next chunk: not constant
    t = _with(tiny_table(200), "user", ["u1"] * 100 + ["u2"] * 100)
    path = _write(t, tmp_path / "two.parquet")
    _no_warnings(fit_file, tiny_schema(), path, batch_rows=50)
    # a value and missing values are two ids: not constant
    t = _with(tiny_table(200), "user", ["u1"] * 199 + [None])
    _no_warnings(Preprocessor.fit, tiny_schema(), t)


def test_healthy_data_gives_no_warning() -> None:
    _no_warnings(Preprocessor.fit, tiny_schema(), tiny_table(300))


def test_valid_split_without_rows_of_a_task_warns_and_metrics_say_n_0(tmp_path: Path) -> None:
    train = tiny_table(300, seed=1)
    valid = tiny_table(80, seed=2)
    valid = _with(_with(valid, "click", np.zeros(80, dtype=np.int64)), "watch", np.full(80, np.nan))
    _write(train, tmp_path / "train.parquet")
    _write(valid, tmp_path / "valid.parquet")
    cfg = ExperimentConfig.from_dict(
        {
            "data": {"train": "train.parquet", "valid": "valid.parquet"},
            "schema": tiny_schema().model_dump(mode="json"),
            "model": {"name": "mmoe"},
        },
        base_dir=str(tmp_path),
    )
    with pytest.warns(
        DataWarning, match=r"valid data valid.parquet: no valid row for task 'watch'"
    ):
        sets = load_datasets(cfg)
    assert sets.valid is not None
    # what the metrics say for that task, and how the CLI shows it
    ms = MetricSet(tiny_schema())
    for b in sets.valid.batches(32):
        ms.update({"click": b.labels["click"] * 0 + 0.3, "watch": b.labels["watch"]}, b)
    metrics = ms.compute()
    assert metrics["watch"]["count"] == 0
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(_metrics_table("valid", metrics))
    text = console.export_text()
    watch = next(line for line in text.splitlines() if "watch" in line)
    cells = [c.strip() for c in watch.split("│") if c.strip()]
    assert cells[0] == "watch" and cells[-1] == "0"  # n = 0, last column
    assert all(c == "—" for c in cells[1:-1]), cells  # and no number from nothing
    header = next(line for line in text.splitlines() if "task" in line)
    assert [c.strip() for c in header.split("┃") if c.strip()][-1] == "n"
    click = next(line for line in text.splitlines() if "click" in line)
    assert [c.strip() for c in click.split("│") if c.strip()][-1] == "80"


def test_metrics_table_shows_undefined_values_as_a_dash() -> None:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(_metrics_table("t", {"click": {"auc": float("nan"), "logloss": 0.5, "count": 7}}))
    line = next(x for x in console.export_text().splitlines() if "click" in x)
    assert [c.strip() for c in line.split("│") if c.strip()] == ["click", "—", "0.50000", "7"]
