"""A tiny schema, table, data set and model for mtlrec's tests and users' own tests.

Example:
    >>> from mtlrec.testing import tiny_dataset
    >>> pre, ds = tiny_dataset(n=50)
    >>> len(ds), sorted(ds.schema.task_names)
    (50, ['click', 'watch'])
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.preprocess import Preprocessor
from mtlrec.schema import DenseFeature, Schema, SequenceFeature, SparseFeature, TaskSpec


def tiny_schema(*, sequences: bool = True, dim: int = 4) -> Schema:
    """Two sparse features (``item`` shares its table with the ``hist`` sequence), one dense
    feature, a binary task ``click`` and a regression task ``watch`` on clicked rows only."""
    feats: list = [
        SparseFeature(name="user", embedding_dim=dim),
        SparseFeature(name="item", embedding_dim=dim, table="item"),
        DenseFeature(name="price", transform="log1p_standardize"),
    ]
    if sequences:
        feats.append(SequenceFeature(name="hist", embedding_dim=dim, table="item", max_len=5))
    return Schema(
        features=tuple(feats),
        tasks=(
            TaskSpec(name="click", kind="binary"),
            TaskSpec(name="watch", kind="regression", mask="click"),
        ),
    )


def tiny_table(n: int = 200, *, seed: int = 0, sequences: bool = True) -> pa.Table:
    """Random rows for :func:`tiny_schema` with learnable labels."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 20, n)
    item = rng.integers(0, 30, n)
    price = rng.lognormal(0.0, 1.0, n)
    logit = (item % 3 == 0) * 2.0 - 1.0 + 0.3 * np.log1p(price) + rng.normal(0, 0.5, n)
    click = (logit > 0).astype(np.int64)
    watch = np.where(click == 1, 0.5 + 0.1 * (user % 5) + rng.normal(0, 0.05, n), np.nan)
    cols: dict = {
        "user": pa.array([f"u{u}" for u in user]),
        "item": pa.array([f"i{i}" for i in item]),
        "price": pa.array(price),
        "click": pa.array(click),
        "watch": pa.array(watch),
    }
    if sequences:
        lens = rng.integers(0, 7, n)
        cols["hist"] = pa.array(["|".join(f"i{j}" for j in rng.integers(0, 30, k)) for k in lens])
    return pa.table(cols)


def tiny_dataset(
    n: int = 200, *, seed: int = 0, sequences: bool = True
) -> tuple[Preprocessor, ColumnarDataset]:
    """Fitted preprocessor and encoded data set of :func:`tiny_table`."""
    schema = tiny_schema(sequences=sequences)
    table = tiny_table(n, seed=seed, sequences=sequences)
    pre = Preprocessor.fit(schema, table)
    return pre, pre.encode(table)


def tiny_funnel_schema(dim: int = 4) -> Schema:
    """An impression -> click -> conversion funnel for ESMM-style models: ``ctr`` (label
    ``click``), ``cvr`` (label ``buy``, clicked rows only) and ``ctcvr`` (label ``buy``), with
    the features of :func:`tiny_schema` (including the ``hist`` sequence)."""
    base = tiny_schema(dim=dim)
    return Schema(
        features=base.features,
        tasks=(
            TaskSpec(name="ctr", kind="binary", label="click"),
            TaskSpec(name="cvr", kind="binary", label="buy", mask="click"),
            TaskSpec(name="ctcvr", kind="binary", label="buy"),
        ),
    )


def tiny_funnel_dataset(n: int = 200, *, seed: int = 0) -> tuple[Preprocessor, ColumnarDataset]:
    """Fitted preprocessor and encoded rows of :func:`tiny_funnel_schema`; ``buy`` is 1 only
    on clicked rows."""
    table = tiny_table(n, seed=seed)
    rng = np.random.default_rng(seed + 1)
    click = table.column("click").to_numpy()
    user = np.array([int(u[1:]) for u in table.column("user").to_pylist()])
    buy = click * ((user % 2 == 0) | (rng.random(n) < 0.2)).astype(np.int64)
    table = table.append_column("buy", pa.array(buy))
    schema = tiny_funnel_schema()
    pre = Preprocessor.fit(schema, table)
    return pre, pre.encode(table)


def tiny_bias_schema(dim: int = 4) -> Schema:
    """:func:`tiny_schema` plus two selection-bias features (``pos``, a pre-indexed position
    in ``[0, 5)``; ``dev``, an untransformed number; both ``role: bias``) and an auxiliary
    binary task ``domain`` (label ``domain``), for the bias tower and auxiliary-task options."""
    base = tiny_schema(dim=dim)
    return Schema(
        features=(
            *base.features,
            SparseFeature(name="pos", embedding_dim=2, vocab_size=5, role="bias"),
            DenseFeature(name="dev", role="bias"),
        ),
        tasks=(*base.tasks, TaskSpec(name="domain", kind="binary", auxiliary=True)),
    )


def tiny_bias_table(n: int = 200, *, seed: int = 0) -> pa.Table:
    """:func:`tiny_table` rows with ``pos``, ``dev`` and ``domain`` columns (clicks are not
    redrawn: the columns only have to be there)."""
    table = tiny_table(n, seed=seed)
    rng = np.random.default_rng(seed + 2)
    table = table.append_column("pos", pa.array(rng.integers(0, 5, n)))
    table = table.append_column("dev", pa.array(rng.integers(0, 2, n).astype(np.float64)))
    return table.append_column("domain", pa.array(rng.integers(0, 2, n)))


def tiny_bias_dataset(n: int = 200, *, seed: int = 0) -> tuple[Preprocessor, ColumnarDataset]:
    """Fitted preprocessor and encoded rows of :func:`tiny_bias_schema`."""
    table = tiny_bias_table(n, seed=seed)
    pre = Preprocessor.fit(tiny_bias_schema(), table)
    return pre, pre.encode(table)
