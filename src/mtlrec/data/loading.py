"""From a data config to encoded train / valid / test data sets and the schema that reads them.

Files are streamed (:mod:`mtlrec.data.file_encoding`): encoders are fitted on the training rows in a
first pass and every split is encoded in a second, so the raw table is never held whole.
Built-in data sets are small and loaded in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from mtlrec.config import DataConfig, ExperimentConfig, SplitConfig
from mtlrec.data.columns import DEFAULT_NULL_VALUES
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.file_encoding import encode_file, fit_file, split_part
from mtlrec.data.io import file_format
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.quality import warn_empty_tasks
from mtlrec.data.split import hash_split
from mtlrec.data.stream_dataset import StreamingDataset, encode_other_parts
from mtlrec.errors import ConfigError
from mtlrec.schema import Schema
from mtlrec.utils.runtime import mmap_large_blocks

DEFAULT_SPLIT = SplitConfig(fractions=(0.8, 0.1, 0.1))
SPLITS = ("train", "valid", "test")


@dataclass
class Datasets:
    """Encoded splits (valid / test may be absent) and the names used in messages."""

    preprocessor: Preprocessor
    train: ColumnarDataset
    valid: ColumnarDataset | None
    test: ColumnarDataset | None
    names: dict[str, str]

    def get(self, split: str) -> ColumnarDataset | None:
        return getattr(self, split)


@dataclass(frozen=True)
class BuiltinDataset:
    description: str
    load: Callable[[dict[str, Any]], tuple[pa.Table, Schema]]
    split: SplitConfig
    null_values: tuple[str, ...] = DEFAULT_NULL_VALUES
    """Null tokens when ``data.null_values`` is not set."""


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
        null_values=(),  # its '?' is a category of the published data set, kept as one
    ),
}


def null_values(d: DataConfig) -> tuple[str, ...]:
    """The null tokens of a data config: ``data.null_values``, else the built-in data set's,
    else :data:`~mtlrec.data.columns.DEFAULT_NULL_VALUES`."""
    if d.null_values is not None:
        return tuple(d.null_values)
    if d.dataset is not None and d.dataset in BUILTIN:
        return BUILTIN[d.dataset].null_values
    return DEFAULT_NULL_VALUES


def _fit_options(d: DataConfig) -> dict[str, Any]:
    return {"null_values": null_values(d), "min_task_rows": d.min_task_rows}


def _checked(sets: Datasets) -> Datasets:
    for split in ("valid", "test"):
        warn_empty_tasks(sets.get(split), split, sets.names.get(split, split))
    return sets


def split_table(
    table: pa.Table, split: SplitConfig, group: str | None = None
) -> tuple[pa.Table, ...]:
    """The parts of an in-memory table: by row hash, or by group hash when ``group`` names a
    column of it (as the file readers do, :func:`~mtlrec.data.file_encoding.split_part`)."""
    if group is None or group not in table.column_names:
        parts = hash_split(table.num_rows, split.fractions, split.seed)
        return tuple(table.take(pa.array(p)) for p in parts)
    part = split_part(table, 0, (tuple(split.fractions), split.seed), group)
    return tuple(table.filter(pa.array(part == k)) for k in range(len(split.fractions)))


def _adapted(
    adapt: Callable[[Preprocessor], Preprocessor] | None, pre: Preprocessor
) -> Preprocessor:
    return pre if adapt is None else adapt(pre)


def _select(schema: Schema, cfg: ExperimentConfig) -> Schema:
    if cfg.tasks is None:
        return schema
    unknown = [t for t in cfg.tasks if t not in schema.task_names]
    if unknown:
        raise ConfigError(
            f"tasks: {unknown} are not in the schema (tasks: {list(schema.task_names)})"
        )
    return schema.select_tasks(cfg.tasks)


def config_schema(cfg: ExperimentConfig) -> Schema:
    """The schema of an experiment: the config's, or its built-in data set's default, reduced
    to ``cfg.tasks`` if given."""
    if cfg.schema_ is not None:
        return _select(cfg.schema_, cfg)
    d = cfg.data
    if d.dataset is None:
        raise ConfigError("the config needs a schema section when data comes from files")
    if d.dataset not in BUILTIN:
        raise ConfigError(f"unknown data set {d.dataset!r}; built-in: {sorted(BUILTIN)}")
    return _select(BUILTIN[d.dataset].load(d.options)[1], cfg)


@mmap_large_blocks()
def load_datasets(
    cfg: ExperimentConfig,
    pre: Preprocessor | None = None,
    *,
    adapt: Callable[[Preprocessor], Preprocessor] | None = None,
) -> Datasets:
    """Read, split and encode the configured data.

    Args:
        cfg: the experiment.
        pre: fitted encoders to reuse (resuming, evaluating); None fits them on the training
            split.
        adapt: applied to encoders fitted here before anything is encoded (a warm start grows
            the earlier run's vocabularies with them: :mod:`mtlrec.data.vocab_growth`).
    """
    d: DataConfig = cfg.data
    if d.streaming:
        return load_streaming(cfg, pre, adapt=adapt)
    if d.dataset is not None:
        if d.dataset not in BUILTIN:
            raise ConfigError(f"unknown data set {d.dataset!r}; built-in: {sorted(BUILTIN)}")
        b = BUILTIN[d.dataset]
        table, default_schema = b.load(d.options)
        schema = _select(cfg.schema_ or default_schema, cfg)
        parts = split_table(table, d.split or b.split, schema.group_column)
        names = {k: f"{d.dataset}[{k}]" for k in SPLITS}
        if pre is None:
            pre = _adapted(
                adapt, Preprocessor.fit(schema, parts[0], file=names["train"], **_fit_options(d))
            )
        enc = [
            pre.encode(t, file=names[k], targets=True) for k, t in zip(SPLITS, parts, strict=True)
        ]
        return _checked(Datasets(pre, enc[0], enc[1], enc[2], names))

    schema = config_schema(cfg)
    assert d.train is not None
    train_path = cfg.resolve_path(d.train)
    valid_path = cfg.resolve_path(d.valid) if d.valid else None
    test_path = cfg.resolve_path(d.test) if d.test else None
    if valid_path is not None:
        if pre is None:
            pre = _adapted(
                adapt, fit_file(schema, train_path, delimiter=d.delimiter, **_fit_options(d))
            )
        train = encode_file(pre, train_path, delimiter=d.delimiter)[0]
        valid = encode_file(pre, valid_path, delimiter=d.delimiter)[0]
        test = encode_file(pre, test_path, delimiter=d.delimiter)[0] if test_path else None
        names = {"train": d.train, "valid": d.valid or "", "test": d.test or ""}
        return _checked(Datasets(pre, train, valid, test, names))
    # one file split by row hash (train / valid, and test unless a test file is given)
    split = d.split or DEFAULT_SPLIT
    f_train, f_valid = split.fractions[:2]
    if test_path is not None:
        total = f_train + f_valid
        fractions: tuple[float, ...] = (f_train / total, f_valid / total)
    else:
        fractions = split.fractions
    spec = (fractions, split.seed)
    if pre is None:
        pre = _adapted(
            adapt,
            fit_file(schema, train_path, split=spec, delimiter=d.delimiter, **_fit_options(d)),
        )
    parts = encode_file(pre, train_path, split=spec, delimiter=d.delimiter)
    names = {k: f"{d.train}[{k} split]" for k in SPLITS}
    if test_path is not None:
        names["test"] = d.test or ""
        test = encode_file(pre, test_path, delimiter=d.delimiter)[0]
        return _checked(Datasets(pre, parts[0], parts[1], test, names))
    return _checked(Datasets(pre, parts[0], parts[1], parts[2], names))


def load_streaming(
    cfg: ExperimentConfig,
    pre: Preprocessor | None = None,
    *,
    adapt: Callable[[Preprocessor], Preprocessor] | None = None,
) -> Datasets:
    """The data of a ``data.streaming: true`` config: the training rows as a
    :class:`StreamingDataset`, validation and test rows encoded in memory (``adapt`` as in
    :func:`load_datasets`)."""
    d = cfg.data
    if d.train is None:
        raise ConfigError("data.streaming needs data.train (a Parquet file), not a built-in set")
    schema = config_schema(cfg)
    train_path = cfg.resolve_path(d.train)
    if file_format(Path(train_path)) != "parquet":
        raise ConfigError(f"data.streaming reads Parquet files; data.train {d.train} is not one")
    if d.valid:
        if pre is None:
            pre = _adapted(adapt, fit_file(schema, train_path, **_fit_options(d)))
        train = StreamingDataset(
            pre, train_path, shuffle_buffer=d.shuffle_buffer, prefetch=d.prefetch
        )
        valid = encode_file(pre, cfg.resolve_path(d.valid), delimiter=d.delimiter)[0]
        test = (
            encode_file(pre, cfg.resolve_path(d.test), delimiter=d.delimiter)[0] if d.test else None
        )
        names = {"train": d.train, "valid": d.valid, "test": d.test or ""}
        return _checked(Datasets(pre, train, valid, test, names))  # type: ignore[arg-type]
    split = d.split or DEFAULT_SPLIT
    fractions: tuple[float, ...] = split.fractions
    if d.test:
        total = fractions[0] + fractions[1]
        fractions = (fractions[0] / total, fractions[1] / total)
    spec = (fractions, split.seed)
    if pre is None:
        pre = _adapted(adapt, fit_file(schema, train_path, split=spec, **_fit_options(d)))
    train = StreamingDataset(
        pre, train_path, split=spec, shuffle_buffer=d.shuffle_buffer, prefetch=d.prefetch
    )
    parts = encode_other_parts(pre, train_path, spec)
    names = {k: f"{d.train}[{k} split]" for k in SPLITS}
    if d.test:
        names["test"] = d.test
        test = encode_file(pre, cfg.resolve_path(d.test), delimiter=d.delimiter)[0]
    else:
        test = parts[2]
    return _checked(Datasets(pre, train, parts[1], test, names))  # type: ignore[arg-type]
