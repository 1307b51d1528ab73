"""From a data config to raw train / valid / test tables and the schema that reads them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from mtlrec.config import DataConfig, ExperimentConfig, SplitConfig
from mtlrec.data.io import read_table
from mtlrec.data.split import hash_split
from mtlrec.errors import ConfigError
from mtlrec.schema import Schema, SequenceFeature, SparseFeature

DEFAULT_SPLIT = SplitConfig(fractions=(0.8, 0.1, 0.1))


@dataclass
class Splits:
    """Raw tables and the names used for them in error messages."""

    train: pa.Table
    valid: pa.Table | None
    test: pa.Table | None
    names: dict[str, str]


@dataclass(frozen=True)
class BuiltinDataset:
    description: str
    load: Callable[[dict[str, Any]], tuple[pa.Table, Schema]]
    split: SplitConfig


def _census(options: dict[str, Any]) -> tuple[pa.Table, Schema]:
    from mtlrec.data.census import census_schema, read_census

    allowed = {"task_group", "embedding_dim", "path"}
    extra = set(options) - allowed
    if extra:
        raise ConfigError(
            f"data.options: unknown keys {sorted(extra)} for census-income "
            f"(allowed: {sorted(allowed)})"
        )
    schema = census_schema(
        int(options.get("task_group", 1)), embedding_dim=int(options.get("embedding_dim", 8))
    )
    return read_census(options.get("path")), schema


BUILTIN: dict[str, BuiltinDataset] = {
    "census-income": BuiltinDataset(
        "UCI census-income (KDD) test file, MMoE paper task groups; split 60/20/20 by row hash",
        _census,
        SplitConfig(fractions=(0.6, 0.2, 0.2), seed=0),
    ),
}


def _categorical_columns(schema: Schema) -> list[str]:
    return [f.source for f in schema.features if isinstance(f, SparseFeature | SequenceFeature)]


def split_table(table: pa.Table, split: SplitConfig) -> tuple[pa.Table, pa.Table, pa.Table]:
    parts = hash_split(table.num_rows, split.fractions, split.seed)
    return tuple(table.take(pa.array(p)) for p in parts)  # type: ignore[return-value]


def load_splits(cfg: ExperimentConfig) -> tuple[Splits, Schema]:
    """Read the configured data and split it.

    Returns:
        The raw tables and the schema (the config's, or the built-in data set's default).
    """
    d: DataConfig = cfg.data
    if d.dataset is not None:
        if d.dataset not in BUILTIN:
            raise ConfigError(f"unknown data set {d.dataset!r}; built-in: {sorted(BUILTIN)}")
        b = BUILTIN[d.dataset]
        table, default_schema = b.load(d.options)
        schema = cfg.schema_ or default_schema
        train, valid, test = split_table(table, d.split or b.split)
        names = {k: f"{d.dataset}[{k}]" for k in ("train", "valid", "test")}
        return Splits(train, valid, test, names), schema
    if cfg.schema_ is None:
        raise ConfigError("the config needs a schema section when data comes from files")
    schema = cfg.schema_
    strings = _categorical_columns(schema)
    assert d.train is not None
    train_path = cfg.resolve_path(d.train)
    train = read_table(train_path, string_columns=strings, delimiter=d.delimiter)
    names = {"train": d.train}
    valid = test = None
    if d.valid is not None:
        valid = read_table(cfg.resolve_path(d.valid), string_columns=strings, delimiter=d.delimiter)
        names["valid"] = d.valid
    if d.test is not None:
        test = read_table(cfg.resolve_path(d.test), string_columns=strings, delimiter=d.delimiter)
        names["test"] = d.test
    if valid is None:
        split = d.split or DEFAULT_SPLIT
        whole = train
        train, valid, part_test = split_table(whole, split)
        if test is None:
            test = part_test
            names["test"] = f"{d.train}[test split]"
        else:
            train = pa.concat_tables([train, part_test])
        names["train"] = f"{d.train}[train split]"
        names["valid"] = f"{d.train}[valid split]"
    return Splits(train, valid, test, names), schema
