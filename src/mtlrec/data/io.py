"""Reading CSV and Parquet files with pyarrow, with errors that name the file and column."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtlrec.errors import DataError

CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz", ".csv.bz2", ".csv.zst")
PARQUET_SUFFIXES = (".parquet", ".pq", ".parquet.brotli", ".parquet.snappy", ".parquet.zstd")
ROW_GROUP_ROWS = 65_536
"""Rows per Parquet row group written by mtlrec (readers stream one group at a time)."""
_CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
NULL_VALUES = ["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?"]


def file_format(path: str | os.PathLike[str]) -> str:
    """``'csv'`` or ``'parquet'`` from the file name."""
    name = str(path).lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    raise DataError(
        f"cannot tell the format from the name; expected one of {CSV_SUFFIXES + PARQUET_SUFFIXES}",
        file=str(path),
    )


def read_table(
    path: str | os.PathLike[str],
    *,
    string_columns: Iterable[str] = (),
    delimiter: str | None = None,
) -> pa.Table:
    """Read a whole CSV or Parquet file into a pyarrow table.

    Args:
        path: the file.
        string_columns: CSV columns to keep as text (categorical ids such as ``007`` must not
            be parsed as numbers).
        delimiter: CSV delimiter; tab for ``.tsv``, comma otherwise.

    Returns:
        The table, at least one row.

    Raises:
        DataError: file missing, empty, unreadable, or holding no rows.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError("file not found", file=str(path))
    if p.stat().st_size == 0:
        raise DataError("file is empty (expected a header and at least one row)", file=str(path))
    fmt = file_format(p)
    try:
        if fmt == "parquet":
            table = pq.read_table(p)
        else:
            sep = delimiter or ("\t" if ".tsv" in p.name.lower() else ",")
            header = _csv_header(p, sep)
            types = {c: pa.string() for c in string_columns if c in header}
            table = pacsv.read_csv(
                p,
                parse_options=pacsv.ParseOptions(delimiter=sep),
                convert_options=pacsv.ConvertOptions(
                    column_types=types,
                    null_values=NULL_VALUES,
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=True,
                ),
            )
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        msg = str(e).splitlines()[0]
        if "Empty CSV file" in msg:
            raise DataError(
                "file is empty (expected a header and at least one row)", file=str(path)
            ) from None
        raise DataError(f"cannot read as {fmt}: {msg}", file=str(path)) from None
    if table.num_rows == 0:
        raise DataError("file has a header but no data rows", file=str(path))
    return table


def _csv_header(path: Path, sep: str) -> list[str]:
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=1 << 16),
        parse_options=pacsv.ParseOptions(delimiter=sep),
        convert_options=pacsv.ConvertOptions(
            column_types={}, null_values=NULL_VALUES, strings_can_be_null=True
        ),
    )
    return list(reader.schema.names)


def require_columns(table: pa.Table, columns: Sequence[str], *, file: str, role: str) -> None:
    """Raise a :class:`DataError` naming the first missing column and what it is for."""
    have = set(table.column_names)
    for c in columns:
        if c not in have:
            shown = ", ".join(table.column_names[:12])
            more = "" if table.num_columns <= 12 else f", ... ({table.num_columns} columns)"
            raise DataError(
                f"missing {role} column (the file has: {shown}{more})", file=file, column=c
            )


def write_table(table: pa.Table, path: str | os.PathLike[str]) -> None:
    """Write CSV or Parquet (by suffix) atomically: a temporary file, then a rename."""
    from mtlrec.utils.atomic import atomic_path

    fmt = file_format(path)
    name = str(path).lower()
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
            return
        opts = pacsv.WriteOptions(delimiter="\t" if ".tsv" in name else ",")
        codec = next((c for suf, c in _CODECS.items() if name.endswith(suf)), None)
        if codec is None:
            pacsv.write_csv(table, tmp, write_options=opts)
        else:
            with pa.CompressedOutputStream(tmp, codec) as stream:
                pacsv.write_csv(table, stream, write_options=opts)
