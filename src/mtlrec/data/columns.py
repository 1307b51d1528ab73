"""Column conversions shared by the encoders: pyarrow arrays to numpy, with row-level errors.

Everything here is vectorised; the only per-row Python runs on the error path, to find the
first offending row for the message.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtlrec.errors import DataError


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
    """A list column (Parquet) as is; a string column split on ``separator`` (CSV)."""
    arr = combine(array)
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return arr
    strings = to_category_strings(arr)
    strings = pc.if_else(
        pc.equal(pc.utf8_length(strings), 0), pa.scalar(None, pa.string()), strings
    )
    return pc.split_pattern(strings, pattern=separator)
