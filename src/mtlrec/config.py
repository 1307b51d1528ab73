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
import types
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mtlrec.errors import ConfigError
from mtlrec.schema import Schema

CONFIG_VERSION = 1
_STRICT = ConfigDict(extra="forbid")


class ConfigWarning(UserWarning):
    """A config that works, but not quite as written (e.g. parameters dropped when switching
    model); the CLI shows it as one ``warning:`` line on stderr."""


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
    null_values: list[str] | None = Field(
        default=None,
        description="strings read as a missing value in every column, by every reader, "
        "predict, exports and the service (saved in encoders.json; docs/data.md); default "
        "NA, N/A, NaN, nan, null, NULL, None, ? (a built-in data set may bring its own); "
        "empty cells and real nulls are always missing",
    )
    min_task_rows: int = Field(
        default=10,
        ge=1,
        description="a task with fewer valid training rows is an error (docs/data.md)",
    )
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
    vocab_counts: Literal["new", "cumulative"] = Field(
        default="new",
        description="warm start (training.init_from): new values join a vocabulary when counted "
        "min_count times on the new training rows (new), or on those plus the counts the "
        "earlier run kept (cumulative); docs/continual.md",
    )
    dense_stats: Literal["keep", "refit"] = Field(
        default="keep",
        description="warm start: keep the earlier run's dense statistics (scores stay "
        "comparable) or refit them on the new training rows",
    )

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        if (self.dataset is None) == (self.train is None):
            raise ValueError("give either data.dataset or data.train")
        return self


class ShardingConfig(BaseModel):
    """How the tables of ``embedding_backend: torchrec`` are split over processes and updated
    (docs/scale.md, :mod:`mtlrec.train.sharding_plan`)."""

    model_config = _STRICT
    row_wise_min_rows: int = Field(
        default=1_000_000,
        ge=1,
        description="tables with at least this many rows are split by rows over all processes; "
        "smaller ones are held whole by one process each (table-wise)",
    )
    tables: dict[str, Literal["table_wise", "row_wise", "column_wise"]] = Field(
        default_factory=dict, description="table -> its sharding, overriding the size rule"
    )
    optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = Field(
        default="rowwise_adagrad",
        description="the tables' optimiser, fused into backward (FBGEMM): rowwise_adagrad keeps "
        "one value per row; adagrad and adam keep one or two more copies of every table",
    )
    lr: float | None = Field(
        default=None, gt=0, description="the tables' learning rate (default training.optimizer.lr)"
    )
    eps: float = Field(default=1e-8, gt=0)


class ModelConfig(BaseModel):
    model_config = _STRICT
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    embedding_backend: Literal["torch", "torchrec"] = Field(
        default="torch",
        description="torch: the tables fused into torch embeddings, held whole by every "
        "process; torchrec: TorchRec tables sharded over the processes (docs/scale.md)",
    )
    sharding: ShardingConfig = ShardingConfig()


class BalancingConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = "static"

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


_GROUP_SETTINGS: dict[str, set[str]] = {
    "adam": {"weight_decay", "betas", "eps"},
    "adamw": {"weight_decay", "betas", "eps"},
    "adagrad": {"weight_decay", "eps"},
    "sgd": {"weight_decay", "momentum"},
    "ftrl": {"beta", "l1", "l2"},
}


class OptimizerGroupConfig(BaseModel):
    """One entry of ``training.optimizer.groups``: the model parameters whose names match
    ``params`` (fnmatch patterns over ``model.named_parameters()``) get their own optimiser
    (:mod:`mtlrec.train.optimizers`); ``ftrl`` is FTRL-Proximal (McMahan et al., KDD 2013)."""

    model_config = _STRICT
    params: list[str] = Field(
        min_length=1, description="fnmatch patterns over parameter names, e.g. 'wide.*'"
    )
    name: Literal["adam", "adamw", "adagrad", "sgd", "ftrl"]
    lr: float | None = Field(
        default=None, gt=0, description="learning rate (ftrl: alpha); default optimizer.lr"
    )
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    beta: float = Field(default=1.0, ge=0, description="ftrl: learning-rate offset")
    l1: float = Field(default=0.0, ge=0, description="ftrl: L1 strength (exact zeros)")
    l2: float = Field(default=0.0, ge=0, description="ftrl: L2 strength")

    @model_validator(mode="after")
    def _settings(self) -> OptimizerGroupConfig:
        others = {k for v in _GROUP_SETTINGS.values() for k in v} - _GROUP_SETTINGS[self.name]
        fields = type(self).model_fields
        extra = {k for k in others if getattr(self, k) != fields[k].default}  # resolved: defaults
        if extra:
            raise ValueError(
                f"{self.name} takes no {', '.join(sorted(extra))} (its settings: lr, "
                f"{', '.join(sorted(_GROUP_SETTINGS[self.name]))})"
            )
        return self


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
    groups: list[OptimizerGroupConfig] = Field(
        default_factory=list,
        description="parameter-name patterns with their own optimiser and settings (e.g. "
        "ftrl for 'wide.*', adagrad for 'embedding.*'); parameters no pattern matches stay "
        "with this optimiser (docs/tuning.md)",
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


class SchedulerConfig(BaseModel):
    """Learning-rate schedule per optimiser step (:mod:`mtlrec.train.schedulers`): a linear
    warm-up, then constant, cosine or step decay, as a multiplier of every group's rate."""

    model_config = _STRICT
    name: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = Field(default=0, ge=0, description="optimiser steps of linear warm-up")
    warmup_start: float = Field(
        default=0.01, ge=0, le=1, description="multiplier at the first step of the warm-up"
    )
    min_factor: float = Field(
        default=0.0, ge=0, le=1, description="cosine: multiplier reached at the last step"
    )
    step_size: int = Field(default=1000, ge=1, description="step: steps between decays")
    gamma: float = Field(default=0.1, gt=0, le=1, description="step: decay factor")


class PretrainedConfig(BaseModel):
    """A Parquet file of vectors an embedding table starts from (docs/continual.md)."""

    model_config = _STRICT
    path: str = Field(description="Parquet file (relative to the config)")
    id_column: str = Field(default="id", description="the values (as the feature holds them)")
    vector_column: str = Field(
        default="vector", description="a fixed-size list of floats, the table's embedding_dim"
    )


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
    scheduler: SchedulerConfig = SchedulerConfig()
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
    init_from: str | None = Field(
        default=None,
        description="warm start: an earlier run folder (relative to the working directory, as "
        "output_dir) whose weights this run starts from (vocabularies grown, new rows "
        "initialised; docs/continual.md)",
    )
    init_checkpoint: Literal["best", "last"] = Field(
        default="best", description="warm start: the earlier run's checkpoint"
    )
    init_optimizer: Literal["reset", "carry"] = Field(
        default="reset",
        description="warm start: a fresh optimiser state, or the earlier run's (rows of grown "
        "tables re-indexed, moments of new rows zero)",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="parameter name patterns (fnmatch, e.g. 'embedding.*', 'towers.click.*') "
        "that get no update and no optimiser state; mtlrec list-params RUN shows the names",
    )
    pretrained: dict[str, PretrainedConfig] = Field(
        default_factory=dict,
        description="embedding table -> a Parquet file of vectors its rows start from",
    )
    num_threads: int | None = Field(default=None, ge=1)
    progress: bool | Literal["auto"] = Field(
        default="auto",
        description="progress bar per epoch on stderr: 'auto' shows it only on a terminal",
    )
    tune_allocator: bool = Field(
        default=True,
        description="where the process opted in to process-wide tuning (the mtlrec command "
        "does; from Python: mtlrec.utils.runtime.enable_process_tuning()), keep freed large "
        "buffers in the process heap (glibc mallopt), which saves the page faults of "
        "re-allocating activations every step; false: leave the allocator alone",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="where the model trains: auto picks CUDA when torch sees a GPU, else the "
        "CPU; checkpoints, metrics and exports do not depend on it",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="autocast of the forward pass: bf16 or fp16 (fp16 with a gradient scaler); "
        "the weights and the optimiser stay float32",
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
    base_dir: str | None = Field(
        default=None,
        exclude=True,
        description="the folder relative data paths start from: the YAML's folder, unless the "
        "file names one (a run folder's config.yaml names the folder of the config it was "
        "trained from, so that it reads the same data wherever the run folder is moved)",
    )

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
        """A config from a parsed mapping.

        Args:
            data: the mapping (as read from YAML).
            source: named in error messages (the file).
            base_dir: the folder of the file; relative data paths start there, unless ``data``
                names its own ``base_dir`` (itself relative to this folder).

        Raises:
            ConfigError: one line naming the key; an unknown key gets the closest valid one.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        own = data.get("base_dir")
        if isinstance(own, str) and own:
            base_dir = str(Path(base_dir) / own) if base_dir else own
        try:
            cfg = cls.model_validate({**data, "base_dir": base_dir})
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]).replace("schema_", "schema")
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key" + _key_hint(cls, err["loc"])
            raise ConfigError(f"{source}: {loc}: {msg}") from None
        return cfg

    @classmethod
    def load(
        cls, path: str | Path, overrides: list[str] | None = None, *, strict: bool = False
    ) -> ExperimentConfig:
        """Read a YAML config and apply ``key.path=value`` overrides.

        An override of ``model.name`` switches the model as :meth:`with_model` does: the
        file's model parameters that the new model takes are kept, the others dropped with a
        :class:`ConfigWarning` (``strict``: a :class:`ConfigError` listing the new model's
        parameters instead). Parameters given by overrides (``model.params.x=...``) are always
        the new model's.
        """
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        data = apply_overrides(raw, overrides or [])
        data = _switched_model(raw, data, overrides or [], strict=strict)
        return cls.from_dict(data, source=str(path), base_dir=str(p.parent.resolve()))

    def with_model(
        self, name: str, params: dict[str, Any] | None = None, *, strict: bool = False
    ) -> ExperimentConfig:
        """This experiment with another model (what ``--set model.name=NAME`` does).

        Args:
            name: a registered model.
            params: parameters given for the new model (kept as they are; validated when the
                model is built).
            strict: refuse (:class:`ConfigError` listing the new model's parameters) instead
                of dropping the current parameters that the new model does not take.

        Returns:
            A copy whose ``model.params`` holds the current parameters the new model takes
            (a :class:`ConfigWarning` names the others, dropped), updated by ``params``.

        Example:
            >>> cfg = ExperimentConfig.from_dict({"data": {"dataset": "census-income"},
            ...     "model": {"name": "mmoe", "params": {"num_experts": 4, "tower_hidden": [8]}}})
            >>> import warnings
            >>> with warnings.catch_warnings():
            ...     warnings.simplefilter("ignore")
            ...     cfg.with_model("shared_bottom").model.params
            {'tower_hidden': [8]}
        """
        kept = switch_model_params(
            name, self.model.params, keep=params or {}, previous=self.model.name, strict=strict
        )
        model = ModelConfig(name=name, params=kept)
        return self.model_copy(update={"model": model})

    def resolve_path(self, path: str) -> str:
        """A data path relative to the config file's folder (absolute paths unchanged)."""
        p = Path(path)
        if p.is_absolute() or self.base_dir is None:
            return str(p)
        return str(Path(self.base_dir) / p)

    def to_yaml(self, *, with_base_dir: bool = False) -> str:
        """The resolved config as YAML (every default written out).

        Args:
            with_base_dir: also write ``base_dir``, the absolute folder relative data paths
                start from (a run folder's ``config.yaml`` does, so that it reads the same
                data from any working directory and wherever the folder is moved).
        """
        data = self.model_dump(mode="json", by_alias=True, exclude={"base_dir"})
        if with_base_dir:
            data["base_dir"] = str(Path(self.base_dir or ".").resolve())
        return yaml.safe_dump(data, sort_keys=False)

    def monitor_key(self, schema: Schema) -> tuple[str, str]:
        """The (task, metric) that selects the best epoch."""
        return monitor_key(self.training.monitor, schema)


def monitor_key(monitor: str | None, schema: Schema) -> tuple[str, str]:
    """``training.monitor`` as ``(task, metric)``: ``'task/metric'``, ``'mean/metric'`` (over
    the tasks but the auxiliary ones), or (None) the first non-auxiliary task's AUC (binary),
    MSE (regression) or accuracy (multiclass)."""
    if monitor:
        task, _, metric = monitor.partition("/")
        if (task not in schema.task_names and task != "mean") or not metric:
            raise ConfigError(
                f"training.monitor {monitor!r} must be 'task/metric' with a task among "
                f"{list(schema.task_names)}, or 'mean/metric' (the metric's mean over the "
                "tasks that report it)"
            )
        return task, metric
    t = schema.primary_tasks[0]
    return t.name, {"binary": "auc", "regression": "mse", "multiclass": "accuracy"}[t.kind]


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a type: ``A | B | None`` -> ``[A, B, None]`` (Annotated unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


def _is_model(x: Any) -> bool:
    return isinstance(x, type) and issubclass(x, BaseModel)


def _step(annotation: Any, part: Any) -> Any:
    """The type found at ``part`` (a key, an index or a union tag) below ``annotation``."""
    members = _members(annotation)
    for m in members:
        if _is_model(m):
            for name, f in m.model_fields.items():
                if part in (name, f.alias):
                    return f.annotation
        origin = typing.get_origin(m)
        args = typing.get_args(m)
        if isinstance(part, int) and origin in (list, tuple, Sequence) and args:
            return args[0]
        if isinstance(part, str) and origin is dict and len(args) == 2:
            return args[1]
    for m in members:  # a discriminated union: pydantic puts the tag in the path
        if _is_model(m) and any(
            typing.get_origin(f.annotation) is typing.Literal
            and part in typing.get_args(f.annotation)
            for f in m.model_fields.values()
        ):
            return m
    return None


def _key_hint(root: type[BaseModel], loc: Sequence[Any]) -> str:
    """For an unknown key at ``loc``: the closest valid key there, or the valid keys."""
    from mtlrec.registry import did_you_mean

    node: Any = root
    for part in loc[:-1]:
        node = _step(node, part)
        if node is None:
            return ""
    keys = [
        f.alias or name
        for m in _members(node)
        if _is_model(m)
        for name, f in m.model_fields.items()
    ]
    if not keys:
        return ""
    hint = did_you_mean(str(loc[-1]), keys)
    return hint if hint else f" (valid keys here: {', '.join(keys)})"


def switch_model_params(
    name: str,
    params: dict[str, Any],
    *,
    keep: dict[str, Any] | None = None,
    previous: str | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """The parameters of another model's section that model ``name`` takes.

    Args:
        name: the new model.
        params: the parameters written for the previous model.
        keep: parameters given for the new model itself (kept as they are).
        previous: the previous model's name, for messages.
        strict: raise instead of dropping.

    Returns:
        ``params`` without the keys the new model does not take, updated by ``keep``; a
        :class:`ConfigWarning` names the dropped keys.

    Raises:
        ConfigError: ``name`` is unknown, or ``strict`` and some parameter would be dropped
            (the message lists the new model's parameters).
    """
    from mtlrec.registry import MODELS

    takes = MODELS.param_names(name)
    keep = dict(keep or {})
    dropped = [k for k in params if k not in takes and k not in keep]
    was = f" (written for {previous!r})" if previous else ""
    if dropped and strict:
        raise ConfigError(
            f"model.params{was}: model {name!r} has no parameter "
            f"{', '.join(dropped)}; it takes: {', '.join(takes) or 'none'} (mtlrec list {name})"
        )
    if dropped:
        warnings.warn(
            f"model {name!r} has no parameter {', '.join(dropped)}: dropped from "
            f"model.params{was}; kept: {', '.join(k for k in params if k in takes) or 'none'} "
            f"(mtlrec list {name} shows its parameters; --strict refuses instead)",
            ConfigWarning,
            stacklevel=3,
        )
    return {**{k: v for k, v in params.items() if k in takes}, **keep}


def _switched_model(
    raw: Any, data: Any, overrides: Sequence[str], *, strict: bool
) -> dict[str, Any]:
    """``data`` (``raw`` with ``overrides`` applied) with its model parameters switched when an
    override changed ``model.name``."""
    old, new = raw.get("model") if isinstance(raw, dict) else None, None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        new = data["model"]
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return data
    name, before = new.get("name"), old.get("name")
    params = new.get("params")
    if not isinstance(name, str) or name == before or not isinstance(params, dict):
        return data
    keys = [o.partition("=")[0] for o in overrides]
    if any(k in ("model", "model.params") for k in keys):
        return data  # the whole section or its parameters were given anew
    given = {k.split(".", 2)[2] for k in keys if k.startswith("model.params.")}
    keep = {k: params[k] for k in given if k in params}
    kept = switch_model_params(
        name,
        params,
        keep=keep,
        previous=before if isinstance(before, str) else None,
        strict=strict,
    )
    return {**data, "model": {**new, "params": kept}}


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
