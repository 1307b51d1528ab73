"""Reading CSV and Parquet files with pyarrow, with errors that name the file, column and row.

What a value means (missing, number, category) is :mod:`mtlrec.data.columns`' rule: readers
here keep text as text, and :func:`read_table` applies the rule to every column.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtlrec.data.columns import null_tokens, to_missing
from mtlrec.errors import DataError

CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz", ".csv.bz2", ".csv.zst")
PARQUET_SUFFIXES = (".parquet", ".pq", ".parquet.brotli", ".parquet.snappy", ".parquet.zstd")
ROW_GROUP_ROWS = 65_536
"""Rows per Parquet row group written by mtlrec (readers stream one group at a time)."""
_CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
_DELIMITERS = (",", ";", "\t", "|")


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


def csv_delimiter(path: str | os.PathLike[str], delimiter: str | None) -> str:
    """The delimiter a CSV file is read with: the given one, else tab for ``.tsv``, else comma."""
    return delimiter or ("\t" if ".tsv" in Path(path).name.lower() else ",")


def csv_header(path: str | os.PathLike[str], sep: str) -> list[str]:
    """The column names of a CSV file's header (as read with ``sep``)."""
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=1 << 16),
        # rows that do not parse are the readers' errors to report, not the header's
        parse_options=pacsv.ParseOptions(delimiter=sep, invalid_row_handler=lambda _: "skip"),
        convert_options=pacsv.ConvertOptions(column_types={}, null_values=[""]),
    )
    return list(reader.schema.names)


def delimiter_hint(names: Sequence[str], sep: str, wanted: Sequence[str] = ()) -> str:
    """``'; the header looks separated by ';', not ',': set data.delimiter: ";"'`` when the
    header read with ``sep`` looks like one of another delimiter (one column whose name holds
    it, or a wanted column found inside a name split on it), else ``''``."""
    want = set(wanted)
    best, parts = "", 1
    for cand in _DELIMITERS:
        if cand == sep:
            continue
        split = [p.strip() for n in names for p in n.split(cand)]
        if len(split) <= len(names):
            continue
        if (len(names) == 1 or want & set(split)) and len(split) > parts:
            best, parts = cand, len(split)
    if not best:
        return ""
    return (
        f"; the header looks separated by {best!r}, not {sep!r}: "
        f"set data.delimiter: {json.dumps(best)}"
    )


def check_header(
    names: Sequence[str],
    columns: Sequence[str],
    *,
    file: str,
    role: str = "",
    delimiter: str | None = None,
) -> None:
    """Raise a :class:`DataError` naming the first of ``columns`` that the header lacks or
    holds more than once.

    Args:
        names: the file's column names.
        columns: the columns that will be read.
        file: the file, for the message.
        role: what the columns are for (``feature``...), for the message.
        delimiter: the CSV delimiter used (adds a hint when the header looks like another).
    """
    counts = Counter(names)
    for c in columns:
        if counts[c] == 0:
            shown = ", ".join(list(names)[:12])
            more = "" if len(names) <= 12 else f", ... ({len(names)} columns)"
            hint = "" if delimiter is None else delimiter_hint(names, delimiter, columns)
            what = f"missing {role} column" if role else "missing column"
            raise DataError(f"{what} (the file has: {shown}{more}){hint}", file=file, column=c)
        if counts[c] > 1:
            at = [i + 1 for i, n in enumerate(names) if n == c]
            raise DataError(
                f"the header holds this name {counts[c]} times (columns {at}); rename or "
                "remove all but one",
                file=file,
                column=c,
            )


def read_table(
    path: str | os.PathLike[str],
    *,
    string_columns: Iterable[str] = (),
    delimiter: str | None = None,
    null_values: Iterable[str] | None = None,
) -> pa.Table:
    """Read a whole CSV or Parquet file into a pyarrow table.

    Missing values follow :mod:`mtlrec.data.columns`: empty cells, NaN and ``null_values``
    become nulls in both formats (so a CSV and a Parquet file of the same rows read alike).

    Args:
        path: the file.
        string_columns: CSV columns to keep as text (categorical ids such as ``007`` must not
            be parsed as numbers).
        delimiter: CSV delimiter; tab for ``.tsv``, comma otherwise.
        null_values: null tokens (``None``: :data:`~mtlrec.data.columns.DEFAULT_NULL_VALUES`).

    Returns:
        The table, at least one row.

    Raises:
        DataError: file missing, empty, unreadable, holding no rows, or a header with a name
            twice.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError("file not found", file=str(path))
    if p.stat().st_size == 0:
        raise DataError("file is empty (expected a header and at least one row)", file=str(path))
    fmt = file_format(p)
    tokens = null_tokens(null_values)
    sep = csv_delimiter(p, delimiter)
    types: dict[str, pa.DataType] = {}
    try:
        if fmt == "parquet":
            names = pq.ParquetFile(p).schema_arrow.names
            check_header(names, names, file=str(path))
            table = pq.read_table(p)
        else:
            header = csv_header(p, sep)
            check_header(header, header, file=str(path))
            types = {c: pa.string() for c in string_columns if c in header}
            table = pacsv.read_csv(p, **csv_options(sep, types, ["", *tokens]))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        raise read_error(e, p, fmt, sep, lambda: csv_options(sep, types, ["", *tokens])) from None
    if table.num_rows == 0:
        raise DataError("file has a header but no data rows", file=str(path))
    for i, name in enumerate(table.column_names):
        table = table.set_column(i, name, to_missing(table.column(i), tokens))
    return table


def csv_options(sep: str, types: dict[str, pa.DataType], nulls: list[str]) -> dict[str, Any]:
    """pyarrow's CSV options for mtlrec: ``types`` as given, ``nulls`` read as null."""
    return {
        "parse_options": pacsv.ParseOptions(delimiter=sep),
        "convert_options": pacsv.ConvertOptions(
            column_types=types,
            null_values=nulls,
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    }


def read_error(
    e: Exception,
    path: Path,
    fmt: str,
    sep: str,
    options: Callable[[], dict[str, Any]],
) -> DataError:
    """A pyarrow read error as a :class:`DataError`: the data row (found by reading the file
    again on one thread when the message lacks it) and a hint when the header looks separated
    by another delimiter."""
    msg = str(e).splitlines()[0]
    name = str(path)
    if "Empty CSV file" in msg:
        return DataError("file is empty (expected a header and at least one row)", file=name)
    if fmt != "csv":
        return DataError(f"cannot read as {fmt}: {msg}", file=name)
    try:
        names = csv_header(path, sep)
    except (pa.ArrowInvalid, OSError):
        names = []
    if "Row #" not in msg and ("CSV parse error" in msg or "CSV conversion error" in msg):
        msg = _serial_error(path, options()) or msg
    row = None
    found = re.search(r"Row #(\d+): ", msg)
    if found:  # pyarrow counts the header as row 1
        row = int(found.group(1)) - 1
        msg = msg.replace(found.group(0), "")
    cols = re.search(r"Expected (\d+) columns, got (\d+)", msg)
    if cols:
        msg = f"expected {cols.group(1)} fields (as in the header), found {cols.group(2)}"
    msg = f"cannot read as csv: {msg}"
    return DataError(msg + delimiter_hint(names, sep), file=name, row=row)


def _serial_error(path: Path, options: dict[str, Any]) -> str | None:
    """The message of the first read error, from reading the file on one thread (pyarrow
    reports the row then); the error path only."""
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(use_threads=False), **options)
        for _ in reader:
            pass
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        return str(e).splitlines()[0]
    return None


def require_columns(
    table: pa.Table,
    columns: Sequence[str],
    *,
    file: str,
    role: str,
    delimiter: str | None = None,
) -> None:
    """Raise a :class:`DataError` naming the first missing (or repeated) column and what it is
    for."""
    check_header(table.column_names, columns, file=file, role=role, delimiter=delimiter)


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
