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

from mtlrec.data.columns import DEFAULT_NULL_VALUES, group_ids
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.io import (
    check_header,
    csv_delimiter,
    csv_header,
    csv_options,
    file_format,
    read_error,
)
from mtlrec.data.preprocess import Preprocessor, PreprocessorFitter
from mtlrec.data.split import hash_part, split_keys
from mtlrec.errors import DataError
from mtlrec.schema import Schema
from mtlrec.utils.runtime import mmap_large_blocks, release_memory

BATCH_ROWS = 65_536


def file_columns(path: str | os.PathLike[str], delimiter: str | None = None) -> list[str]:
    """The column names of a CSV file's header or a Parquet file's schema.

    Raises:
        DataError: missing, empty or unreadable file.
    """
    p = Path(path)
    _exists(p)
    fmt = file_format(p)
    sep = csv_delimiter(p, delimiter)
    try:
        if fmt == "parquet":
            return list(pq.ParquetFile(p).schema_arrow.names)
        return csv_header(p, sep)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        raise read_error(e, p, fmt, sep, lambda: csv_options(sep, {}, [""])) from None


def _exists(p: Path) -> None:
    if not p.is_file():
        raise DataError("file not found", file=str(p))
    if p.stat().st_size == 0:
        raise DataError("file is empty (expected a header and at least one row)", file=str(p))


def record_batches(
    path: str | os.PathLike[str],
    columns: Sequence[str],
    *,
    delimiter: str | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[pa.Table]:
    """The given columns of a CSV or Parquet file, a table of at most ``batch_rows`` at a time.

    Values are raw: CSV columns are text (an empty cell is null), Parquet columns keep their
    types; the :class:`~mtlrec.data.preprocess.Preprocessor` applies the run's rule for
    missing values (:mod:`mtlrec.data.columns`) to both alike.

    Raises:
        DataError: missing or empty file, missing column or one named twice in the header,
            unreadable content (naming the data row where pyarrow tells it).
    """
    p = Path(path)
    name = str(path)
    _exists(p)
    cols = list(dict.fromkeys(columns))
    fmt = file_format(p)
    sep = csv_delimiter(p, delimiter)
    types = {c: pa.string() for c in cols}
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(p)
            check_header(pf.schema_arrow.names, cols, file=name)
            for rb in pf.iter_batches(batch_size=batch_rows, columns=cols):
                yield pa.Table.from_batches([rb])
            return
        check_header(csv_header(p, sep), cols, file=name, delimiter=sep)
        options = csv_options(sep, types, [""])
        options["convert_options"].include_columns = cols
        reader = pacsv.open_csv(p, read_options=pacsv.ReadOptions(block_size=1 << 22), **options)
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
        raise read_error(e, p, fmt, sep, lambda: csv_options(sep, types, [""])) from None


def _split_group(
    schema: Schema, columns: set[str], split: tuple[tuple[float, ...], int] | None
) -> str | None:
    """The group column a split hashes, when the schema names one the file has."""
    g = schema.group_column
    return g if split is not None and g is not None and g in columns else None


def split_part(
    table: pa.Table,
    offset: int,
    split: tuple[tuple[float, ...], int],
    group: str | None = None,
) -> np.ndarray:
    """The part of each row of ``table`` (rows ``offset...`` of its file) in a hash split:
    by row number, or by the group id of ``group`` when given (a request's rows together;
    :func:`~mtlrec.data.split.split_keys`)."""
    rows = np.arange(offset, offset + table.num_rows, dtype=np.uint64)
    groups = group_ids(table.column(group)) if group is not None else None
    return hash_part(split_keys(rows, groups), split[0], split[1])


@mmap_large_blocks()
def fit_file(
    schema: Schema,
    path: str | os.PathLike[str],
    *,
    split: tuple[tuple[float, ...], int] | None = None,
    delimiter: str | None = None,
    batch_rows: int = BATCH_ROWS,
    null_values: Sequence[str] = DEFAULT_NULL_VALUES,
    min_task_rows: int = 1,
) -> Preprocessor:
    """Fit encoders on a file (on its training part when ``split = (fractions, seed)``), in
    one pass, and check the training rows (:class:`~mtlrec.data.preprocess.PreprocessorFitter`:
    a feature missing on every row, a task without enough valid rows... are errors).

    Args:
        schema: features and tasks.
        path: a CSV or Parquet file.
        split: ``(fractions, seed)`` of a hash split; part 0 is the training part.
        delimiter: CSV delimiter (default: by suffix).
        batch_rows: rows read at a time.
        null_values: null tokens, saved with the encoders (:mod:`mtlrec.data.columns`).
        min_task_rows: the fewest valid training rows a task may have (``data.min_task_rows``).
    """
    fitter = PreprocessorFitter(schema, null_values=null_values, min_task_rows=min_task_rows)
    have = set(file_columns(path, delimiter))
    # label and mask columns, when the file has them, for the checks of the tasks
    task_cols = [c for t in schema.tasks for c in (t.label_column, t.mask) if c is not None]
    cols = schema.input_columns() + [c for c in task_cols if c in have]
    group = _split_group(schema, have, split)
    if group is not None and group not in cols:
        cols.append(group)
    offset = 0
    for table in record_batches(path, cols, delimiter=delimiter, batch_rows=batch_rows):
        rows = None
        if split is not None:
            rows = split_part(table, offset, split, group) == 0
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
    if schema.bias_features:  # read when there (to train); a file to score may lack them
        have = set(file_columns(path, delimiter))
        optional = set(schema.input_columns()) - set(schema.scoring_columns())
        cols = [c for c in cols if c in have or c not in optional]
    group = schema.group_column
    if group is not None and group in file_columns(path, delimiter):
        if group not in cols:
            cols.append(group)
    else:
        group = None
    for table in record_batches(path, cols, delimiter=delimiter, batch_rows=batch_rows):
        parts = None
        if split is not None:
            parts = split_part(table, offset, split, group)
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
