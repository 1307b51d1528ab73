"""The sections of an experiment config: data, sharding, model, balancing, optimiser,
schedule, training (each a pydantic model that rejects unknown keys)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
