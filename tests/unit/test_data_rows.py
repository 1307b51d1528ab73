"""Errors that say what to do (issue 13.3): a file read with the wrong delimiter says so and
names ``data.delimiter``; every message that reports a row says ``data row N`` (the N-th row
after the header), the same number whichever path read the row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mtlrec.data.file_encoding import encode_file, fit_file, record_batches
from mtlrec.data.io import read_table, require_columns
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.split import hash_part
from mtlrec.data.stream_dataset import StreamingDataset, encode_other_parts
from mtlrec.errors import DataError
from mtlrec.testing import tiny_schema, tiny_table

SPLIT = ((0.6, 0.2, 0.2), 0)


def _csv(path: Path, table: pa.Table, sep: str) -> Path:
    pacsv.write_csv(table, path, write_options=pacsv.WriteOptions(delimiter=sep))
    return path


# -- the wrong delimiter --------------------------------------------------------------------------
@pytest.mark.parametrize(("sep", "read_with", "shown"), [(";", None, '";"'), ("\t", None, '"\\t"')])
def test_a_file_of_another_delimiter_says_so_and_names_the_setting(
    tmp_path: Path, sep: str, read_with: str | None, shown: str
) -> None:
    path = _csv(tmp_path / "d.csv", tiny_table(30), sep)
    for read in (
        lambda: fit_file(tiny_schema(), path, delimiter=read_with),
        lambda: encode_file(Preprocessor.fit(tiny_schema(), tiny_table(60)), path),
        lambda: list(record_batches(path, ["user"])),
    ):
        with pytest.raises(DataError) as info:
            read()
        msg = str(info.value)
        assert info.value.column == "user"
        assert f"the header looks separated by {sep!r}, not ','" in msg
        assert f"set data.delimiter: {shown}" in msg
        assert "\n" not in msg


def test_a_comma_file_read_with_a_semicolon_says_so(tmp_path: Path) -> None:
    path = _csv(tmp_path / "d.csv", tiny_table(30), ",")
    with pytest.raises(DataError, match=r"separated by ',', not ';': set data\.delimiter: \",\""):
        fit_file(tiny_schema(), path, delimiter=";")


def test_ragged_rows_of_another_delimiter_say_so(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a;b;c\n1;x,y;3\n2;z;4\n")
    with pytest.raises(DataError) as info:
        read_table(path)
    msg = str(info.value)
    assert "data row 1: cannot read as csv: expected 1 fields (as in the header), found 2" in msg
    assert 'set data.delimiter: ";"' in msg


def test_a_plain_missing_column_gives_no_delimiter_hint() -> None:
    t = pa.table({"a": [1], "b": [2]})
    with pytest.raises(DataError) as info:
        require_columns(t, ["c"], file="f.csv", role="feature", delimiter=",")
    assert "delimiter" not in str(info.value)


# -- row numbers ----------------------------------------------------------------------------------
def test_row_numbers_say_data_row() -> None:
    assert str(DataError("bad", file="f.csv", column="c", row=3)) == (
        "file f.csv, column 'c', data row 3: bad"
    )
    # a row of an array or a request, not of a file
    assert str(DataError("bad", column="c", row=3)) == "column 'c', row 3: bad"


@pytest.mark.parametrize("reader", ["read_table", "record_batches"])
def test_a_ragged_row_names_its_data_row(tmp_path: Path, reader: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,c\n1,2,3\n4,5,6\n7,8\n9,10,11\n")  # the 3rd data row, line 4
    with pytest.raises(DataError) as info:
        if reader == "read_table":
            read_table(path)
        else:
            list(record_batches(path, ["a"]))
    assert info.value.row == 3
    assert "data row 3: cannot read as csv: expected 3 fields (as in the header), found 2" in str(
        info.value
    )


def _bad_label_file(tmp_path: Path, part: int) -> tuple[Path, int]:
    """A Parquet file with one binary label of 2, on a row of the given split part that has
    rows of other parts before it in its row group; returns the file and that row (0-based)."""
    n = 700
    t = tiny_table(n, seed=5)
    parts = hash_part(np.arange(n, dtype=np.uint64), *SPLIT)
    row = next(r for r in range(130, n) if parts[r] == part and (parts[r - 20 : r] != part).any())
    click = t.column("click").to_numpy().copy()
    click[row] = 2
    t = t.set_column(t.schema.get_field_index("click"), "click", pa.array(click))
    path = tmp_path / f"bad{part}.parquet"
    pq.write_table(t, path, row_group_size=64)
    return path, row


def test_streamed_training_rows_name_the_file_row(tmp_path: Path) -> None:
    path, row = _bad_label_file(tmp_path, 0)
    pre = Preprocessor.fit(tiny_schema(), tiny_table(300))
    data = StreamingDataset(pre, path, split=SPLIT, read_rows=50, prefetch=False)
    with pytest.raises(DataError, match="expects labels 0 or 1") as info:
        for _ in data.batches(64):
            pass
    assert (info.value.column, info.value.row) == ("click", row + 1)


def test_other_split_parts_name_the_file_row(tmp_path: Path) -> None:
    path, row = _bad_label_file(tmp_path, 1)
    pre = Preprocessor.fit(tiny_schema(), tiny_table(300))
    with pytest.raises(DataError) as info:
        encode_other_parts(pre, path, SPLIT, read_rows=100)
    assert (info.value.column, info.value.row) == ("click", row + 1)
    # reading the whole file, or fitting on it, names the same row
    with pytest.raises(DataError) as info:
        encode_file(pre, path, split=SPLIT, batch_rows=100)
    assert info.value.row == row + 1
    with pytest.raises(DataError) as info:
        fit_file(tiny_schema(), path, split=SPLIT, batch_rows=100)
    assert info.value.row == row + 1


def test_csv_and_parquet_name_the_same_row(tmp_path: Path) -> None:
    t = tiny_table(200)
    price = t.column("price").to_pylist()
    price[150] = -5.0  # log1p of a value <= -1
    t = t.set_column(t.schema.get_field_index("price"), "price", pa.array(price))
    rows = set()
    for name in ("d.csv", "d.parquet"):
        path = tmp_path / name
        pacsv.write_csv(t, path) if name.endswith("csv") else pq.write_table(t, path)
        with pytest.raises(DataError, match="log1p") as info:
            fit_file(tiny_schema(), path, batch_rows=64)
        rows.add(info.value.row)
    assert rows == {151}
