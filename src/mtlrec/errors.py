"""Errors that reach users as one clear line.

Every error raised for bad input is an :class:`MtlrecError`. The CLI prints ``error: <message>``
and exits with status 2; Python users catch the class. Messages name the file, column and row
wherever one is known, and say what was expected. A row of a file is shown as ``data row N``:
the N-th row after the header (1-based), the same count for CSV and Parquet (a CSV row may span
several lines when a quoted value holds a line break, so line numbers are not used).

Data that can be used but is probably not what was meant (a constant label, a task without
validation rows...) gives a :class:`DataWarning` through :mod:`warnings`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


class MtlrecError(Exception):
    """Base class of every error mtlrec raises on purpose."""


class DataError(MtlrecError):
    """A data file does not match the schema.

    Args:
        message: what was wrong and what was expected.
        file: the file being read, if known.
        column: the column, if known.
        row: 1-based data row (header excluded), if known; shown as ``data row N`` when
            ``file`` is known, else as ``row N`` (a row of an array or request).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        column: str | None = None,
        row: int | None = None,
    ) -> None:
        self.file = file
        self.column = column
        self.row = row
        self.detail = message
        where = []
        if file is not None:
            where.append(f"file {file}")
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"data row {row}" if file is not None else f"row {row}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class DataWarning(UserWarning):
    """Data that trains, but probably not as meant (shown by the CLI on stderr)."""


@contextlib.contextmanager
def rows_offset(offset: int = 0, rows: np.ndarray | None = None) -> Iterator[None]:
    """Re-raise a :class:`DataError` of a chunk with its row counted from the file's start.

    Args:
        offset: data rows of the file before the chunk's first row.
        rows: when the chunk is a selection of the file's rows, the 0-based file row of each
            of its rows (``offset`` is then ignored).
    """
    try:
        yield
    except DataError as e:
        if e.row is None or (rows is None and not offset):
            raise
        row = int(rows[e.row - 1]) + 1 if rows is not None else e.row + offset
        raise DataError(e.detail, file=e.file, column=e.column, row=row) from None


class ConfigError(MtlrecError):
    """A configuration (YAML, --set override or Python object) is invalid."""


class CheckpointError(MtlrecError):
    """A checkpoint or run directory cannot be used (missing, corrupt, another schema)."""


class TrainingError(MtlrecError):
    """Training cannot go on (for example a non-finite loss)."""
