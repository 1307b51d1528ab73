"""Fit encoders on the training split, save them with the model, encode any table once.

A :class:`Preprocessor` takes a pyarrow table, a pandas DataFrame or a dict of column arrays
(:func:`~mtlrec.data.columns.as_table`). It carries the run's null tokens
(``data.null_values``) in its saved JSON and applies them to every column it reads, so every
consumer of a run (file readers, ``predict``, an exported model, the service) reads a raw value
alike (:mod:`mtlrec.data.columns`). Fitting checks the training rows
(:mod:`mtlrec.data.quality`).

Example:
    >>> import pyarrow as pa
    >>> from mtlrec.schema import Schema, SparseFeature, DenseFeature, TaskSpec
    >>> schema = Schema(features=[SparseFeature(name="item"), DenseFeature(name="price")],
    ...                 tasks=[TaskSpec(name="click", kind="binary")])
    >>> t = pa.table({"item": ["a", "b", "a"], "price": [1.0, 2.0, None], "click": [1, 0, 1]})
    >>> pre = Preprocessor.fit(schema, t)
    >>> ds = pre.encode(t)
    >>> ds.sparse.tolist(), ds.dense.tolist()
    ([[2], [3], [2]], [[1.0], [2.0], [0.0]])
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mtlrec.data.bias_columns import with_bias_columns
from mtlrec.data.columns import (
    DEFAULT_NULL_VALUES,
    as_table,
    combine,
    group_ids,
    null_applied,
    null_tokens,
    sequence_values,
    to_category_strings,
    to_list,
)
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.encoders import CategoricalEncoder, DenseEncoder, sequence_ids
from mtlrec.data.io import require_columns
from mtlrec.data.quality import TrainingChecks
from mtlrec.data.targets import encode_targets
from mtlrec.errors import CheckpointError, rows_offset
from mtlrec.schema import Schema, SequenceFeature

FORMAT_VERSION = 1
TableLike = Any
"""A pyarrow Table, a pandas DataFrame or a mapping of column name to array-like."""


class Preprocessor:
    """The schema plus its fitted encoders: raw table in, :class:`ColumnarDataset` out."""

    def __init__(
        self,
        schema: Schema,
        tables: dict[str, CategoricalEncoder],
        dense: dict[str, DenseEncoder],
        *,
        null_values: Iterable[str] = DEFAULT_NULL_VALUES,
    ) -> None:
        self.schema = schema
        self.tables = tables
        self.dense = dense
        self.null_values = null_tokens(null_values)

    # -- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        schema: Schema,
        table: TableLike,
        *,
        file: str = "<table>",
        null_values: Iterable[str] = DEFAULT_NULL_VALUES,
        min_task_rows: int = 1,
    ) -> Preprocessor:
        """Fit every encoder on ``table`` (the training split) and check its rows.

        Args:
            schema: features and tasks.
            table: a pyarrow table, a pandas DataFrame or a dict of column arrays.
            file: name used in messages.
            null_values: strings read as missing values (:mod:`mtlrec.data.columns`).
            min_task_rows: the fewest valid training rows a task may have.

        Raises:
            DataError: a column is missing or a value does not fit the schema, or the rows
                cannot train the schema (:mod:`mtlrec.data.quality`).
        """
        fitter = PreprocessorFitter(schema, null_values=null_values, min_task_rows=min_task_rows)
        return fitter.update(table, file=file).finish()

    def raw_columns(self, table: pa.Table, columns: Iterable[str]) -> pa.Table:
        """``table`` with this run's missing-value rule applied to ``columns``."""
        return null_applied(table, columns, self.null_values)

    def table_sizes(self) -> dict[str, int]:
        """Embedding table name -> number of rows (padding and OOV included)."""
        return {k: v.size for k, v in self.tables.items()}

    # -- encoding --------------------------------------------------------------------------
    def encode(
        self,
        table: TableLike,
        *,
        file: str = "<table>",
        targets: bool | None = None,
        row_offset: int = 0,
        rows: np.ndarray | None = None,
    ) -> ColumnarDataset:
        """Encode a raw table.

        Args:
            table: raw columns: a pyarrow table, a pandas DataFrame or a dict of arrays.
            file: name used in error messages.
            targets: encode labels/masks/weights; ``None`` means "if the label columns exist".
            row_offset: rows of the file before this table (error messages count from the
                file's first row).
            rows: when the table is a selection of a file's rows, the 0-based file row of each
                (for messages; replaces ``row_offset``).

        Raises:
            DataError: a column is missing or a value does not fit the schema.
        """
        return self.encode_parts(
            table, file=file, targets=targets, row_offset=row_offset, rows=rows
        )[0]

    def encode_parts(
        self,
        table: TableLike,
        *,
        parts: np.ndarray | None = None,
        num_parts: int = 1,
        file: str = "<table>",
        targets: bool | None = None,
        row_offset: int = 0,
        rows: np.ndarray | None = None,
    ) -> list[ColumnarDataset]:
        """Encode a raw table and cut it into parts (``parts[i]`` is row i's part); every value
        is checked in file order, so an error names the file's row; unknown categories are
        counted per part."""
        s = self.schema
        table = with_bias_columns(as_table(table), s)  # not needed to score: missing if absent
        require_columns(table, s.input_columns(), file=file, role="feature")
        if targets is None:
            targets = all(t.label_column in table.column_names for t in s.tasks)
        if targets:
            require_columns(table, s.target_columns(), file=file, role="label/mask/weight")
        used = s.input_columns() + (s.target_columns() if targets else [])
        table = self.raw_columns(table, [*used, s.group_column or ""])
        n = table.num_rows
        if parts is None:
            parts = np.zeros(n, dtype=np.int64)
        unknown: dict[str, np.ndarray] = {}  # feature -> unknown values per row
        with rows_offset(row_offset, rows):
            sparse = np.zeros((n, len(s.sparse)), dtype=np.int32)
            for j, f in enumerate(s.sparse):
                col = table.column(f.source)
                sparse[:, j], unknown[f.name] = self.tables[f.table_name].lookup_column(
                    col, file=file, column=f.source
                )
            dense = np.zeros((n, len(s.dense)), dtype=np.float32)
            for j, fd in enumerate(s.dense):
                dense[:, j] = self.dense[fd.name].encode(
                    table.column(fd.source), file=file, name=fd.source
                )
            seqs: dict[str, np.ndarray] = {}
            for fs in s.sequences:
                seqs[fs.name], unknown[fs.name] = sequence_ids(
                    self.tables[fs.table_name],
                    fs,
                    table.column(fs.source),
                    self.null_values,
                    file=file,
                )
            tgt = encode_targets(table, s, file) if targets else None
        groups = None
        if s.group_column is not None and s.group_column in table.column_names:
            groups = group_ids(table.column(s.group_column))
        out = []
        for k in range(num_parts):
            rows = np.flatnonzero(parts == k) if num_parts > 1 else slice(None)
            out.append(
                ColumnarDataset(
                    s,
                    torch.from_numpy(np.ascontiguousarray(sparse[rows])),
                    torch.from_numpy(np.ascontiguousarray(dense[rows])),
                    {k2: torch.from_numpy(np.ascontiguousarray(v[rows])) for k2, v in seqs.items()},
                    *(
                        (None, None, None)
                        if tgt is None
                        else (torch.from_numpy(np.ascontiguousarray(a[rows])) for a in tgt)
                    ),
                    None if groups is None else torch.from_numpy(np.array(groups[rows])),
                    source=file,
                    unknown_counts={f: int(np.sum(u[rows])) for f, u in unknown.items()},
                )
            )
        return out

    # -- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "schema_fingerprint": self.schema.fingerprint(),
            "null_values": list(self.null_values),
            "tables": {k: v.to_dict() for k, v in self.tables.items()},
            "dense": {k: v.to_dict() for k, v in self.dense.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(
        cls, schema: Schema, d: dict[str, Any], *, source: str = "encoders"
    ) -> Preprocessor:
        if d.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: encoders format {d.get('format_version')!r} is not "
                f"{FORMAT_VERSION} (written by another mtlrec version)"
            )
        if d.get("schema_fingerprint") != schema.fingerprint():
            raise CheckpointError(f"{source}: encoders were fitted for another schema")
        want_tables = set(schema.tables())
        if set(d["tables"]) != want_tables or set(d["dense"]) != {f.name for f in schema.dense}:
            raise CheckpointError(f"{source}: encoders do not match the schema's features")
        # encoders saved before the tokens were saved: the CSV reader's tokens of that time
        tokens = d.get("null_values", list(DEFAULT_NULL_VALUES))
        if not isinstance(tokens, list) or not all(isinstance(v, str) for v in tokens):
            raise CheckpointError(f"{source}: 'null_values' must be a list of strings")
        return cls(
            schema,
            {k: CategoricalEncoder.from_dict(v) for k, v in d["tables"].items()},
            {k: DenseEncoder.from_dict(v) for k, v in d["dense"].items()},
            null_values=tokens,
        )

    @classmethod
    def from_json(cls, schema: Schema, text: str, *, source: str = "encoders") -> Preprocessor:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{source}: not valid JSON ({e.msg})") from None
        return cls.from_dict(schema, d, source=source)


class PreprocessorFitter:
    """Fits a :class:`Preprocessor` chunk by chunk (a file read in record batches).

    Every value of a chunk is checked (errors name the file's row); only the rows selected by
    ``rows`` (the training split) are counted, and checked by :class:`~mtlrec.data.quality.
    TrainingChecks` when :meth:`finish` is called.

    Args:
        schema: features and tasks.
        null_values: strings read as missing values, saved with the encoders.
        min_task_rows: the fewest valid training rows a task may have.
    """

    def __init__(
        self,
        schema: Schema,
        *,
        null_values: Iterable[str] = DEFAULT_NULL_VALUES,
        min_task_rows: int = 1,
    ) -> None:
        self.schema = schema
        self.null_values = null_tokens(null_values)
        self.tables: dict[str, CategoricalEncoder] = {}
        for name, feats in schema.tables().items():
            f0 = feats[0]
            self.tables[name] = CategoricalEncoder(
                min_count=f0.min_count,
                max_size=f0.max_size,
                hash_buckets=f0.hash_buckets,
                vocab_size=f0.vocab_size,
            )
        self.dense = {f.name: DenseEncoder.for_feature(f) for f in schema.dense}
        self.checks = TrainingChecks(schema, min_task_rows=min_task_rows)
        self.rows_seen = 0

    def update(
        self,
        table: TableLike,
        *,
        file: str = "<table>",
        row_offset: int = 0,
        rows: np.ndarray | None = None,
    ) -> PreprocessorFitter:
        """Count one chunk; ``rows`` (bool, per row) selects the rows to learn from. Label and
        mask columns, when the chunk has them, are validated and counted for the checks."""
        s = self.schema
        table = as_table(table)
        require_columns(table, s.input_columns(), file=file, role="feature")
        task_cols = [c for t in s.tasks for c in (t.label_column, t.mask) if c is not None]
        table = null_applied(table, s.input_columns() + task_cols, self.null_values)
        sel = None if rows is None else pa.array(rows)
        checks = self.checks
        if self.rows_seen == 0:
            checks.file = file
        with rows_offset(row_offset):
            for name, feats in s.tables().items():
                arrays = []
                for f in feats:
                    col = combine(table.column(f.source))
                    if sel is not None:
                        col = col.filter(sel)
                    if isinstance(f, SequenceFeature):
                        col, parent = sequence_values(to_list(col, f.separator), self.null_values)
                        parents = parent.to_numpy(zero_copy_only=False)
                        checks.sequence(f.name, int(np.count_nonzero(np.bincount(parents))))
                        arrays.append(to_category_strings(col))
                    else:
                        strings = to_category_strings(col)
                        # integers compare faster than their text (same answer)
                        checks.categorical(
                            f.name, col if pa.types.is_integer(col.type) else strings
                        )
                        arrays.append(strings)
                self.tables[name].partial_fit(arrays)
            for fd in s.dense:
                self.dense[fd.name].partial_fit(
                    table.column(fd.source), file=file, name=fd.source, rows=rows
                )
            checks.tasks(table, rows, file)
        n = table.num_rows if rows is None else int(np.count_nonzero(rows))
        self.rows_seen += n
        checks.rows += n
        return self

    def finish(self) -> Preprocessor:
        """The fitted preprocessor (vocabularies and statistics from the rows seen).

        Raises:
            DataError: the training rows cannot train the schema (:mod:`mtlrec.data.quality`).
        """
        self.checks.finish(self.dense)
        tables = {k: v.finalize() for k, v in self.tables.items()}
        dense = {k: v.finalize() for k, v in self.dense.items()}
        return Preprocessor(self.schema, tables, dense, null_values=self.null_values)
