"""The data API (issue 13.5): Preprocessor.fit/encode take a pyarrow table, a pandas DataFrame or a
dict of arrays; pre-indexed categorical features (``vocab_size: N``) use their ids as they are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from mtlrec.batch import FIRST_ID, OOV_ID, PAD_ID
from mtlrec.config import ExperimentConfig
from mtlrec.data.columns import as_table
from mtlrec.data.encoders import CategoricalEncoder
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import ConfigError, DataError
from mtlrec.schema import DenseFeature, Schema, SequenceFeature, SparseFeature, TaskSpec
from mtlrec.testing import tiny_schema, tiny_table
from mtlrec.train.run import load_run, train_run


# -- table-like inputs ----------------------------------------------------------------------------
def _numpy_columns(t: pa.Table) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in t.column_names:
        values = t.column(c).to_pylist()
        if c in ("user", "item", "hist"):
            out[c] = np.array(values, dtype=object)
        else:
            out[c] = np.array([np.nan if v is None else v for v in values])
    return out


def test_fit_and_encode_take_a_dict_of_numpy_arrays() -> None:
    t = tiny_table(120)
    want_pre = Preprocessor.fit(tiny_schema(), t)
    want = want_pre.encode(t)
    cols = _numpy_columns(t)
    pre = Preprocessor.fit(tiny_schema(), cols)
    assert pre.to_dict() == want_pre.to_dict()
    got = pre.encode(cols)
    for a, b in ((got.sparse, want.sparse), (got.dense, want.dense), (got.labels, want.labels)):
        assert a is not None and b is not None and bool((a == b).all())
    assert bool((got.masks == want.masks).all())  # type: ignore[operator]
    # lists work too, and a dict of features only encodes without targets
    feats = {c: t.column(c).to_pylist() for c in ("user", "item", "price", "hist")}
    assert bool((pre.encode(feats).sparse == want.sparse).all())
    assert pre.encode(feats).labels is None


def test_fit_and_encode_take_a_pandas_dataframe() -> None:
    pd = pytest.importorskip("pandas")
    t = tiny_table(120)
    df = pd.DataFrame({c: t.column(c).to_pylist() for c in t.column_names})
    want_pre = Preprocessor.fit(tiny_schema(), t)
    pre = Preprocessor.fit(tiny_schema(), df)
    assert pre.to_dict() == want_pre.to_dict()
    got, want = pre.encode(df), want_pre.encode(t)
    assert bool((got.sparse == want.sparse).all()) and bool((got.dense == want.dense).all())
    assert bool((got.sequences["hist"] == want.sequences["hist"]).all())


def test_an_arrow_stream_object_is_accepted_and_anything_else_is_a_type_error() -> None:
    class Frame:  # what polars, pandas >= 2.2 and others offer
        def __init__(self, t: pa.Table) -> None:
            self.t = t

        def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
            return self.t.__arrow_c_stream__(requested_schema)

    t = tiny_table(40).drop(["watch"])  # (no NaN: NaN != NaN)
    assert as_table(Frame(t)).to_pylist() == t.to_pylist()
    assert as_table(t.to_batches()[0]).to_pylist() == t.to_pylist()
    with pytest.raises(TypeError, match="pyarrow Table, a pandas DataFrame or a dict"):
        Preprocessor.fit(tiny_schema(), [1, 2, 3])
    with pytest.raises(TypeError, match="differ in length"):
        as_table({"a": [1, 2], "b": [1]})
    with pytest.raises(TypeError, match="1-d"):
        as_table({"a": np.zeros((2, 2))})


# -- pre-indexed features -------------------------------------------------------------------------
def indexed_schema(n: int = 5) -> Schema:
    return Schema(
        features=(
            SparseFeature(name="cat", vocab_size=n, embedding_dim=4),
            SequenceFeature(name="seq", table="cat", vocab_size=n, embedding_dim=4, max_len=3),
            DenseFeature(name="x"),
        ),
        tasks=(TaskSpec(name="y", kind="binary"),),
    )


def indexed_table() -> pa.Table:
    return pa.table(
        {
            "cat": pa.array([0, 4, 5, -1, None, 2, 1, 3, 0, 1], pa.int64()),
            "seq": ["1|7|3", "", None, "4", "0|0", "2", "1", "3|1", "-2|4", "4|4|4|4"],
            "x": [float(i) for i in range(10)],
            "y": [0, 1, 0, 1, 0, 1, 0, 1, 0, 1],
        }
    )


def test_pre_indexed_ids_are_used_as_they_are_and_out_of_range_is_oov() -> None:
    pre = Preprocessor.fit(indexed_schema(), indexed_table())
    assert pre.table_sizes() == {"cat": 5 + FIRST_ID}
    assert pre.tables["cat"].to_dict()["vocab"] == []  # nothing fitted
    ds = pre.encode(indexed_table())
    o = OOV_ID
    assert ds.sparse[:, 0].tolist() == [2, 6, o, o, o, 4, 3, 5, 2, 3]
    assert ds.unknown_counts["cat"] == 2  # 5 and -1; the null is not unknown
    p = PAD_ID
    assert ds.sequences["seq"].tolist() == [
        [3, o, 5],
        [p, p, p],
        [p, p, p],
        [6, p, p],
        [2, 2, p],
        [4, p, p],
        [3, p, p],
        [5, 3, p],
        [o, 6, p],
        [6, 6, 6],
    ]
    assert ds.unknown_counts["seq"] == 2  # 7 and -2


def test_pre_indexed_ids_from_text_and_floats_match_the_integers() -> None:
    pre = Preprocessor.fit(indexed_schema(), indexed_table())
    want = pre.encode(indexed_table()).sparse[:, 0].tolist()
    as_text = indexed_table().set_column(
        0, "cat", pa.array([" 0", "4", "5", "-1", None, "2", "1", "3", "0", "+1"])
    )
    assert pre.encode(as_text).sparse[:, 0].tolist() == want
    as_float = indexed_table().set_column(0, "cat", pc_float(indexed_table().column("cat")))
    assert pre.encode(as_float).sparse[:, 0].tolist() == want
    # the null token rule comes first: "NA" is missing, not an error
    na = indexed_table().set_column(0, "cat", pa.array(["NA", *["1"] * 9]))
    assert pre.encode(na).sparse[0, 0].item() == OOV_ID


def pc_float(col: pa.ChunkedArray) -> pa.Array:
    return pa.array([None if v is None else float(v) for v in col.to_pylist()], pa.float64())


@pytest.mark.parametrize(
    ("column", "values", "row", "found"),
    [
        ("cat", ["1", "2", "x", *["1"] * 7], 3, "'x'"),
        ("cat", [1.0, 2.5, *[1.0] * 8], 2, "'2.5'"),
        ("seq", ["1", "2|3", "1|b", *["1"] * 7], 3, "'b'"),
    ],
)
def test_pre_indexed_non_integer_is_an_error_naming_the_row(
    column: str, values: list, row: int, found: str
) -> None:
    pre = Preprocessor.fit(indexed_schema(), indexed_table())
    t = indexed_table()
    t = t.set_column(t.schema.get_field_index(column), column, pa.array(values))
    with pytest.raises(DataError, match=rf"integer id in \[0, 5\).*found {found}") as info:
        pre.encode(t, file="f.csv")
    assert (info.value.file, info.value.column, info.value.row) == ("f.csv", column, row)


def test_pre_indexed_save_load_round_trip() -> None:
    pre = Preprocessor.fit(indexed_schema(), indexed_table())
    back = Preprocessor.from_json(indexed_schema(), pre.to_json())
    assert back.tables["cat"].vocab_size == 5 and back.table_sizes() == pre.table_sizes()
    a, b = pre.encode(indexed_table()), back.encode(indexed_table())
    assert bool((a.sparse == b.sparse).all()) and bool(
        (a.sequences["seq"] == b.sequences["seq"]).all()
    )
    assert Schema.from_json(indexed_schema().to_json()) == indexed_schema()
    d = CategoricalEncoder(vocab_size=3).to_dict()
    assert CategoricalEncoder.from_dict(d).size == 3 + FIRST_ID
    del d["vocab_size"]  # encoders saved before the option existed
    assert CategoricalEncoder.from_dict(d).vocab_size is None


def test_pre_indexed_schema_rules() -> None:
    with pytest.raises(ValidationError, match=r"vocab_size .* excludes hash_buckets"):
        SparseFeature(name="a", vocab_size=3, hash_buckets=4)
    with pytest.raises(ValidationError, match="excludes min_count"):
        SparseFeature(name="a", vocab_size=3, min_count=2)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        SparseFeature(name="a", vocab_size=0)
    with pytest.raises(ConfigError, match="differ in vocab_size"):
        Schema.from_dict(
            {
                "features": [
                    {"type": "sparse", "name": "a", "vocab_size": 3},
                    {"type": "sequence", "name": "b", "table": "a", "vocab_size": 4},
                ],
                "tasks": [{"name": "y", "kind": "binary"}],
            }
        )


def test_fingerprint_of_a_schema_without_the_option_is_unchanged() -> None:
    """Runs saved before ``vocab_size`` existed keep their schema fingerprint."""
    assert tiny_schema().fingerprint() == "e1634a27007a8190"
    assert indexed_schema().fingerprint() != indexed_schema(6).fingerprint()


def test_a_model_trains_on_a_pre_indexed_feature(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 800
    cat = rng.integers(0, 50, n)
    y = (cat % 2 == 0).astype(np.int64)  # learnable from the id alone
    pq.write_table(pa.table({"cat": cat, "x": rng.normal(size=n), "y": y}), tmp_path / "d.parquet")
    cfg = ExperimentConfig.from_dict(
        {
            "data": {"train": "d.parquet", "split": {"fractions": [0.7, 0.15, 0.15], "seed": 0}},
            "schema": {
                "features": [
                    {"type": "sparse", "name": "cat", "vocab_size": 50, "embedding_dim": 8},
                    {"type": "dense", "name": "x"},
                ],
                "tasks": [{"name": "y", "kind": "binary"}],
            },
            "model": {"name": "shared_bottom", "params": {"bottom_hidden": [16]}},
            "training": {
                "epochs": 8,
                "batch_size": 64,
                "optimizer": {"lr": 0.05},
                "progress": False,
                "num_threads": 1,
            },
            "output_dir": str(tmp_path / "run"),
        },
        base_dir=str(tmp_path),
    )
    res = train_run(cfg, overwrite=True)
    assert json.loads((res.path / "model.json").read_text())["table_sizes"] == {"cat": 52}
    assert res.test_metrics is not None and res.test_metrics["y"]["auc"] > 0.9
    run = load_run(res.path)
    assert run.preprocessor.tables["cat"].vocab_size == 50
