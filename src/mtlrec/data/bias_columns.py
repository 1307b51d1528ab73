"""Selection-bias columns (schema ``role: bias``) are read to train, never needed to score: a
table without them is encoded as if their values were missing (OOV ids, the dense fill
value, empty sequences). The model never reads them outside training (``mtlrec.nn.bias``)."""

from __future__ import annotations

import pyarrow as pa

from mtlrec.schema import DenseFeature, Schema, SequenceFeature


def with_bias_columns(table: pa.Table, schema: Schema) -> pa.Table:
    """``table`` plus an all-null column for every bias feature column it lacks.

    Example:
        >>> from mtlrec.schema import Schema, SparseFeature, TaskSpec
        >>> s = Schema(features=[SparseFeature(name="item"),
        ...                      SparseFeature(name="pos", role="bias")],
        ...            tasks=[TaskSpec(name="click", kind="binary")])
        >>> with_bias_columns(pa.table({"item": ["a"]}), s).column_names
        ['item', 'pos']
    """
    have = set(table.column_names)
    for f in schema.bias_features:
        if f.source not in have:
            have.add(f.source)
            table = table.append_column(f.source, pa.nulls(table.num_rows, bias_column_type(f)))
    return table


def bias_column_type(feature: object) -> pa.DataType:
    """The type of a missing bias column: float64 (dense), string (sequence: one list per
    row as text), int64 (pre-indexed ids) or string (categories)."""
    if isinstance(feature, DenseFeature):
        return pa.float64()
    if isinstance(feature, SequenceFeature) or getattr(feature, "vocab_size", None) is None:
        return pa.string()
    return pa.int64()
