"""Errors that reach users as one clear line.

Every error raised for bad input is an :class:`MtlrecError`. The CLI prints ``error: <message>``
and exits with status 2; Python users catch the class. Messages name the file, column and row
(1-based data row, header excluded) wherever one is known, and say what was expected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class MtlrecError(Exception):
    """Base class of every error mtlrec raises on purpose."""


class DataError(MtlrecError):
    """A data file does not match the schema.

    Args:
        message: what was wrong and what was expected.
        file: the file being read, if known.
        column: the column, if known.
        row: 1-based data row (header excluded), if known.
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
            where.append(f"row {row}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


@contextlib.contextmanager
def rows_offset(offset: int) -> Iterator[None]:
    """Re-raise a :class:`DataError` of a chunk with its row counted from the file's start."""
    try:
        yield
    except DataError as e:
        if offset and e.row is not None:
            raise DataError(e.detail, file=e.file, column=e.column, row=e.row + offset) from None
        raise


class ConfigError(MtlrecError):
    """A configuration (YAML, --set override or Python object) is invalid."""


class CheckpointError(MtlrecError):
    """A checkpoint or run directory cannot be used (missing, corrupt, another schema)."""


class TrainingError(MtlrecError):
    """Training cannot go on (for example a non-finite loss)."""
