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

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mtlrec.data.columns import combine, to_category_strings, to_list
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.encoders import CategoricalEncoder, DenseEncoder, encode_sequence
from mtlrec.data.io import require_columns
from mtlrec.data.targets import encode_targets
from mtlrec.errors import CheckpointError
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
        require_columns(table, schema.input_columns(), file=file, role="feature")
        tables: dict[str, CategoricalEncoder] = {}
        for name, feats in schema.tables().items():
            f0 = feats[0]
            enc = CategoricalEncoder(
                min_count=f0.min_count, max_size=f0.max_size, hash_buckets=f0.hash_buckets
            )
            arrays = []
            for f in feats:
                col = table.column(f.source)
                if isinstance(f, SequenceFeature):
                    arrays.append(to_category_strings(pc.list_flatten(to_list(col, f.separator))))
                else:
                    arrays.append(to_category_strings(col))
            tables[name] = enc.fit(arrays)
        dense = {
            f.name: DenseEncoder.for_feature(f).fit(
                table.column(f.source), file=file, name=f.source
            )
            for f in schema.dense
        }
        return cls(schema, tables, dense)

    def table_sizes(self) -> dict[str, int]:
        """Embedding table name -> number of rows (padding and OOV included)."""
        return {k: v.size for k, v in self.tables.items()}

    # -- encoding --------------------------------------------------------------------------
    def encode(
        self, table: pa.Table, *, file: str = "<table>", targets: bool | None = None
    ) -> ColumnarDataset:
        """Encode a raw table.

        Args:
            table: raw columns.
            file: name used in error messages.
            targets: encode labels/masks/weights; ``None`` means "if the label columns exist".

        Raises:
            DataError: a column is missing or a value does not fit the schema.
        """
        s = self.schema
        require_columns(table, s.input_columns(), file=file, role="feature")
        if targets is None:
            targets = all(t.label_column in table.column_names for t in s.tasks)
        if targets:
            require_columns(table, s.target_columns(), file=file, role="label/mask/weight")
        n = table.num_rows
        unknown: dict[str, int] = {}
        sparse = np.zeros((n, len(s.sparse)), dtype=np.int32)
        for j, f in enumerate(s.sparse):
            ids, unk = self.tables[f.table_name].encode(to_category_strings(table.column(f.source)))
            sparse[:, j] = ids
            unknown[f.name] = unk
        dense = np.zeros((n, len(s.dense)), dtype=np.float32)
        for j, fd in enumerate(s.dense):
            dense[:, j] = self.dense[fd.name].encode(
                table.column(fd.source), file=file, name=fd.source
            )
        seqs: dict[str, torch.Tensor] = {}
        for fs in s.sequences:
            ids2, unk = encode_sequence(self.tables[fs.table_name], fs, table.column(fs.source))
            seqs[fs.name] = torch.from_numpy(ids2)
            unknown[fs.name] = unk
        labels = masks = weights = None
        if targets:
            lab, msk, wts = encode_targets(table, s, file)
            labels, masks, weights = (torch.from_numpy(a) for a in (lab, msk, wts))
        groups = None
        if s.group_column is not None and s.group_column in table.column_names:
            enc = pc.dictionary_encode(combine(to_category_strings(table.column(s.group_column))))
            groups = torch.from_numpy(
                enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            )
        return ColumnarDataset(
            s,
            torch.from_numpy(sparse),
            torch.from_numpy(dense),
            seqs,
            labels,
            masks,
            weights,
            groups,
            source=file,
            unknown_counts=unknown,
        )

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
