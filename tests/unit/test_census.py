"""Tests of the bundled census-income data (mtlrec.data.census) and its built-in splits."""

from __future__ import annotations

import pyarrow as pa
import pytest

from mtlrec.config import ExperimentConfig
from mtlrec.data.census import (
    COLUMNS,
    NOT_INPUTS,
    census_rate_check,
    census_schema,
    read_census,
)
from mtlrec.data.loading import load_datasets
from mtlrec.errors import ConfigError
from mtlrec.schema import DenseFeature, SparseFeature

LABELS = ("income", "never_married", "college")


@pytest.fixture(scope="module")
def census() -> pa.Table:
    return read_census()


def test_row_count_and_columns(census: pa.Table) -> None:
    assert census.num_rows == 99_762
    assert census.column_names == [*COLUMNS, *LABELS]
    for c in LABELS:
        assert census.column(c).type == pa.int8()
        assert set(census.column(c).to_pylist()) == {0, 1}


def test_label_rates(census: pa.Table) -> None:
    rates = census_rate_check(census)
    assert rates["income"] * 100 == pytest.approx(6.20, abs=0.01)
    assert rates["never_married"] * 100 == pytest.approx(43.25, abs=0.01)
    assert rates["college"] * 100 == pytest.approx(19.50, abs=0.01)


def test_values_are_trimmed(census: pa.Table) -> None:
    sexes = set(census.column("sex").to_pylist())
    assert sexes == {"Male", "Female"}
    assert census.column("age").type == pa.float64()


@pytest.mark.parametrize("group", [1, 2])
def test_schema_excludes_label_sources_and_weight(group: int) -> None:
    s = census_schema(group)
    names = {f.name for f in s.features}
    sources = set(s.input_columns())
    for c in ("education", "marital_stat", "instance_weight", "income_label"):
        assert c not in names
        assert c not in sources
    for t in s.tasks:
        assert t.label_column not in sources  # labels are not features
    assert names == set(COLUMNS) - set(NOT_INPUTS)
    assert len(s.features) == len(COLUMNS) - 4


def test_schema_task_groups_and_feature_kinds() -> None:
    s1, s2 = census_schema(1), census_schema(2)
    assert s1.task_names == ("income", "never_married")
    assert s2.task_names == ("college", "never_married")
    assert all(t.kind == "binary" for t in (*s1.tasks, *s2.tasks))
    f = {x.name: x for x in s1.features}
    assert isinstance(f["age"], DenseFeature) and f["age"].transform == "standardize"
    assert f["capital_gains"].transform == "log1p_standardize"
    assert isinstance(f["sex"], SparseFeature) and f["sex"].embedding_dim == 8
    assert census_schema(1, embedding_dim=3).sparse[0].embedding_dim == 3
    with pytest.raises(ValueError, match="task_group must be 1 or 2"):
        census_schema(3)


def test_schema_columns_exist_in_table(census: pa.Table) -> None:
    for group in (1, 2):
        s = census_schema(group)
        needed = set(s.input_columns()) | set(s.target_columns())
        assert needed <= set(census.column_names)


def test_builtin_splits_sizes() -> None:
    cfg = ExperimentConfig.from_dict(
        {"data": {"dataset": "census-income"}, "model": {"name": "mmoe"}}
    )
    splits = load_datasets(cfg)
    sizes = (len(splits.train), len(splits.valid), len(splits.test))
    assert sizes == (60_044, 19_696, 20_022)
    assert sum(sizes) == 99_762
    assert splits.preprocessor.schema == census_schema(1)
    assert splits.names == {
        "train": "census-income[train]",
        "valid": "census-income[valid]",
        "test": "census-income[test]",
    }


def test_builtin_unknown_option_rejected() -> None:
    cfg = ExperimentConfig.from_dict(
        {
            "data": {"dataset": "census-income", "options": {"bogus": 1}},
            "model": {"name": "mmoe"},
        }
    )
    with pytest.raises(ConfigError, match="bogus"):
        load_datasets(cfg)
