"""Embedding tables that start from a file of vectors (``training.pretrained``).

The file is Parquet with an id column (the values as the feature holds them: item ids, words)
and a vector column (a fixed-size list of floats, or a list whose rows all have the table's
``embedding_dim`` values). Each id is looked up in the table's fitted vocabulary (or, for a
pre-indexed feature, used as its index) with the same vectorised lookup the data goes
through; the rows found take the vectors, every other row keeps its initialisation. Ids not
in the vocabulary (unknown, rare, or dropped by ``max_size``) are counted and reported, as are
repeated ids (the first vector wins) and missing ids. Hashed tables are refused: several
values share a bucket, so no row is one value's.

Only the model's own embedding tables take the vectors (the collections built on the model's
layout); the separate tables of an FM term or a wide part keep their initialisation.

Example:
    >>> import tempfile, pathlib
    >>> import numpy as np, pyarrow as pa, pyarrow.parquet as pq
    >>> from mtlrec.testing import tiny_dataset
    >>> from mtlrec.models import build_model
    >>> pre, ds = tiny_dataset(40)
    >>> model = build_model("mmoe", ds.schema, pre.table_sizes(), {"expert_hidden": [8]})
    >>> vecs = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(8, np.float32)), 4)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "v.parquet"
    >>> pq.write_table(pa.table({"id": ["u1", "nobody"], "vector": vecs}), path)
    >>> rep = load_pretrained(model, pre, "user", path)
    >>> rep["written"], rep["not_in_vocabulary"]
    (1, 1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mtlrec.batch import FIRST_ID
from mtlrec.data.columns import combine
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import ConfigError, DataError
from mtlrec.models.base import MultiTaskModel
from mtlrec.nn.embedding import EmbeddingCollection


def _vectors(path: Path, column: str, n: int) -> tuple[np.ndarray, int]:
    """The vector column as ``[n, dim]`` float32 and ``dim``."""
    table = pq.read_table(path, columns=[column])
    col = combine(table.column(column))
    if pa.types.is_fixed_size_list(col.type):
        dim = col.type.list_size
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        dims = np.unique(lengths[~np.isnan(lengths.astype(np.float64))])
        if len(dims) != 1:
            raise DataError(
                f"vectors of different lengths ({sorted(int(d) for d in dims)[:4]})",
                file=str(path),
                column=column,
            )
        dim = int(dims[0])
    else:
        raise DataError(
            f"expected a list of floats per row, found {col.type}", file=str(path), column=column
        )
    if col.null_count:
        raise DataError("a row has no vector (null)", file=str(path), column=column)
    flat = pc.list_flatten(col)
    if not (pa.types.is_floating(flat.type) or pa.types.is_integer(flat.type)):
        raise DataError(
            f"expected float values in the vectors, found {flat.type}",
            file=str(path),
            column=column,
        )
    values = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, dim)
    if not np.isfinite(values).all():
        raise DataError("the vectors hold NaN or infinite values", file=str(path), column=column)
    return values, dim


def model_collections(model: MultiTaskModel) -> list[EmbeddingCollection]:
    """The model's own embedding collections (built on its layout; not an FM's or a wide
    part's separate tables)."""
    own = model.layout
    return [m for m in model.modules() if isinstance(m, EmbeddingCollection) and m.layout is own]


@torch.no_grad()
def load_pretrained(
    model: MultiTaskModel,
    pre: Preprocessor,
    table: str,
    path: str | Path,
    *,
    id_column: str = "id",
    vector_column: str = "vector",
) -> dict[str, Any]:
    """Write the vectors of a Parquet file into the rows of one embedding table.

    Args:
        model: the model (its own tables take the vectors).
        pre: the run's encoders (the table's vocabulary).
        table: the embedding table (a feature's ``table``, by default its name).
        path: the Parquet file.
        id_column, vector_column: its columns.

    Returns:
        A report: ``vectors`` (rows of the file), ``written`` (table rows set),
        ``not_in_vocabulary``, ``missing_id``, ``repeated_id`` and ``rows_without_vector``
        (rows of the table's values that kept their initialisation).

    Raises:
        ConfigError: an unknown or hashed table, or vectors of another width.
        DataError: an unreadable file, missing column or bad vector.
    """
    p = Path(path)
    tables = pre.schema.tables()
    if table not in tables:
        raise ConfigError(
            f"training.pretrained: no embedding table {table!r} (tables: {sorted(tables)})"
        )
    enc = pre.tables[table]
    if enc.hash_buckets is not None:
        raise ConfigError(
            f"training.pretrained: table {table!r} is hashed (hash_buckets): a row is no "
            "single value's, so it cannot take a value's vector"
        )
    if not p.is_file():
        raise DataError("file not found", file=str(p))
    try:
        names = pq.ParquetFile(p).schema_arrow.names
        missing = [c for c in (id_column, vector_column) if c not in names]
        if missing:
            raise DataError(
                f"no column {missing[0]!r} (columns: {names[:8]})", file=str(p), column=None
            )
        ids = combine(pq.read_table(p, columns=[id_column]).column(id_column))
        values, dim = _vectors(p, vector_column, len(ids))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read the vectors ({e})", file=str(p)) from None
    want = tables[table][0].embedding_dim
    if dim != want:
        raise ConfigError(
            f"training.pretrained: {p} holds vectors of {dim} values; table {table!r} has "
            f"embedding_dim {want}"
        )
    rows, unknown = enc.lookup_column(pre.raw_columns(pa.table({"id": ids}), ["id"])["id"])
    found = rows >= FIRST_ID
    first = np.unique(rows[found], return_index=True)[1]
    at = np.flatnonzero(found)[first]  # first vector of every id found
    target = torch.from_numpy(rows[at].astype(np.int64))
    vecs = torch.from_numpy(values[at])
    for coll in model_collections(model):
        weight = coll.table_weight(table)  # a view of the fused weight: written in place
        weight[target] = vecs.to(weight.dtype)
    return {
        "table": table,
        "path": str(p),
        "vectors": len(ids),
        "written": len(at),
        "not_in_vocabulary": int(unknown.sum()),
        "missing_id": int(len(ids) - found.sum() - unknown.sum()),
        "repeated_id": int(found.sum() - len(at)),
        "rows_without_vector": int(enc.size - FIRST_ID - len(at)),
    }
