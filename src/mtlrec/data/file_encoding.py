"""Files read in record batches: fit encoders in one pass, encode and split in a second.

Memory stays at the encoded data plus one batch of raw rows (a raw CSV or Parquet table is
several times larger than its encoded tensors). CSV columns are read as text and converted by
mtlrec, so that a column's type cannot change between blocks and a bad value is reported with
its row. Splits are made by a hash of the row number (:func:`mtlrec.data.split.hash_part`), so
streaming gives exactly the split of reading the file whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.io import NULL_VALUES, file_format
from mtlrec.data.preprocess import Preprocessor, PreprocessorFitter
from mtlrec.data.split import hash_part
from mtlrec.errors import DataError
from mtlrec.schema import Schema
from mtlrec.utils.runtime import mmap_large_blocks, release_memory

BATCH_ROWS = 65_536


def _missing(have: Sequence[str], need: Sequence[str], file: str) -> None:
    have_set = set(have)
    for c in need:
        if c not in have_set:
            shown = ", ".join(list(have)[:12])
            more = "" if len(have) <= 12 else f", ... ({len(have)} columns)"
            raise DataError(f"missing column (the file has: {shown}{more})", file=file, column=c)


def record_batches(
    path: str | os.PathLike[str],
    columns: Sequence[str],
    *,
    delimiter: str | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[pa.Table]:
    """The given columns of a CSV or Parquet file, a table of at most ``batch_rows`` at a time.

    Raises:
        DataError: missing or empty file, missing column, unreadable content.
    """
    p = Path(path)
    name = str(path)
    if not p.is_file():
        raise DataError("file not found", file=name)
    if p.stat().st_size == 0:
        raise DataError("file is empty (expected a header and at least one row)", file=name)
    cols = list(dict.fromkeys(columns))
    try:
        if file_format(p) == "parquet":
            pf = pq.ParquetFile(p)
            _missing(pf.schema_arrow.names, cols, name)
            for rb in pf.iter_batches(batch_size=batch_rows, columns=cols):
                yield pa.Table.from_batches([rb])
            return
        sep = delimiter or ("\t" if ".tsv" in p.name.lower() else ",")
        reader = pacsv.open_csv(
            p,
            read_options=pacsv.ReadOptions(block_size=1 << 22),
            parse_options=pacsv.ParseOptions(delimiter=sep),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in cols},
                include_columns=cols,
                include_missing_columns=True,
                null_values=NULL_VALUES,
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )
        header = _csv_names(p, sep)
        _missing(header, cols, name)
        pending: list[pa.RecordBatch] = []
        rows = 0
        for rb in reader:
            pending.append(rb)
            rows += rb.num_rows
            if rows >= batch_rows:
                yield pa.Table.from_batches(pending)
                pending, rows = [], 0
        if pending:
            yield pa.Table.from_batches(pending)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        msg = str(e).splitlines()[0]
        if "Empty CSV file" in msg:
            raise DataError(
                "file is empty (expected a header and at least one row)", file=name
            ) from None
        raise DataError(f"cannot read: {msg}", file=name) from None


def _csv_names(path: Path, sep: str) -> list[str]:
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=1 << 16),
        parse_options=pacsv.ParseOptions(delimiter=sep),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True, null_values=NULL_VALUES),
    )
    return list(reader.schema.names)


@mmap_large_blocks()
def fit_file(
    schema: Schema,
    path: str | os.PathLike[str],
    *,
    split: tuple[tuple[float, ...], int] | None = None,
    delimiter: str | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Preprocessor:
    """Fit encoders on a file (on its training part when ``split = (fractions, seed)``)."""
    fitter = PreprocessorFitter(schema)
    offset = 0
    for table in record_batches(
        path, schema.input_columns(), delimiter=delimiter, batch_rows=batch_rows
    ):
        rows = None
        if split is not None:
            idx = np.arange(offset, offset + table.num_rows, dtype=np.uint64)
            rows = hash_part(idx, split[0], split[1]) == 0
        fitter.update(table, file=str(path), row_offset=offset, rows=rows)
        offset += table.num_rows
    if offset == 0:
        raise DataError("file has a header but no data rows", file=str(path))
    pre = fitter.finish()
    release_memory()  # the read batches' heap pages go back before the data is encoded
    return pre


@mmap_large_blocks()
def encode_file(
    pre: Preprocessor,
    path: str | os.PathLike[str],
    *,
    split: tuple[tuple[float, ...], int] | None = None,
    targets: bool = True,
    delimiter: str | None = None,
    batch_rows: int = BATCH_ROWS,
) -> list[ColumnarDataset]:
    """Encode a file in record batches: one data set, or one per part of ``split``."""
    n_parts = 1 if split is None else len(split[0])
    chunks: list[list[ColumnarDataset]] = [[] for _ in range(n_parts)]
    offset = 0
    schema = pre.schema
    cols = schema.input_columns() + (schema.target_columns() if targets else [])
    if _has_column(path, schema.group_column, delimiter):
        cols.append(str(schema.group_column))
    for table in record_batches(path, cols, delimiter=delimiter, batch_rows=batch_rows):
        parts = None
        if split is not None:
            idx = np.arange(offset, offset + table.num_rows, dtype=np.uint64)
            parts = hash_part(idx, split[0], split[1])
        for k, ds in enumerate(
            pre.encode_parts(
                table,
                parts=parts,
                num_parts=n_parts,
                file=str(path),
                targets=targets,
                row_offset=offset,
            )
        ):
            chunks[k].append(ds)
        offset += table.num_rows
    if offset == 0:
        raise DataError("file has a header but no data rows", file=str(path))
    release_memory()
    # join column by column, letting each chunk column go once joined
    return [ColumnarDataset.concat(part, consume=True) for part in chunks]


def _has_column(path: str | os.PathLike[str], column: str | None, delimiter: str | None) -> bool:
    if column is None:
        return False
    p = Path(path)
    if file_format(p) == "parquet":
        return column in pq.ParquetFile(p).schema_arrow.names
    sep = delimiter or ("\t" if ".tsv" in p.name.lower() else ",")
    return column in _csv_names(p, sep)
