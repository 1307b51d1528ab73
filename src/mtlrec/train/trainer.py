"""The trainer: loops over epochs and batches; the work is in :mod:`mtlrec.train.step`.

Example:
    >>> from mtlrec.testing import tiny_dataset
    >>> from mtlrec.models import build_model
    >>> from mtlrec.config import TrainingConfig
    >>> pre, ds = tiny_dataset(n=64)
    >>> model = build_model("mmoe", ds.schema, pre.table_sizes(), {"expert_hidden": [8]})
    >>> trainer = Trainer(model, ds.schema, config=TrainingConfig(epochs=1, batch_size=32,
    ...                                                          progress=False))
    >>> result = trainer.fit(ds, ds)
    >>> sorted(trainer.evaluate(ds))
    ['click', 'watch']
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlrec.config import TrainingConfig
from mtlrec.data.batch_source import BatchSource
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.errors import CheckpointError, ConfigError
from mtlrec.losses import MultiTaskLoss
from mtlrec.metrics import MetricSet
from mtlrec.models.base import MultiTaskModel
from mtlrec.nn.embedding import EmbeddingCollection
from mtlrec.schema import Schema
from mtlrec.train.callbacks import Callback, Checkpointer, EarlyStopping, ProgressBar, improved
from mtlrec.train.checkpoint import load_checkpoint, restore_model, save_checkpoint
from mtlrec.train.optim import build_optimizer
from mtlrec.train.step import StepContext, evaluate, score, train_step
from mtlrec.utils.runtime import configure_runtime, release_memory
from mtlrec.weighting.base import Weighting
from mtlrec.weighting.build import build_weighting


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint, so a resumed run continues exactly."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    monitor_key: str = ""
    best_value: float | None = None
    best_epoch: int | None = None
    epochs_since_best: int = 0
    loss_sums: list[float] = field(default_factory=list)
    loss_batches: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    should_stop: bool = False
    stop_reason: str = ""
    is_best: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("is_best")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**d)


@dataclass
class FitResult:
    best_epoch: int | None
    best_value: float | None
    monitor: str
    epochs_run: int
    stop_reason: str
    history: list[dict[str, Any]]


def monitored_value(metrics: dict[str, dict[str, float]], key: tuple[str, str]) -> float:
    """The monitored number: one task's metric, or (task ``mean``) its mean over tasks."""
    task, metric = key
    if task != "mean":
        if metric not in metrics[task]:
            raise ConfigError(
                f"task {task!r} reports no metric {metric!r} (it has {sorted(metrics[task])})"
            )
        return metrics[task][metric]
    vals = [m[metric] for m in metrics.values() if metric in m]
    if not vals:
        raise ConfigError(f"no task reports metric {metric!r}")
    return float(np.mean(vals))


class Trainer:
    """Fits a model with a balancing strategy; evaluates and predicts per task.

    Args:
        model: a registered model instance.
        schema: the tasks (and features) of the data.
        config: optimiser, epochs, batch size, clipping, monitor...
        strategy: the balancing strategy (default: static weights of 1).
        monitor: ``(task, metric)`` of the validation split that selects the best epoch.
        run_dir: where checkpoints go (``checkpoints/last|best.safetensors``); None: keep the
            best weights in memory only.
        callbacks: extra hooks (a progress bar and early stopping are added from the config).
        meta: extra JSON metadata stored in checkpoints (e.g. schema fingerprint, model name).
        count_reducer: denominator reducer for distributed training (see :mod:`mtlrec.losses`).
    """

    def __init__(
        self,
        model: MultiTaskModel,
        schema: Schema,
        *,
        config: TrainingConfig | None = None,
        strategy: Weighting | None = None,
        monitor: tuple[str, str] | None = None,
        run_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        meta: dict[str, Any] | None = None,
        count_reducer: Callable[[Tensor], Tensor] | None = None,
        progress_label: str = "train",
    ) -> None:
        self.config = config or TrainingConfig()
        configure_runtime(self.config.num_threads, self.config.tune_allocator)
        self.model = model
        self.schema = schema
        loss_tasks = [schema.task(t) for t in model.loss_task_names]
        self.strategy = strategy or build_weighting("static", [t.name for t in loss_tasks])
        if tuple(self.strategy.task_names) != tuple(t.name for t in loss_tasks):
            raise ConfigError(
                f"the balancing strategy weighs {list(self.strategy.task_names)} but the model "
                f"trains {[t.name for t in loss_tasks]}"
            )
        self.loss_fn = MultiTaskLoss(loss_tasks, count_reducer)
        for m in model.modules():
            if isinstance(m, EmbeddingCollection):
                m.sparse_grad = self.config.optimizer.sparse_embeddings
        self.optimizer = build_optimizer(model, self.strategy, self.config.optimizer)
        self.metrics = MetricSet(schema)
        if monitor is None:
            t0 = schema.tasks[0]
            monitor = (t0.name, {"binary": "auc", "regression": "mse"}.get(t0.kind, "accuracy"))
        self.monitor = monitor
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.meta = dict(meta or {})
        cbs: list[Callback] = list(callbacks)
        if self.config.progress:
            cbs.insert(0, ProgressBar(progress_label))
        if self.config.early_stopping is not None:
            es = self.config.early_stopping
            cbs.append(EarlyStopping(es.patience, es.min_delta))
        self.callbacks = cbs
        self._best_state: dict[str, Tensor] | None = None
        self._active: list[Callback] = cbs
        # run after every backward (distributed training all-reduces the gradients here)
        self.grad_sync: Callable[[], None] | None = None

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, path: str | Path, state: TrainState) -> None:
        save_checkpoint(
            path,
            model=self.model,
            strategy=self.strategy,
            optimizer=self.optimizer,
            meta={**self.meta, "trainer": state.to_dict()},
        )

    def _resume(self, path: Path) -> TrainState:
        ckpt = load_checkpoint(path)
        for key in ("schema_fingerprint", "model"):
            if key in self.meta and ckpt.meta.get(key) != self.meta[key]:
                raise CheckpointError(
                    f"{path}: checkpoint {key} {ckpt.meta.get(key)!r} does not match this run's "
                    f"{self.meta[key]!r} (another schema or model; use a new output_dir)"
                )
        if "trainer" not in ckpt.meta or ckpt.optimizer is None:
            raise CheckpointError(
                f"{path}: not a training checkpoint (no trainer or optimizer state); it can be "
                "scored but not resumed"
            )
        restore_model(self.model, ckpt.model, source=str(path))
        try:
            self.strategy.load_state_dict(ckpt.strategy)
            self.optimizer.load_state_dict(ckpt.optimizer)
            state = TrainState.from_dict(ckpt.meta["trainer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{path}: cannot resume from it ({str(e).splitlines()[0]})"
            ) from None
        if ckpt.rng is not None:
            torch.set_rng_state(ckpt.rng)
        return state

    # -- loops -----------------------------------------------------------------------------
    def fit(
        self,
        train: ColumnarDataset | BatchSource,
        valid: ColumnarDataset | None = None,
        *,
        resume: bool = False,
    ) -> FitResult:
        """Train for ``config.epochs`` epochs (or until early stopping).

        The best epoch is chosen on ``valid`` only (never on a test split); its weights are
        kept (``best.safetensors`` in the run folder) and loaded back at the end.
        """
        cfg = self.config
        if not train.has_targets:
            raise ConfigError("the training data has no label columns")
        ckpt_dir = self.run_dir / "checkpoints" if self.run_dir else None
        state = TrainState(monitor_key="/".join(self.monitor))
        last = ckpt_dir / "last.safetensors" if ckpt_dir else None
        if resume and last is not None and last.is_file():
            state = self._resume(last)
        else:
            torch.manual_seed(cfg.seed)
        callbacks = list(self.callbacks)
        if ckpt_dir is not None:
            # checkpoints before the log: the log is rewritten from the checkpoint's history
            # on resume, so it never holds an epoch the checkpoint does not know
            callbacks.insert(0, Checkpointer(ckpt_dir, cfg.checkpoint_every_steps))
        self._active = callbacks
        tasks = self.strategy.task_names
        if not self.config.optimizer.sparse_embeddings:
            self.optimizer.materialize()
        release_memory()
        for cb in callbacks:
            cb.on_fit_start(self, state)
        while state.epoch < cfg.epochs and not state.should_stop:
            self._run_epoch(train, valid, state, tasks)
        for cb in callbacks:
            cb.on_fit_end(self, state)
        self.optimizer.zero_grad(set_to_none=True)
        self._load_best(ckpt_dir)
        release_memory()
        return FitResult(
            state.best_epoch,
            state.best_value,
            state.monitor_key,
            state.epoch,
            state.stop_reason,
            state.history,
        )

    def _run_epoch(
        self,
        train: ColumnarDataset | BatchSource,
        valid: ColumnarDataset | None,
        state: TrainState,
        tasks: Sequence[str],
    ) -> None:
        cfg = self.config
        ctx = StepContext(
            self.model,
            self.loss_fn,
            self.strategy,
            self.optimizer,
            cfg.grad_clip,
            grad_sync=self.grad_sync,
        )
        nb = train.num_batches(cfg.batch_size)
        for cb in self._active:
            cb.on_epoch_start(self, state, nb)
        acc = torch.tensor(state.loss_sums or [0.0] * len(tasks), dtype=torch.float64)
        t0 = time.perf_counter()
        rows = 0
        for batch in train.batches(
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            epoch=state.epoch,
            start=state.batch_in_epoch,
        ):
            where = f"at epoch {state.epoch + 1}, batch {state.batch_in_epoch + 1}"
            res = train_step(ctx, batch, where=where)
            acc += res.losses.to(torch.float64)
            rows += len(batch)
            state.batch_in_epoch += 1
            state.step += 1
            state.loss_batches += 1
            if self._active:
                state.loss_sums = acc.tolist()
                for cb in self._active:
                    cb.on_step_end(self, state)
        elapsed = time.perf_counter() - t0
        state.train_seconds += elapsed
        self.strategy.on_epoch_end(state.epoch)
        record: dict[str, Any] = {
            "epoch": state.epoch + 1,
            "step": state.step,
            "train_loss": {
                t: v / max(state.loss_batches, 1) for t, v in zip(tasks, acc.tolist(), strict=True)
            },
            "samples_per_s": rows / elapsed if elapsed > 0 else float("nan"),
            "seconds": elapsed,
        }
        state.is_best = False
        if valid is not None:
            metrics = self.evaluate(valid)
            record["valid"] = metrics
            value = monitored_value(metrics, self.monitor)
            metric = self.monitor[1]
            record["monitor"] = {"key": state.monitor_key, "value": value}
            if improved(
                metric,
                value,
                state.best_value,
                cfg.early_stopping.min_delta if cfg.early_stopping else 0.0,
            ):
                state.best_value, state.best_epoch = value, state.epoch + 1
                state.epochs_since_best = 0
                state.is_best = True
                if self.run_dir is None:
                    self._best_state = {
                        k: v.detach().clone() for k, v in self.model.state_dict().items()
                    }
            else:
                state.epochs_since_best += 1
        for cb in self._active:
            cb.on_epoch_record(self, state, record)
        state.history.append(record)
        state.epoch += 1
        state.batch_in_epoch = 0
        state.loss_sums = []
        state.loss_batches = 0
        for cb in self._active:
            cb.on_epoch_end(self, state, record)

    def _load_best(self, ckpt_dir: Path | None) -> None:
        if ckpt_dir is not None and (ckpt_dir / "best.safetensors").is_file():
            ckpt = load_checkpoint(ckpt_dir / "best.safetensors")
            restore_model(self.model, ckpt.model, source=str(ckpt_dir / "best.safetensors"))
            self.strategy.load_state_dict(ckpt.strategy)
        elif self._best_state is not None:
            self.model.load_state_dict(self._best_state)

    # -- scoring ---------------------------------------------------------------------------
    def evaluate(self, data: ColumnarDataset) -> dict[str, dict[str, float]]:
        """Per-task metrics on a labelled data set (each task over its own mask)."""
        if not data.has_targets:
            raise ConfigError(f"{data.source}: no label columns to evaluate against")
        release_memory()
        return evaluate(
            self.model,
            data.batches(self.config.eval_batch_size),
            self.metrics,
            self.schema.tasks,
            self.config.inference_block_rows,
        )

    def predict(self, data: ColumnarDataset) -> dict[str, np.ndarray]:
        """Predictions of every row: probabilities (binary), values (regression) or class
        probabilities (multiclass)."""
        release_memory()
        preds = score(
            self.model,
            data,
            self.schema.tasks,
            self.config.eval_batch_size,
            self.config.inference_block_rows,
        )
        return {k: v.numpy() for k, v in preds.items()}
