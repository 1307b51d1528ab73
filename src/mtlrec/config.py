"""Experiment configuration: validated on load, unknown keys rejected, saved resolved.

A YAML file (or a dict) with the sections ``data``, ``schema`` (optional when a built-in data
set brings its own), ``model``, ``balancing``, ``training`` and ``output_dir``. Dotted overrides
(``training.optimizer.lr=0.01``) are applied before validation; their values are parsed as YAML
scalars.

Example:
    >>> cfg = ExperimentConfig.from_dict({"data": {"dataset": "census-income"},
    ...                                   "model": {"name": "mmoe"}})
    >>> cfg.training.optimizer.name, cfg.training.batch_size
    ('adam', 1024)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mtlrec.errors import ConfigError
from mtlrec.schema import Schema

CONFIG_VERSION = 1
_STRICT = ConfigDict(extra="forbid")


class SplitConfig(BaseModel):
    """Deterministic split of one file by a hash of the row number."""

    model_config = _STRICT
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0

    @model_validator(mode="after")
    def _sum(self) -> SplitConfig:
        if abs(sum(self.fractions) - 1.0) > 1e-6 or min(self.fractions) < 0:
            raise ValueError("split fractions must be >= 0 and sum to 1")
        return self


class DataConfig(BaseModel):
    """Where the rows come from: a built-in data set or files (relative to the config)."""

    model_config = _STRICT
    dataset: str | None = Field(default=None, description="built-in data set name")
    options: dict[str, Any] = Field(default_factory=dict, description="built-in data set options")
    train: str | None = None
    valid: str | None = None
    test: str | None = None
    split: SplitConfig | None = Field(
        default=None, description="split `train` into train/valid/test (when valid is absent)"
    )
    delimiter: str | None = None
    streaming: bool = Field(
        default=False,
        description="read and encode the training rows on the fly from a Parquet file larger "
        "than memory (docs/scale.md); validation and test rows are held in memory",
    )
    shuffle_buffer: int = Field(
        default=262_144, ge=1, description="rows shuffled together when streaming"
    )
    prefetch: bool = Field(
        default=True,
        description="when streaming, read and encode the next shuffle buffer in a worker "
        "thread while the current one is trained on (two buffers in memory instead of one)",
    )

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        if (self.dataset is None) == (self.train is None):
            raise ValueError("give either data.dataset or data.train")
        return self


class ModelConfig(BaseModel):
    model_config = _STRICT
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class BalancingConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = "static"

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimizerConfig(BaseModel):
    model_config = _STRICT
    name: Literal["adam", "adamw", "adagrad", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    embedding_weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    task_lr: dict[str, float] = Field(
        default_factory=dict,
        description="task -> learning rate of that task's own parameters (tower, gate...) in "
        "joint training, or of the task's whole optimiser under alternating training",
    )
    sparse_embeddings: bool = Field(
        default=False,
        description="embedding tables get sparse gradients and lazy updates (only the rows a "
        "batch looked up move; Adam moments of other rows wait, as TF's LazyAdam): for tables "
        "of millions of rows. Off: dense gradients and updates of every row, exact Adam",
    )

    @model_validator(mode="after")
    def _sparse(self) -> OptimizerConfig:
        if self.sparse_embeddings and self.embedding_weight_decay > 0:
            raise ValueError("embedding_weight_decay needs sparse_embeddings: false")
        if self.sparse_embeddings and self.name == "sgd" and self.momentum > 0:
            raise ValueError("sgd with momentum needs sparse_embeddings: false")
        bad = {k: v for k, v in self.task_lr.items() if not v > 0}
        if bad:
            raise ValueError(f"task_lr values must be > 0, got {bad}")
        return self


class EarlyStoppingConfig(BaseModel):
    model_config = _STRICT
    patience: int = Field(default=3, ge=1)
    min_delta: float = Field(default=0.0, ge=0)


class TrainingConfig(BaseModel):
    model_config = _STRICT
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=1024, ge=1)
    eval_batch_size: int = Field(default=8192, ge=1)
    inference_block_rows: int = Field(
        default=2048,
        ge=1,
        description="evaluation and prediction batches are scored in blocks of at most this "
        "many rows (same result; keeps the activations the size of a training step's)",
    )
    optimizer: OptimizerConfig = OptimizerConfig()
    grad_clip: float | None = Field(default=None, gt=0)
    seed: int = 0
    monitor: str | None = Field(
        default=None,
        description="'task/metric' of the validation split that selects the best epoch, or "
        "'mean/metric' for the mean over tasks (default: the first task's auc, or mse for "
        "regression)",
    )
    early_stopping: EarlyStoppingConfig | None = None
    checkpoint_every_steps: int | None = Field(default=None, ge=1)
    num_threads: int | None = Field(default=None, ge=1)
    progress: bool = True
    tune_allocator: bool = Field(
        default=True,
        description="keep freed large buffers in the process heap (glibc mallopt); saves the "
        "page faults of re-allocating activations every step",
    )


class ExperimentConfig(BaseModel):
    """A whole experiment."""

    model_config = _STRICT
    version: int = CONFIG_VERSION
    data: DataConfig
    schema_: Schema | None = Field(default=None, alias="schema")
    tasks: list[str] | None = Field(
        default=None,
        description="train only these tasks of the schema (e.g. a single-task baseline)",
        min_length=1,
    )
    model: ModelConfig
    balancing: BalancingConfig = BalancingConfig()
    training: TrainingConfig = TrainingConfig()
    output_dir: str = "runs/experiment"
    base_dir: str | None = Field(default=None, exclude=True, description="folder of the YAML")

    @model_validator(mode="after")
    def _version(self) -> ExperimentConfig:
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"config version {self.version} is not supported (this mtlrec reads version "
                f"{CONFIG_VERSION})"
            )
        return self

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, source: str = "config", base_dir: str | None = None
    ) -> ExperimentConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        try:
            cfg = cls.model_validate({**data, "base_dir": base_dir})
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]).replace("schema_", "schema")
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            raise ConfigError(f"{source}: {loc}: {msg}") from None
        return cfg

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        data = apply_overrides(data, overrides or [])
        return cls.from_dict(data, source=str(path), base_dir=str(p.parent.resolve()))

    def resolve_path(self, path: str) -> str:
        """A data path relative to the config file's folder (absolute paths unchanged)."""
        p = Path(path)
        if p.is_absolute() or self.base_dir is None:
            return str(p)
        return str(Path(self.base_dir) / p)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", by_alias=True, exclude={"base_dir"})
        return yaml.safe_dump(data, sort_keys=False)

    def monitor_key(self, schema: Schema) -> tuple[str, str]:
        """The (task, metric) that selects the best epoch."""
        if self.training.monitor:
            task, _, metric = self.training.monitor.partition("/")
            if (task not in schema.task_names and task != "mean") or not metric:
                raise ConfigError(
                    f"training.monitor {self.training.monitor!r} must be 'task/metric' with a "
                    f"task among {list(schema.task_names)}, or 'mean/metric' (the metric's "
                    "mean over the tasks that report it)"
                )
            return task, metric
        t = schema.tasks[0]
        return t.name, {"binary": "auc", "regression": "mse", "multiclass": "accuracy"}[t.kind]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out
