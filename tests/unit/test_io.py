"""Tests of mtlrec.data.io: reading CSV / Parquet, clear errors, atomic writes."""

from __future__ import annotations

import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtlrec.data.io import file_format, read_table, require_columns, write_table
from mtlrec.errors import DataError

CSV = "item,price,click\na,1.5,1\nb,2.0,0\nc,,1\n"


def expected_table() -> pa.Table:
    return pa.table(
        {
            "item": pa.array(["a", "b", "c"]),
            "price": pa.array([1.5, 2.0, None]),
            "click": pa.array([1, 0, 1], pa.int64()),
        }
    )


# -- reading --------------------------------------------------------------------------------------
def test_csv_and_parquet_read_to_identical_tables(tmp_path) -> None:
    (tmp_path / "d.csv").write_text(CSV)
    pq.write_table(expected_table(), tmp_path / "d.parquet")
    a = read_table(tmp_path / "d.csv")
    b = read_table(tmp_path / "d.parquet")
    assert a.equals(b)
    assert a.equals(expected_table())


@pytest.mark.parametrize("suffix", [".pq", ".parquet.snappy"])
def test_other_parquet_suffixes(tmp_path, suffix: str) -> None:
    pq.write_table(expected_table(), tmp_path / f"d{suffix}")
    assert read_table(tmp_path / f"d{suffix}").equals(expected_table())


def test_null_values_in_csv(tmp_path) -> None:
    (tmp_path / "d.csv").write_text("x,y\nNA,a\n?,NULL\nnan,b\n3,\n")
    t = read_table(tmp_path / "d.csv")
    assert t.column("x").to_pylist() == [None, None, None, 3]
    assert t.column("y").to_pylist() == ["a", None, "b", None]


def test_string_columns_keep_leading_zeros(tmp_path) -> None:
    (tmp_path / "d.csv").write_text("zip,n\n007,007\n010,010\n")
    t = read_table(tmp_path / "d.csv", string_columns=["zip", "not_there"])
    assert t.column("zip").to_pylist() == ["007", "010"]
    assert t.column("n").to_pylist() == [7, 10]  # not named: parsed as a number


def test_tsv_and_explicit_delimiter(tmp_path) -> None:
    (tmp_path / "d.tsv").write_text("a\tb\n1\tx\n")
    assert read_table(tmp_path / "d.tsv").to_pylist() == [{"a": 1, "b": "x"}]
    (tmp_path / "d.txt").write_text("a;b\n1;x\n")
    assert read_table(tmp_path / "d.txt", delimiter=";").to_pylist() == [{"a": 1, "b": "x"}]


def test_gzip_csv_reads(tmp_path) -> None:
    p = tmp_path / "d.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write("zip,price\n007,1.5\n008,2.5\n")
    t = read_table(p, string_columns=["zip"])
    assert t.to_pylist() == [{"zip": "007", "price": 1.5}, {"zip": "008", "price": 2.5}]


# -- errors ---------------------------------------------------------------------------------------
def test_missing_file(tmp_path) -> None:
    p = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="file not found") as info:
        read_table(p)
    assert info.value.file == str(p)
    assert str(p) in str(info.value)


def test_directory_is_not_a_file(tmp_path) -> None:
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(DataError, match="file not found"):
        read_table(tmp_path / "dir.csv")


@pytest.mark.parametrize("name", ["empty.csv", "empty.parquet"])
def test_zero_byte_file(tmp_path, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(b"")
    with pytest.raises(DataError, match=r"file is empty \(expected a header") as info:
        read_table(p)
    assert info.value.file == str(p)


def test_header_only_csv(tmp_path) -> None:
    p = tmp_path / "h.csv"
    p.write_text("a,b,c\n")
    with pytest.raises(DataError, match="has a header but no data rows") as info:
        read_table(p)
    assert info.value.file == str(p)


def test_zero_row_parquet(tmp_path) -> None:
    p = tmp_path / "z.parquet"
    pq.write_table(expected_table().slice(0, 0), p)
    with pytest.raises(DataError, match="no data rows"):
        read_table(p)


def test_unknown_suffix(tmp_path) -> None:
    p = tmp_path / "d.json"
    p.write_text("{}")
    with pytest.raises(DataError, match="cannot tell the format") as info:
        read_table(p)
    assert info.value.file == str(p)
    assert ".parquet" in str(info.value)
    assert ".csv" in str(info.value)


def test_file_format_by_suffix() -> None:
    assert file_format("a/B.CSV") == "csv"
    assert file_format("x.csv.gz") == "csv"
    assert file_format("x.tsv") == "csv"
    assert file_format("x.parquet") == "parquet"
    assert file_format("x.pq") == "parquet"
    with pytest.raises(DataError):
        file_format("x.xlsx")


def test_corrupt_parquet_is_data_error(tmp_path) -> None:
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match="cannot read as parquet") as info:
        read_table(p)
    assert info.value.file == str(p)


def test_ragged_csv_is_data_error(tmp_path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(DataError, match="cannot read as csv"):
        read_table(p)


def test_require_columns_names_missing_column() -> None:
    t = expected_table()
    require_columns(t, ["item", "click"], file="d.csv", role="feature")
    with pytest.raises(DataError) as info:
        require_columns(t, ["item", "user", "age"], file="d.csv", role="feature")
    e = info.value
    assert (e.file, e.column) == ("d.csv", "user")
    msg = str(e)
    assert "'user'" in msg
    assert "missing feature column" in msg
    assert "item, price, click" in msg


def test_require_columns_abbreviates_wide_tables() -> None:
    t = pa.table({f"c{i}": [i] for i in range(20)})
    with pytest.raises(DataError, match=r"\.\.\. \(20 columns\)") as info:
        require_columns(t, ["zz"], file="w.csv", role="label/mask/weight")
    assert "c12" not in str(info.value)
    assert "missing label/mask/weight column" in str(info.value)


# -- writing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["out.csv", "out.parquet"])
def test_write_table_atomic_round_trip(tmp_path, name: str) -> None:
    out = tmp_path / "sub" / name
    write_table(expected_table(), out)
    assert sorted(p.name for p in out.parent.iterdir()) == [name]  # no temporary file left
    assert read_table(out).equals(expected_table())


@pytest.mark.parametrize("name", ["out.csv", "out.parquet"])
def test_write_table_replaces_existing(tmp_path, name: str) -> None:
    out = tmp_path / name
    write_table(pa.table({"a": [1, 2, 3]}), out)
    write_table(expected_table(), out)
    assert read_table(out).equals(expected_table())
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_write_table_failure_leaves_no_file(tmp_path) -> None:
    out = tmp_path / "out.parquet"
    with pytest.raises(Exception):  # noqa: B017 - any failure of the writer
        write_table("not a table", out)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_write_table_unknown_suffix(tmp_path) -> None:
    with pytest.raises(DataError, match="cannot tell the format"):
        write_table(expected_table(), tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []


def test_write_table_csv_gz_round_trip(tmp_path) -> None:
    out = tmp_path / "out.csv.gz"
    write_table(expected_table(), out)
    assert read_table(out).equals(expected_table())


def test_write_table_tsv_round_trip(tmp_path) -> None:
    out = tmp_path / "out.tsv"
    write_table(expected_table(), out)
    assert read_table(out).equals(expected_table())
