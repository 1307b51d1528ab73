"""The rule for raw values, and the column conversions shared by the encoders.

This module is the one place that says what a raw value means, for every path a row can take
(CSV and Parquet files, Python tables, ``predict``, an exported model, the scoring service):

* **Missing**: a real null (Parquet / Arrow null, JSON ``null``, an empty CSV cell), an empty
  string, a float NaN, and any string equal to one of the run's *null tokens*
  (``data.null_values``, default :data:`DEFAULT_NULL_VALUES`; exact, case-sensitive match of the
  whole value, or of one element of a sequence). Readers keep the text as it is; the
  :class:`~mtlrec.data.preprocess.Preprocessor`, which carries the tokens in the run's
  ``encoders.json``, applies them (:func:`to_missing`), so a file read as CSV or Parquet and a
  request scored by the service see the same values.
* **Numbers** (:func:`to_float`): numeric types as they are; text is trimmed and parsed.
* **Categories** (:func:`to_category_strings` / :func:`to_category_ints`): integers and integral
  floats by their integer text (``66.0`` and ``"66"`` are one value); other values by their text.
* **Sequences** (:func:`to_list`): a Parquet list as it is; text split on the feature's
  separator; empty elements are dropped.

Everything here is vectorised; the only per-row Python runs on the error path, to find the
first offending row for the message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtlrec.errors import DataError

DEFAULT_NULL_VALUES: tuple[str, ...] = ("NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?")
"""Strings read as a missing value in every column unless ``data.null_values`` says otherwise
(besides empty strings and real nulls, which are always missing)."""


def null_tokens(values: Iterable[str] | None) -> tuple[str, ...]:
    """The null tokens as a tuple of distinct strings (``None``: the default)."""
    if values is None:
        return DEFAULT_NULL_VALUES
    out = tuple(dict.fromkeys(values))
    bad = [v for v in out if not isinstance(v, str)]
    if bad:
        raise TypeError(f"null tokens must be strings, got {bad!r}")
    return out


def to_missing(array: pa.Array | pa.ChunkedArray, null_values: Iterable[str]) -> pa.Array:
    """``array`` with every missing value (see the module notes) as a null.

    Strings equal to a token or empty become null, float NaN becomes null; other values and
    types are returned unchanged (a list column is left to :func:`sequence_values`).
    """
    arr = _decoded(array)
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        miss = pc.equal(pc.binary_length(arr), 0)
        tokens = list(null_values)
        if tokens:
            miss = pc.or_(miss, pc.is_in(arr, value_set=pa.array(tokens, t)))
        if not pc.any(miss).as_py():
            return arr
        return pc.if_else(miss, pa.scalar(None, t), arr)
    if pa.types.is_floating(t):
        nan = pc.is_nan(arr)
        if not pc.any(nan).as_py():
            return arr
        return pc.if_else(nan, pa.scalar(None, t), arr)
    return arr


def sequence_values(lists: pa.Array, null_values: Iterable[str]) -> tuple[pa.Array, pa.Array]:
    """The elements of a list column, in row order, and the row of each: missing elements
    (null, empty, NaN, a null token) are dropped."""
    values = to_missing(pc.list_flatten(lists), null_values)
    parent = pc.list_parent_indices(lists)
    if values.null_count:
        keep = pc.is_valid(values)
        values, parent = pc.filter(values, keep), pc.filter(parent, keep)
    return values, parent


def null_applied(table: pa.Table, columns: Iterable[str], null_values: Sequence[str]) -> pa.Table:
    """``table`` with the missing-value rule applied to the given columns (the others, and
    columns it lacks, as they are)."""
    for c in dict.fromkeys(columns):
        i = table.schema.get_field_index(c)
        if i >= 0:
            table = table.set_column(i, c, to_missing(table.column(i), null_values))
    return table


def as_table(data: Any) -> pa.Table:
    """A pyarrow table from a pyarrow table or record batch, a pandas DataFrame (or any object
    with the Arrow stream interface, e.g. polars), or a mapping of column name to array-like
    (numpy arrays, lists).

    pandas is not a dependency: a DataFrame converts itself.

    Raises:
        TypeError: anything else.
    """
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if type(data).__module__.split(".")[0] == "pandas" and hasattr(data, "columns"):
        return pa.Table.from_pandas(data, preserve_index=False)
    if hasattr(data, "__arrow_c_stream__"):
        return pa.table(data)
    if isinstance(data, Mapping):
        cols: dict[str, pa.Array | pa.ChunkedArray] = {}
        for k, v in data.items():
            if isinstance(v, pa.Array | pa.ChunkedArray):
                cols[str(k)] = v
            elif isinstance(v, np.ndarray) and v.ndim != 1:
                raise TypeError(f"column {k!r}: expected a 1-d array, got shape {v.shape}")
            else:
                cols[str(k)] = pa.array(v)
        lengths = {len(c) for c in cols.values()}
        if len(lengths) > 1:
            raise TypeError(f"columns differ in length: { {k: len(c) for k, c in cols.items()} }")
        return pa.table(cols)
    raise TypeError(
        "expected a pyarrow Table, a pandas DataFrame or a dict of column arrays, "
        f"got {type(data).__name__}"
    )


def combine(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(array, pa.ChunkedArray):
        return array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    return array


def first_row(bad: np.ndarray) -> int:
    """1-based number of the first true entry of a boolean row mask."""
    return int(np.flatnonzero(bad)[0]) + 1


def to_float(array: pa.Array | pa.ChunkedArray, *, file: str, column: str) -> np.ndarray:
    """Numbers as float64, NaN where the value is missing.

    Raises:
        DataError: a value is not a number (naming the first such row), or the column has a
            type that cannot hold numbers.
    """
    arr = combine(array)
    t = arr.type
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t):
        out = pc.cast(arr, pa.float64())
    elif pa.types.is_null(t):
        return np.full(len(arr), np.nan)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        trimmed = pc.utf8_trim_whitespace(arr)
        blank = pc.equal(pc.utf8_length(trimmed), 0)
        trimmed = pc.if_else(blank, pa.scalar(None, pa.string()), trimmed)  # blank = missing
        try:
            out = pc.cast(trimmed, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = trimmed.to_pylist()
            for i, v in enumerate(values):
                if v is None or v == "":
                    continue
                try:
                    float(v)
                except ValueError:
                    raise DataError(
                        f"expected a number, found {v!r}", file=file, column=column, row=i + 1
                    ) from None
            raise DataError("expected numbers", file=file, column=column) from None
    else:
        raise DataError(f"expected numbers, found values of type {t}", file=file, column=column)
    return out.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _decoded(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    arr = combine(array)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    return arr


def _integral_floats_as_ints(arr: pa.Array) -> pa.Array | None:
    """A float column whose values are all integers a float holds exactly, as int64."""
    valid = pc.drop_null(arr)
    finite = pc.is_finite(valid)
    if len(valid) and pc.all(finite).as_py():
        integral = pc.all(pc.equal(valid, pc.floor(valid))).as_py()
        exact = pc.max(pc.abs(valid)).as_py() < 2.0**53  # integers a float holds exactly
        if integral and exact:
            return pc.cast(arr, pa.int64())
    return None


def to_category_ints(array: pa.Array | pa.ChunkedArray) -> pa.Array | None:
    """Categorical values as int64 when they are integers (nulls kept), else ``None``.

    An integer column, or a float column of integral values, whose string forms are what
    :func:`to_category_strings` gives: the two agree on every value, so an integer lookup
    (no string conversion) finds exactly the ids the string lookup would.
    """
    arr = _decoded(array)
    t = arr.type
    if pa.types.is_signed_integer(t):
        return arr if t == pa.int64() else pc.cast(arr, pa.int64())
    if pa.types.is_unsigned_integer(t):
        if t == pa.uint64() and len(arr) and (pc.max(arr).as_py() or 0) >= 2**63:
            return None
        return pc.cast(arr, pa.int64())
    if pa.types.is_floating(t):
        return _integral_floats_as_ints(arr)
    return None


def to_category_strings(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Categorical values as strings (nulls kept); integral floats print as integers."""
    arr = _decoded(array)
    t = arr.type
    if pa.types.is_string(t):
        return arr
    if pa.types.is_large_string(t):
        return arr.cast(pa.string())
    if pa.types.is_floating(t):
        ints = _integral_floats_as_ints(arr)
        if ints is not None:
            arr = ints
    try:
        return pc.cast(arr, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([None if v is None else str(v) for v in arr.to_pylist()], pa.string())


def to_list(array: pa.Array | pa.ChunkedArray, separator: str) -> pa.Array:
    """A list column (Parquet) as is; a string column split on ``separator`` (CSV); empty
    text is an empty row."""
    arr = combine(array)
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return arr
    strings = to_category_strings(arr)
    strings = pc.if_else(
        pc.equal(pc.utf8_length(strings), 0), pa.scalar(None, pa.string()), strings
    )
    return pc.split_pattern(strings, pattern=separator)


def group_ids(column: pa.Array) -> np.ndarray:
    """Stable int64 ids of a group (user / request) column: integers as they are, other values
    by a hash of their text, so ids agree across files and chunks."""
    arr = combine(column)
    if pa.types.is_integer(arr.type):
        return pc.fill_null(pc.cast(arr, pa.int64()), -1).to_numpy(zero_copy_only=False)
    enc = pc.dictionary_encode(to_category_strings(arr))
    uniques = enc.dictionary.to_pylist()
    lut = np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(v.encode(), digest_size=8).digest(), "little", signed=True
            )
            for v in uniques
        ),
        dtype=np.int64,
        count=len(uniques),
    )
    lut = np.append(lut, -1)
    return lut[enc.indices.fill_null(len(uniques)).to_numpy(zero_copy_only=False)]
