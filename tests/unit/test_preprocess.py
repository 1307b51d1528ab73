"""Tests of mtlrec.data.preprocess and mtlrec.data.targets: fit on train, encode anything."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from mtlrec.batch import OOV_ID
from mtlrec.data.encoders import CategoricalEncoder
from mtlrec.data.io import read_table
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import CheckpointError, DataError
from mtlrec.schema import DenseFeature, Schema, SequenceFeature, SparseFeature, TaskSpec
from mtlrec.testing import tiny_dataset, tiny_schema, tiny_table


def vocab_of(enc: CategoricalEncoder) -> list[str]:
    """The fitted vocabulary as a plain list, most frequent first (as saved)."""
    return list(enc.to_dict()["vocab"])


def schema() -> Schema:
    return Schema(
        features=(
            SparseFeature(name="user"),
            SparseFeature(name="item", table="items"),
            SequenceFeature(name="hist", table="items", max_len=3),
            DenseFeature(name="price", transform="standardize", fill_value=1.0),
        ),
        tasks=(
            TaskSpec(name="click", kind="binary"),
            TaskSpec(name="watch", kind="regression", mask="click", weight="w"),
            TaskSpec(name="stars", kind="multiclass", num_classes=3, mask="rated"),
        ),
        group_column="req",
    )


def train_table() -> pa.Table:
    return pa.table(
        {
            "user": ["u1", "u2", "u1", "u3"],
            "item": ["a", "b", "a", "c"],
            "hist": ["a|b", "", "c|a|a", None],
            "price": [1.0, 2.0, 3.0, None],
            "click": [1, 0, 1, 0],
            "watch": [0.5, None, 2.0, None],
            "w": [1.0, None, 3.0, None],
            "stars": [2, None, 0, 1],
            "rated": [True, False, True, True],
            "req": ["r1", "r1", "r2", "r2"],
        }
    )


def with_column(t: pa.Table, name: str, values: list, type_: pa.DataType | None = None):
    return t.set_column(t.schema.get_field_index(name), name, pa.array(values, type_))


@pytest.fixture
def pre() -> Preprocessor:
    return Preprocessor.fit(schema(), train_table(), file="train.csv")


# -- fit / encode ---------------------------------------------------------------------------------
def test_fit_and_encode_training_table(pre: Preprocessor) -> None:
    ds = pre.encode(train_table(), file="train.csv")
    assert len(ds) == 4
    # items is shared by item and hist: a 2+3, b 1+1, c 1+1 -> a, b, c
    assert vocab_of(pre.tables["user"]) == ["u1", "u2", "u3"]
    assert vocab_of(pre.tables["items"]) == ["a", "b", "c"]
    assert pre.table_sizes() == {"user": 5, "items": 5}
    assert ds.sparse.dtype == torch.int32
    assert ds.sparse.tolist() == [[2, 2], [3, 3], [2, 2], [4, 4]]
    assert ds.sequences["hist"].tolist() == [[2, 3, 0], [0, 0, 0], [4, 2, 2], [0, 0, 0]]
    mean = 7.0 / 4.0  # the missing price is filled with 1.0 before fitting
    std = float(np.std([1.0, 2.0, 3.0, 1.0]))
    assert ds.dense[:, 0].tolist() == pytest.approx([(v - mean) / std for v in (1, 2, 3, 1)])
    assert ds.unknown_counts == {"user": 0, "item": 0, "hist": 0}
    assert ds.source == "train.csv"


def test_unknown_categories_go_to_oov_and_are_counted(pre: Preprocessor) -> None:
    valid = pa.table(
        {
            "user": ["u1", "new1", "new2", None],
            "item": ["zz", "a", "b", "c"],
            "hist": ["a|q|r", "b", "x", ""],
            "price": [10.0, 2.0, 2.0, 2.0],
        }
    )
    ds = pre.encode(valid, file="valid.csv")
    assert ds.sparse[:, 0].tolist() == [2, OOV_ID, OOV_ID, OOV_ID]
    assert ds.sparse[:, 1].tolist() == [OOV_ID, 2, 3, 4]
    assert ds.sequences["hist"].tolist() == [[2, 1, 1], [3, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert ds.unknown_counts == {"user": 2, "item": 1, "hist": 3}  # nulls are not unknown
    # dense values use the training statistics
    mean, std = 7.0 / 4.0, float(np.std([1.0, 2.0, 3.0, 1.0]))
    assert ds.dense[0, 0].item() == pytest.approx((10.0 - mean) / std)


def test_fit_requires_feature_columns() -> None:
    with pytest.raises(DataError, match="missing feature column") as info:
        Preprocessor.fit(schema(), train_table().drop(["price"]), file="train.csv")
    assert (info.value.file, info.value.column) == ("train.csv", "price")


def test_encode_requires_feature_columns(pre: Preprocessor) -> None:
    with pytest.raises(DataError) as info:
        pre.encode(train_table().drop(["item"]), file="v.csv")
    assert (info.value.file, info.value.column) == ("v.csv", "item")


def test_feature_read_from_renamed_column() -> None:
    s = Schema(
        features=[SparseFeature(name="u", column="user_id"), DenseFeature(name="p", column="px")],
        tasks=[TaskSpec(name="y", kind="binary")],
    )
    t = pa.table({"user_id": ["a", "b", "a"], "px": [1.0, 2.0, 3.0], "y": [0, 1, 0]})
    ds = Preprocessor.fit(s, t).encode(t)
    assert ds.sparse[:, 0].tolist() == [2, 3, 2]
    assert ds.dense[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_encode_from_csv_with_string_ids(tmp_path) -> None:
    s = Schema(features=[SparseFeature(name="zip")], tasks=[TaskSpec(name="y", kind="binary")])
    (tmp_path / "train.csv").write_text("zip,y\n007,1\n7,0\n007,0\n")
    t = read_table(tmp_path / "train.csv", string_columns=["zip"])
    pre = Preprocessor.fit(s, t)
    assert vocab_of(pre.tables["zip"]) == ["007", "7"]
    assert pre.encode(t).sparse[:, 0].tolist() == [2, 3, 2]


# -- persistence ----------------------------------------------------------------------------------
def test_json_round_trip_encodes_identically(pre: Preprocessor) -> None:
    text = pre.to_json()
    json.loads(text)
    back = Preprocessor.from_json(schema(), text)
    t = train_table()
    a, b = pre.encode(t), back.encode(t)
    for x, y in [
        (a.sparse, b.sparse),
        (a.dense, b.dense),
        (a.sequences["hist"], b.sequences["hist"]),
        (a.labels, b.labels),
        (a.masks, b.masks),
        (a.weights, b.weights),
    ]:
        assert torch.equal(x, y)
    assert back.table_sizes() == pre.table_sizes()


def test_from_json_with_another_schema_raises(pre: Preprocessor) -> None:
    other = schema().select_tasks(["click"])
    with pytest.raises(CheckpointError, match="another schema"):
        Preprocessor.from_json(other, pre.to_json(), source="run/encoders.json")


def test_from_json_rejects_other_format_and_bad_json(pre: Preprocessor) -> None:
    d = pre.to_dict()
    d["format_version"] = 99
    with pytest.raises(CheckpointError, match="format 99"):
        Preprocessor.from_dict(schema(), d)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Preprocessor.from_json(schema(), "{oops")


def test_from_dict_rejects_encoders_not_matching_features(pre: Preprocessor) -> None:
    d = pre.to_dict()
    del d["tables"]["user"]
    with pytest.raises(CheckpointError, match="do not match"):
        Preprocessor.from_dict(schema(), d)


# -- labels, masks, weights -----------------------------------------------------------------------
def test_labels_masks_weights(pre: Preprocessor) -> None:
    ds = pre.encode(train_table(), file="train.csv")
    assert ds.has_targets
    assert ds.labels.dtype == torch.float32
    assert ds.masks.dtype == torch.bool
    labels, masks, weights = ds.label_dict(), ds.mask_dict(), ds.weight_dict()
    assert masks["click"].tolist() == [True] * 4
    assert weights["click"].tolist() == [1.0] * 4
    assert labels["click"].tolist() == [1.0, 0.0, 1.0, 0.0]
    # watch: mask = click; rows outside get label 0 and weight 0
    assert masks["watch"].tolist() == [True, False, True, False]
    assert labels["watch"].tolist() == [0.5, 0.0, 2.0, 0.0]
    assert weights["watch"].tolist() == [1.0, 0.0, 3.0, 0.0]
    assert masks["stars"].tolist() == [True, False, True, True]
    assert labels["stars"].tolist() == [2.0, 0.0, 0.0, 1.0]


def test_weight_zero_outside_mask_without_weight_column() -> None:
    s = Schema(
        features=[DenseFeature(name="x")],
        tasks=[TaskSpec(name="y", kind="regression", mask="m")],
    )
    t = pa.table({"x": [1.0, 2.0], "y": [1.5, None], "m": [1, 0]})
    ds = Preprocessor.fit(s, t).encode(t)
    assert ds.weight_dict()["y"].tolist() == [1.0, 0.0]


def test_missing_mask_value_counts_as_false() -> None:
    s = Schema(
        features=[DenseFeature(name="x")],
        tasks=[TaskSpec(name="y", kind="regression", mask="m")],
    )
    t = pa.table({"x": [1.0, 2.0, 3.0], "y": [1.5, None, None], "m": [1, None, 0]})
    ds = Preprocessor.fit(s, t).encode(t)
    assert ds.mask_dict()["y"].tolist() == [True, False, False]
    assert ds.label_dict()["y"].tolist() == [1.5, 0.0, 0.0]


def test_missing_label_inside_mask_names_file_column_row(pre: Preprocessor) -> None:
    t = with_column(train_table(), "watch", [0.5, None, None, None])
    with pytest.raises(DataError, match="missing on a row inside") as info:
        pre.encode(t, file="valid.csv")
    e = info.value
    assert (e.file, e.column, e.row) == ("valid.csv", "watch", 3)
    msg = str(e)
    assert "valid.csv" in msg
    assert "'watch'" in msg
    assert "row 3" in msg
    assert "'click'" in msg  # the mask column


def test_missing_label_without_mask_is_an_error(pre: Preprocessor) -> None:
    t = with_column(train_table(), "click", [1, 0, None, 0])
    with pytest.raises(DataError) as info:
        pre.encode(t, file="v.csv")
    assert (info.value.column, info.value.row) == ("click", 3)


def test_binary_label_two_rejected_with_row(pre: Preprocessor) -> None:
    t = with_column(train_table(), "click", [1, 0, 1, 2])
    with pytest.raises(DataError, match="expects labels 0 or 1") as info:
        pre.encode(t, file="v.csv")
    assert (info.value.file, info.value.column, info.value.row) == ("v.csv", "click", 4)


def test_binary_label_message_shows_plain_value(pre: Preprocessor) -> None:
    t = with_column(train_table(), "click", [1, 0, 1, 2])
    with pytest.raises(DataError) as info:
        pre.encode(t, file="v.csv")
    assert "np.float64" not in str(info.value)
    assert "found 2.0" in str(info.value)


def test_negative_weight_rejected(pre: Preprocessor) -> None:
    t = with_column(train_table(), "w", [1.0, None, -0.5, None])
    with pytest.raises(DataError, match="must be >= 0") as info:
        pre.encode(t, file="v.csv")
    assert (info.value.column, info.value.row) == ("w", 3)


def test_negative_weight_outside_mask_ignored(pre: Preprocessor) -> None:
    t = with_column(train_table(), "w", [1.0, -5.0, 3.0, math.inf])
    assert pre.encode(t).weight_dict()["watch"].tolist() == [1.0, 0.0, 3.0, 0.0]


def test_missing_weight_inside_mask_rejected(pre: Preprocessor) -> None:
    t = with_column(train_table(), "w", [None, None, 3.0, None], pa.float64())
    with pytest.raises(DataError, match="missing or not finite") as info:
        pre.encode(t)
    assert (info.value.column, info.value.row) == ("w", 1)


def test_regression_infinite_label_rejected(pre: Preprocessor) -> None:
    t = with_column(train_table(), "watch", [0.5, None, -math.inf, None])
    with pytest.raises(DataError, match="finite") as info:
        pre.encode(t, file="v.csv")
    assert (info.value.column, info.value.row) == ("watch", 3)


@pytest.mark.parametrize(("bad", "row"), [([2, None, 3, 1], 3), ([2, None, 0, -1], 4)])
def test_multiclass_label_out_of_range_rejected(pre: Preprocessor, bad: list, row: int) -> None:
    t = with_column(train_table(), "stars", bad)
    with pytest.raises(DataError, match=r"integer labels in \[0, 3\)") as info:
        pre.encode(t, file="v.csv")
    assert (info.value.column, info.value.row) == ("stars", row)


def test_multiclass_non_integer_label_rejected(pre: Preprocessor) -> None:
    t = with_column(train_table(), "stars", [2.0, None, 0.5, 1.0])
    with pytest.raises(DataError) as info:
        pre.encode(t)
    assert info.value.row == 3


def test_multiclass_out_of_range_outside_mask_ignored(pre: Preprocessor) -> None:
    t = with_column(train_table(), "stars", [2, 99, 0, 1])
    assert pre.encode(t).label_dict()["stars"].tolist() == [2.0, 0.0, 0.0, 1.0]


# -- targets=None / groups ------------------------------------------------------------------------
def test_targets_auto_detected(pre: Preprocessor) -> None:
    t = train_table()
    assert pre.encode(t).has_targets
    features_only = t.select(["user", "item", "hist", "price"])
    ds = pre.encode(features_only)
    assert not ds.has_targets
    assert ds.labels is None and ds.masks is None and ds.weights is None
    assert ds.label_dict() == {}
    batch = ds.take(slice(0, 2))
    assert batch.labels == {} and len(batch) == 2


def test_targets_true_requires_target_columns(pre: Preprocessor) -> None:
    features_only = train_table().select(["user", "item", "hist", "price"])
    with pytest.raises(DataError, match="missing label/mask/weight column") as info:
        pre.encode(features_only, file="score.csv", targets=True)
    assert info.value.column == "click"


def test_targets_false_skips_labels(pre: Preprocessor) -> None:
    assert not pre.encode(train_table(), targets=False).has_targets


def test_labels_present_but_mask_missing_raises(pre: Preprocessor) -> None:
    with pytest.raises(DataError) as info:
        pre.encode(train_table().drop(["rated"]))
    assert info.value.column == "rated"


def test_group_column_encoded(pre: Preprocessor) -> None:
    """Group ids are stable across tables and chunks: equal values, equal ids; missing -> -1."""
    ds = pre.encode(train_table())
    assert ds.groups is not None
    assert ds.groups.dtype == torch.int64
    g = ds.groups.tolist()
    assert g[0] == g[1] != g[2] == g[3]
    t = with_column(train_table(), "req", ["x", None, "y", "x"])
    g2 = pre.encode(t).groups.tolist()
    assert g2[1] == -1 and g2[0] == g2[3] != g2[2]
    g3 = pre.encode(t.slice(2, 2)).groups.tolist()  # another chunk of the same file
    assert g3 == g2[2:]
    assert pre.encode(train_table().drop(["req"])).groups is None
    assert pre.encode(train_table()).take(slice(1, 3)).groups.tolist() == g[1:3]
    ints = with_column(train_table(), "req", pa.array([7, 7, None, 9]))
    assert pre.encode(ints).groups.tolist() == [7, 7, -1, 9]


# -- mtlrec.testing -------------------------------------------------------------------------------
def test_tiny_dataset_is_consistent() -> None:
    pre, ds = tiny_dataset(n=64, seed=3)
    assert len(ds) == 64
    assert pre.schema == ds.schema
    assert ds.schema == tiny_schema()
    again = Preprocessor.fit(tiny_schema(), tiny_table(64, seed=3)).encode(tiny_table(64, seed=3))
    assert torch.equal(ds.sparse, again.sparse)
    m = ds.mask_dict()["watch"]
    assert torch.equal(m, ds.label_dict()["click"].bool())
    assert (ds.label_dict()["watch"][~m] == 0).all()
