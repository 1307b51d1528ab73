"""Fit encoders on the training split, save them with the model, encode any table once.

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

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mtlrec.data.columns import combine, to_category_strings, to_list
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.encoders import CategoricalEncoder, DenseEncoder, sequence_ids
from mtlrec.data.io import require_columns
from mtlrec.data.targets import encode_targets
from mtlrec.errors import CheckpointError, rows_offset
from mtlrec.schema import Schema, SequenceFeature

FORMAT_VERSION = 1


class Preprocessor:
    """The schema plus its fitted encoders: raw table in, :class:`ColumnarDataset` out."""

    def __init__(
        self,
        schema: Schema,
        tables: dict[str, CategoricalEncoder],
        dense: dict[str, DenseEncoder],
    ) -> None:
        self.schema = schema
        self.tables = tables
        self.dense = dense

    # -- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, schema: Schema, table: pa.Table, *, file: str = "<table>") -> Preprocessor:
        """Fit every encoder on ``table`` (the training split)."""
        return PreprocessorFitter(schema).update(table, file=file).finish()

    def table_sizes(self) -> dict[str, int]:
        """Embedding table name -> number of rows (padding and OOV included)."""
        return {k: v.size for k, v in self.tables.items()}

    # -- encoding --------------------------------------------------------------------------
    def encode(
        self,
        table: pa.Table,
        *,
        file: str = "<table>",
        targets: bool | None = None,
        row_offset: int = 0,
    ) -> ColumnarDataset:
        """Encode a raw table.

        Args:
            table: raw columns.
            file: name used in error messages.
            targets: encode labels/masks/weights; ``None`` means "if the label columns exist".
            row_offset: rows of the file before this table (error messages count from the
                file's first row).

        Raises:
            DataError: a column is missing or a value does not fit the schema.
        """
        return self.encode_parts(table, file=file, targets=targets, row_offset=row_offset)[0]

    def encode_parts(
        self,
        table: pa.Table,
        *,
        parts: np.ndarray | None = None,
        num_parts: int = 1,
        file: str = "<table>",
        targets: bool | None = None,
        row_offset: int = 0,
    ) -> list[ColumnarDataset]:
        """Encode a raw table and cut it into parts (``parts[i]`` is row i's part); every value
        is checked in file order, so an error names the file's row; unknown categories are
        counted per part."""
        s = self.schema
        require_columns(table, s.input_columns(), file=file, role="feature")
        if targets is None:
            targets = all(t.label_column in table.column_names for t in s.tasks)
        if targets:
            require_columns(table, s.target_columns(), file=file, role="label/mask/weight")
        n = table.num_rows
        if parts is None:
            parts = np.zeros(n, dtype=np.int64)
        unknown: dict[str, np.ndarray] = {}  # feature -> unknown values per row
        with rows_offset(row_offset):
            sparse = np.zeros((n, len(s.sparse)), dtype=np.int32)
            for j, f in enumerate(s.sparse):
                col = table.column(f.source)
                sparse[:, j], unknown[f.name] = self.tables[f.table_name].lookup_column(col)
            dense = np.zeros((n, len(s.dense)), dtype=np.float32)
            for j, fd in enumerate(s.dense):
                dense[:, j] = self.dense[fd.name].encode(
                    table.column(fd.source), file=file, name=fd.source
                )
            seqs: dict[str, np.ndarray] = {}
            for fs in s.sequences:
                seqs[fs.name], unknown[fs.name] = sequence_ids(
                    self.tables[fs.table_name], fs, table.column(fs.source)
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
        return cls(
            schema,
            {k: CategoricalEncoder.from_dict(v) for k, v in d["tables"].items()},
            {k: DenseEncoder.from_dict(v) for k, v in d["dense"].items()},
        )

    @classmethod
    def from_json(cls, schema: Schema, text: str, *, source: str = "encoders") -> Preprocessor:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{source}: not valid JSON ({e.msg})") from None
        return cls.from_dict(schema, d, source=source)


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


class PreprocessorFitter:
    """Fits a :class:`Preprocessor` chunk by chunk (a file read in record batches).

    Every value of a chunk is checked (errors name the file's row); only the rows selected by
    ``rows`` (the training split) are counted.
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.tables: dict[str, CategoricalEncoder] = {}
        for name, feats in schema.tables().items():
            f0 = feats[0]
            self.tables[name] = CategoricalEncoder(
                min_count=f0.min_count, max_size=f0.max_size, hash_buckets=f0.hash_buckets
            )
        self.dense = {f.name: DenseEncoder.for_feature(f) for f in schema.dense}
        self.rows_seen = 0

    def update(
        self,
        table: pa.Table,
        *,
        file: str = "<table>",
        row_offset: int = 0,
        rows: np.ndarray | None = None,
    ) -> PreprocessorFitter:
        """Count one chunk; ``rows`` (bool, per row) selects the rows to learn from."""
        s = self.schema
        require_columns(table, s.input_columns(), file=file, role="feature")
        sel = None if rows is None else pa.array(rows)
        with rows_offset(row_offset):
            for name, feats in s.tables().items():
                arrays = []
                for f in feats:
                    col = combine(table.column(f.source))
                    if sel is not None:
                        col = col.filter(sel)
                    if isinstance(f, SequenceFeature):
                        col = pc.list_flatten(to_list(col, f.separator))
                    arrays.append(to_category_strings(col))
                self.tables[name].partial_fit(arrays)
            for fd in s.dense:
                self.dense[fd.name].partial_fit(
                    table.column(fd.source), file=file, name=fd.source, rows=rows
                )
        self.rows_seen += table.num_rows if rows is None else int(np.count_nonzero(rows))
        return self

    def finish(self) -> Preprocessor:
        """The fitted preprocessor (vocabularies and statistics from the rows seen)."""
        tables = {k: v.finalize() for k, v in self.tables.items()}
        dense = {k: v.finalize() for k, v in self.dense.items()}
        return Preprocessor(self.schema, tables, dense)
