"""Tests of mtlrec.schema: validation rules, JSON round trip, task selection and fingerprints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mtlrec.errors import ConfigError
from mtlrec.schema import DenseFeature, Schema, SequenceFeature, SparseFeature, TaskSpec


def rich_schema() -> Schema:
    """A schema using every kind of feature and task, a shared table, masks and weights."""
    return Schema(
        features=(
            SparseFeature(name="user", embedding_dim=8, min_count=2, column="user_id"),
            SparseFeature(name="item", embedding_dim=6, table="items", max_size=100),
            SequenceFeature(
                name="hist",
                embedding_dim=6,
                table="items",
                max_size=100,
                max_len=7,
                separator=";",
                truncate="first",
                pooling="sum",
            ),
            SparseFeature(name="city", hash_buckets=64),
            DenseFeature(name="price", fill_value=-0.5, transform="log1p_standardize"),
            DenseFeature(name="age", transform="standardize"),
        ),
        tasks=(
            TaskSpec(name="click", kind="binary", loss="focal", focal_alpha=0.25),
            TaskSpec(
                name="watch",
                kind="regression",
                label="watch_time",
                mask="click",
                weight="w_watch",
                loss="huber",
                huber_delta=2.0,
            ),
            TaskSpec(name="rating", kind="multiclass", num_classes=5, mask="rated"),
        ),
        group_column="request_id",
    )


# -- JSON round trip ------------------------------------------------------------------------------
def test_json_round_trip_rich_schema() -> None:
    s = rich_schema()
    back = Schema.from_json(s.to_json())
    assert back == s
    assert isinstance(back.features[2], SequenceFeature)
    assert back.features[2].truncate == "first"
    assert back.features[2].separator == ";"
    assert back.task("rating").num_classes == 5
    assert back.task("watch").mask == "click"
    assert back.task("watch").weight == "w_watch"
    assert back.tables()["items"] == (back.features[1], back.features[2])
    assert back.group_column == "request_id"


def test_to_json_is_valid_json_with_feature_types() -> None:
    d = json.loads(rich_schema().to_json())
    assert [f["type"] for f in d["features"]] == [
        "sparse",
        "sparse",
        "sequence",
        "sparse",
        "dense",
        "dense",
    ]
    assert Schema.from_dict(d) == rich_schema()


def test_from_json_invalid_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid schema"):
        Schema.from_json('{"features": [], "tasks": []}')
    with pytest.raises(ConfigError, match="invalid schema"):
        Schema.from_json("not json")


def test_from_dict_unknown_key_rejected() -> None:
    with pytest.raises(ConfigError, match="invalid schema"):
        Schema.from_dict(
            {
                "features": [{"type": "sparse", "name": "a", "embeding_dim": 3}],
                "tasks": [{"name": "y", "kind": "binary"}],
            }
        )


def test_views_and_columns() -> None:
    s = rich_schema()
    assert [f.name for f in s.sparse] == ["user", "item", "city"]
    assert [f.name for f in s.dense] == ["price", "age"]
    assert [f.name for f in s.sequences] == ["hist"]
    assert s.task_names == ("click", "watch", "rating")
    assert s.input_columns() == ["user_id", "item", "hist", "city", "price", "age"]
    assert s.target_columns() == ["click", "watch_time", "w_watch", "rating", "rated"]
    assert s.task("watch").label_column == "watch_time"
    assert s.task("click").loss_name == "focal"
    assert s.task("rating").loss_name == "cross_entropy"
    assert s.task("rating").output_dim == 5
    assert s.task("click").output_dim == 1
    with pytest.raises(KeyError, match="nope"):
        s.task("nope")


# -- validation -----------------------------------------------------------------------------------
def test_duplicate_feature_names_rejected() -> None:
    with pytest.raises(ValidationError, match=r"feature names must be unique.*'a'"):
        Schema(
            features=[SparseFeature(name="a"), DenseFeature(name="a")],
            tasks=[TaskSpec(name="y", kind="binary")],
        )


def test_duplicate_task_names_rejected() -> None:
    with pytest.raises(ValidationError, match=r"task names must be unique.*'y'"):
        Schema(
            features=[SparseFeature(name="a")],
            tasks=[
                TaskSpec(name="y", kind="binary"),
                TaskSpec(name="y", kind="regression", label="other"),
            ],
        )


def test_label_used_as_feature_rejected_naming_both() -> None:
    with pytest.raises(ValidationError, match="leakage") as info:
        Schema(
            features=[SparseFeature(name="clicked_feat", column="clicked"), DenseFeature(name="p")],
            tasks=[TaskSpec(name="click", kind="binary", label="clicked")],
        )
    msg = str(info.value)
    assert "'click'" in msg
    assert "'clicked'" in msg
    assert "'clicked_feat'" in msg


def test_label_leakage_via_from_dict_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"label column 'y'.*feature 'y'.*leakage"):
        Schema.from_dict(
            {
                "features": [{"type": "dense", "name": "y"}],
                "tasks": [{"name": "y", "kind": "regression"}],
            }
        )


def test_shared_table_with_different_embedding_dim_rejected() -> None:
    with pytest.raises(ValidationError, match=r"'a' and 'b' share table 't'.*embedding_dim"):
        Schema(
            features=[
                SparseFeature(name="a", table="t", embedding_dim=8),
                SequenceFeature(name="b", table="t", embedding_dim=4),
            ],
            tasks=[TaskSpec(name="y", kind="binary")],
        )


def test_shared_table_with_different_hash_buckets_rejected() -> None:
    with pytest.raises(ValidationError, match="hash_buckets"):
        Schema(
            features=[
                SparseFeature(name="a", table="t", hash_buckets=10),
                SparseFeature(name="b", table="t"),
            ],
            tasks=[TaskSpec(name="y", kind="binary")],
        )


def test_feature_named_like_another_table_is_shared() -> None:
    s = Schema(
        features=[SparseFeature(name="item"), SequenceFeature(name="hist", table="item")],
        tasks=[TaskSpec(name="y", kind="binary")],
    )
    assert list(s.tables()) == ["item"]
    assert [f.name for f in s.tables()["item"]] == ["item", "hist"]


def test_multiclass_without_num_classes_rejected() -> None:
    with pytest.raises(ValidationError, match="needs num_classes"):
        TaskSpec(name="m", kind="multiclass")


def test_num_classes_on_binary_rejected() -> None:
    with pytest.raises(ValidationError, match="multiclass tasks only"):
        TaskSpec(name="b", kind="binary", num_classes=3)


@pytest.mark.parametrize(
    ("kind", "loss"),
    [
        ("binary", "mse"),
        ("regression", "bce"),
        ("regression", "cross_entropy"),
        ("multiclass", "focal"),
    ],
)
def test_loss_not_fitting_kind_rejected(kind: str, loss: str) -> None:
    extra = {"num_classes": 3} if kind == "multiclass" else {}
    with pytest.raises(ValidationError, match=f"loss '{loss}' does not fit a {kind} task"):
        TaskSpec(name="t", kind=kind, loss=loss, **extra)


@pytest.mark.parametrize(
    ("kind", "loss"),
    [("binary", "bce"), ("binary", "focal"), ("regression", "mse"), ("regression", "huber")],
)
def test_loss_fitting_kind_accepted(kind: str, loss: str) -> None:
    assert TaskSpec(name="t", kind=kind, loss=loss).loss_name == loss


def test_empty_features_or_tasks_rejected() -> None:
    with pytest.raises(ValidationError):
        Schema(features=[], tasks=[TaskSpec(name="y", kind="binary")])
    with pytest.raises(ValidationError):
        Schema(features=[SparseFeature(name="a")], tasks=[])


def test_schema_is_frozen() -> None:
    s = rich_schema()
    with pytest.raises(ValidationError):
        s.group_column = "x"  # type: ignore[misc]


# -- select_tasks ---------------------------------------------------------------------------------
def test_select_tasks_keeps_given_order_and_features() -> None:
    s = rich_schema()
    sub = s.select_tasks(["rating", "click"])
    assert sub.task_names == ("rating", "click")
    assert sub.features == s.features
    assert sub.group_column == s.group_column
    assert s.task_names == ("click", "watch", "rating")  # the original is untouched
    assert Schema.from_json(sub.to_json()) == sub


def test_select_tasks_unknown_raises() -> None:
    with pytest.raises(KeyError, match="missing"):
        rich_schema().select_tasks(["click", "missing"])


# -- fingerprint ----------------------------------------------------------------------------------
def test_fingerprint_stable() -> None:
    s = rich_schema()
    fp = s.fingerprint()
    assert len(fp) == 16
    int(fp, 16)
    assert fp == rich_schema().fingerprint()
    assert fp == Schema.from_json(s.to_json()).fingerprint()


def test_fingerprint_stable_across_processes() -> None:
    code = (
        "import sys; from mtlrec.schema import Schema; "
        "print(Schema.from_json(sys.stdin.read()).fingerprint())"
    )
    s = rich_schema()
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=s.to_json(),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == s.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.model_copy(update={"group_column": None}),
        lambda s: s.select_tasks(["click", "watch"]),
        lambda s: s.model_copy(
            update={"features": (*s.features[:-1], DenseFeature(name="age", fill_value=1.0))}
        ),
        lambda s: s.model_copy(
            update={
                "features": (
                    SparseFeature(name="user", embedding_dim=9, min_count=2, column="user_id"),
                    *s.features[1:],
                )
            }
        ),
        lambda s: s.model_copy(
            update={"tasks": (s.tasks[0].model_copy(update={"focal_gamma": 1.0}), *s.tasks[1:])}
        ),
    ],
    ids=["group_column", "tasks", "fill_value", "embedding_dim", "focal_gamma"],
)
def test_fingerprint_changes_when_a_field_changes(change) -> None:
    s = rich_schema()
    assert change(s).fingerprint() != s.fingerprint()


# -- property: round trip over generated schemas --------------------------------------------------
_finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def schemas(draw: st.DrawFn) -> Schema:
    n_tables = draw(st.integers(1, 3))
    table_params = [
        {
            "embedding_dim": draw(st.integers(1, 64)),
            "min_count": draw(st.integers(1, 5)),
            "max_size": draw(st.none() | st.integers(1, 1000)),
            "hash_buckets": draw(st.none() | st.integers(1, 1000)),
        }
        for _ in range(n_tables)
    ]
    feats: list = []
    n_feats = draw(st.integers(1, 6))
    for i in range(n_feats):
        kind = draw(st.sampled_from(["sparse", "dense", "sequence"]))
        name = f"f{i}"
        column = draw(st.none() | st.just(f"col_{i}"))
        if kind == "dense":
            feats.append(
                DenseFeature(
                    name=name,
                    column=column,
                    fill_value=draw(_finite),
                    transform=draw(
                        st.sampled_from(["none", "standardize", "log1p", "log1p_standardize"])
                    ),
                )
            )
            continue
        t = draw(st.integers(0, n_tables - 1))
        common = {"name": name, "column": column, "table": f"tab{t}", **table_params[t]}
        if kind == "sparse":
            feats.append(SparseFeature(**common))
        else:
            feats.append(
                SequenceFeature(
                    **common,
                    max_len=draw(st.integers(1, 50)),
                    separator=draw(st.sampled_from(["|", ",", ";", " ", "::"])),
                    truncate=draw(st.sampled_from(["last", "first"])),
                    pooling=draw(st.sampled_from(["mean", "sum", "max"])),
                )
            )
    tasks = []
    for j in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["binary", "regression", "multiclass"]))
        loss = draw(
            st.none()
            | st.sampled_from(
                {"binary": ["bce", "focal"], "regression": ["mse", "huber"]}.get(
                    kind, ["cross_entropy"]
                )
            )
        )
        tasks.append(
            TaskSpec(
                name=f"t{j}",
                kind=kind,
                label=draw(st.none() | st.just(f"label_{j}")),
                mask=draw(st.none() | st.just(f"mask_{j}")),
                weight=draw(st.none() | st.just(f"w_{j}")),
                num_classes=draw(st.integers(2, 100)) if kind == "multiclass" else None,
                loss=loss,
                focal_gamma=draw(st.floats(0, 10, allow_nan=False)),
                focal_alpha=draw(
                    st.none() | st.floats(0.01, 0.99, allow_nan=False, exclude_max=True)
                ),
                huber_delta=draw(st.floats(0.01, 100, allow_nan=False)),
            )
        )
    group = draw(st.none() | st.just("group"))
    return Schema(features=tuple(feats), tasks=tuple(tasks), group_column=group)


@settings(deadline=None, max_examples=30)
@given(schemas())
def test_round_trip_property(s: Schema) -> None:
    back = Schema.from_json(s.to_json())
    assert back == s
    assert back.fingerprint() == s.fingerprint()
    assert [type(f) for f in back.features] == [type(f) for f in s.features]
