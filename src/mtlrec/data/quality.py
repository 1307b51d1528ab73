"""Checks of the training rows: data that would train a model on nothing, found in the fit pass.

:class:`TrainingChecks` keeps running statistics (row counts, the smallest and largest value)
that the :class:`~mtlrec.data.preprocess.PreprocessorFitter` updates chunk by chunk while it fits
the encoders, so a file larger than memory is checked in the same single pass, with a few
vectorised reductions per column.

Errors (:class:`~mtlrec.errors.DataError`, exit status 2 from the CLI):

* no training row at all (an empty training part of a split);
* a feature missing on every training row: a dense column empty or NaN, a categorical column
  null (or a null token), a sequence column empty -- the feature would be a constant;
* a task without any valid training row (its mask selects none): its head would be untrained
  and its metrics a number from nothing;
* a task with fewer valid training rows than ``min_task_rows`` (``data.min_task_rows``).

Warnings (:class:`~mtlrec.errors.DataWarning`):

* a label constant on the task's valid training rows (the head can only learn a constant);
* a feature with one value on every training row (it carries no information);
* a validation or test split where a task has no valid row (:func:`warn_empty_tasks`; its
  metrics are reported as n = 0 -- ``count`` -- with no value).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtlrec.data.targets import encode_label, encode_mask
from mtlrec.errors import DataError, DataWarning
from mtlrec.schema import DenseFeature, Schema, SequenceFeature

if TYPE_CHECKING:
    from mtlrec.data.dataset import ColumnarDataset
    from mtlrec.data.encoders import DenseEncoder


def _warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=3)


class TrainingChecks:
    """Running statistics of the training rows and the checks made on them.

    Args:
        schema: features and tasks.
        min_task_rows: the fewest valid training rows a task may have (at least 1 always).
    """

    def __init__(self, schema: Schema, *, min_task_rows: int = 1) -> None:
        self.schema = schema
        self.min_task_rows = max(1, int(min_task_rows))
        self.file = "<table>"
        self.rows = 0
        # feature -> [present rows, smallest value, largest value] (categorical features)
        self._features: dict[str, list[Any]] = {}
        # task -> [valid rows, smallest label, largest label]
        self._tasks: dict[str, list[float]] = {}

    def categorical(self, name: str, values: pa.Array) -> None:
        """One chunk of a categorical feature: its training rows' values (null: missing)."""
        st = self._features.setdefault(name, [0, None, None])
        present = len(values) - values.null_count
        if present:
            mm = pc.min_max(values)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            st[1] = lo if st[1] is None else min(st[1], lo)
            st[2] = hi if st[2] is None else max(st[2], hi)
        st[0] += present

    def sequence(self, name: str, rows_with_ids: int) -> None:
        """One chunk of a sequence feature: how many training rows hold at least one id."""
        self._features.setdefault(name, [0, None, None])[0] += rows_with_ids

    def tasks(self, table: pa.Table, rows: np.ndarray | None, file: str) -> None:
        """One chunk's labels and masks (every row is validated, the training ``rows``
        counted); tasks whose label or mask column the table lacks are not checked."""
        have = set(table.column_names)
        for t in self.schema.tasks:
            if t.label_column not in have or (t.mask is not None and t.mask not in have):
                continue
            m = encode_mask(table, t, file)
            y = encode_label(table, t, m, file)
            if rows is not None:
                m = m & rows
            st = self._tasks.setdefault(t.name, [0, np.inf, -np.inf])
            k = int(np.count_nonzero(m))
            if k:
                st[1] = min(st[1], float(y[m].min()))
                st[2] = max(st[2], float(y[m].max()))
            st[0] += k

    def finish(self, dense: Mapping[str, DenseEncoder]) -> None:
        """Raise the first error, then warn about the rest (see the module notes).

        Args:
            dense: the fitted dense encoders (their :attr:`seen` statistics).

        Raises:
            DataError: no training row, a feature missing on every one, or a task with fewer
                valid rows than allowed.
        """
        file, n = self.file, self.rows
        if n == 0:
            raise DataError(
                "no training rows (the training part of the split is empty): use a larger "
                "file or other split fractions",
                file=file,
            )
        const: list[str] = []
        for f in self.schema.features:
            if isinstance(f, DenseFeature):
                _, present, lo, hi = dense[f.name].seen
                if present == 0:
                    raise DataError(
                        f"dense feature {f.name!r} is empty or NaN on every training row "
                        f"({n} rows), so it would be a constant: fix the column, or remove "
                        "the feature from the schema",
                        file=file,
                        column=f.source,
                    )
                if lo == hi:
                    const.append(f"{f.name!r} (always {lo:g} after the fill)")
                continue
            present, lo, hi = self._features.get(f.name, [0, None, None])
            if isinstance(f, SequenceFeature):
                if present == 0:
                    raise DataError(
                        f"sequence feature {f.name!r} is empty on every training row ({n} "
                        f"rows; separator {f.separator!r}): fix the column or its separator, "
                        "or remove the feature from the schema",
                        file=file,
                        column=f.source,
                    )
                continue
            if present == 0:
                raise DataError(
                    f"categorical feature {f.name!r} is missing on every training row ({n} "
                    "rows; empty cells and the null tokens of data.null_values are missing), "
                    "so every row would get the OOV id: fix the column, or remove the feature "
                    "from the schema",
                    file=file,
                    column=f.source,
                )
            if present == n and lo == hi:
                const.append(f"{f.name!r} (always {lo!r})")
        for t in self.schema.tasks:
            if t.name not in self._tasks:
                continue
            k = self._tasks[t.name][0]
            where = f"its mask column {t.mask!r}" if t.mask else "its label column"
            if k == 0:
                raise DataError(
                    f"task {t.name!r} has no valid training row: {where} selects none of the "
                    f"{n} training rows; fix the mask, or leave the task out (the config's "
                    "`tasks:` list)",
                    file=file,
                    column=t.mask or t.label_column,
                )
            if k < self.min_task_rows:
                raise DataError(
                    f"task {t.name!r} has {k} valid training rows, fewer than "
                    f"data.min_task_rows = {self.min_task_rows}: add rows, check {where}, or "
                    "lower data.min_task_rows",
                    file=file,
                    column=t.mask or t.label_column,
                )
        for t in self.schema.tasks:
            if t.name not in self._tasks:
                continue
            k, lo_y, hi_y = self._tasks[t.name]
            if lo_y == hi_y:
                _warn(
                    f"file {file}: task {t.name!r}: every one of its {k} valid training rows "
                    f"has the label {lo_y:g} (column {t.label_column!r}), so its head can only "
                    "learn a constant and metrics such as AUC are undefined"
                )
        if const:
            _warn(
                f"file {file}: feature{'s' if len(const) > 1 else ''} with one value on every "
                f"training row, carrying no information: {', '.join(const)}"
            )


def warn_empty_tasks(ds: ColumnarDataset | None, split: str, name: str) -> None:
    """Warn about the tasks without any valid row in an encoded validation or test split."""
    if ds is None or ds.masks is None:
        return
    counts = ds.masks.sum(0).tolist()  # [T] valid rows per task
    empty = [t for t, c in zip(ds.schema.task_names, counts, strict=True) if c == 0]
    if empty:
        _warn(
            f"{split} data {name}: no valid row for task{'s' if len(empty) > 1 else ''} "
            f"{', '.join(map(repr, empty))} ({len(ds)} rows); its metrics are reported "
            "as n = 0, with no value"
        )
