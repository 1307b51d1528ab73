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

Any ``torch.optim`` optimiser can replace the configured one (built over the same parameter
groups), and any ``torch.optim.lr_scheduler`` scheduler the configured schedule:

    >>> import torch
    >>> trainer = Trainer(model, ds.schema, config=TrainingConfig(epochs=1, progress=False),
    ...                   optimizer=torch.optim.RMSprop,
    ...                   scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10))
    >>> type(trainer.optimizer).__name__
    'RMSprop'
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mtlrec.config import TrainingConfig, monitor_key
from mtlrec.data.batch_source import BatchSource
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.errors import CheckpointError, ConfigError
from mtlrec.losses import MultiTaskLoss
from mtlrec.metrics.metric_set import MetricSet
from mtlrec.models.base import MultiTaskModel
from mtlrec.nn.embedding import EmbeddingCollection
from mtlrec.schema import Schema
from mtlrec.train.callbacks import Callback, Checkpointer, EarlyStopping, ProgressBar, improved
from mtlrec.train.checkpoint import Checkpoint, load_checkpoint, restore_model, save_checkpoint
from mtlrec.train.freeze import announce, freeze_parameters
from mtlrec.train.optimizers import OptimizerFactory, build_optimizer, materialize_state
from mtlrec.train.placement import check_precision, grad_scaler, resolve_device
from mtlrec.train.schedulers import build_scheduler
from mtlrec.train.state import FitResult, TrainState
from mtlrec.train.step import StepContext, evaluate, score, train_step
from mtlrec.utils.runtime import configure_runtime, release_memory
from mtlrec.weighting.base import Weighting
from mtlrec.weighting.build import build_weighting


def monitored_value(
    metrics: dict[str, dict[str, float]],
    key: tuple[str, str],
    exclude: Collection[str] = (),
) -> float:
    """The monitored number: one task's metric, or (task ``mean``) its mean over the tasks
    not in ``exclude`` (the auxiliary ones: a task named in ``key`` is used whatever).

    Example:
        >>> m = {"click": {"auc": 0.7}, "buy": {"auc": 0.8}, "domain": {"auc": 0.5}}
        >>> monitored_value(m, ("mean", "auc"), exclude={"domain"})
        0.75
        >>> monitored_value(m, ("domain", "auc"), exclude={"domain"})
        0.5
    """
    task, metric = key
    if task != "mean":
        if metric not in metrics[task]:
            raise ConfigError(
                f"task {task!r} reports no metric {metric!r} (it has {sorted(metrics[task])})"
            )
        return metrics[task][metric]
    vals = [m[metric] for t, m in metrics.items() if metric in m and t not in exclude]
    if not vals:
        raise ConfigError(f"no task reports metric {metric!r}")
    return float(np.mean(vals))


class Trainer:
    """Fits a model with a balancing strategy; evaluates and predicts per task.

    Args:
        model: a registered model instance.
        schema: the tasks (and features) of the data.
        config: optimiser, schedule, epochs, batch size, clipping, monitor...
        strategy: the balancing strategy (default: static weights of 1).
        monitor: ``(task, metric)`` of the validation split that selects the best epoch
            (default: ``config.monitor``, else the first task's AUC / MSE / accuracy).
        run_dir: where checkpoints go (``checkpoints/last|best.safetensors``); None: keep the
            best weights in memory only.
        callbacks: extra hooks (a progress bar and early stopping are added from the config).
        meta: extra JSON metadata stored in checkpoints (e.g. schema fingerprint, model name).
        count_reducer: denominator reducer for distributed training (see :mod:`mtlrec.losses`).
        progress_label: the progress bar's label.
        optimizer: instead of ``config.optimizer``: a ``torch.optim.Optimizer`` class (built
            over mtlrec's parameter groups, :func:`mtlrec.train.optimizers.param_groups`, with
            ``lr`` from the config), a callable from those groups to an optimiser, or a built
            optimiser.
        scheduler: instead of ``config.scheduler``: a callable from the optimiser to a
            ``torch.optim.lr_scheduler`` scheduler, stepped after every optimiser step.
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
        optimizer: OptimizerFactory | Optimizer | None = None,
        scheduler: Callable[[Optimizer], LRScheduler] | None = None,
    ) -> None:
        self.config = config or TrainingConfig()
        configure_runtime(self.config.num_threads, self.config.tune_allocator)
        # the trainer owns placement (mtlrec.train.placement): the model moves once, here
        self.device = resolve_device(self.config.device)
        check_precision(self.device, self.config.precision)
        if self.device.type != "cpu":
            model.to(self.device)
        self.model = model
        self.schema = schema
        loss_tasks = [schema.task(t) for t in model.loss_task_names]
        self.strategy = strategy or build_weighting("static", [t.name for t in loss_tasks])
        if tuple(self.strategy.task_names) != tuple(t.name for t in loss_tasks):
            raise ConfigError(
                f"the balancing strategy weighs {list(self.strategy.task_names)} but the model "
                f"trains {[t.name for t in loss_tasks]}"
            )
        if self.device.type != "cpu":
            self.strategy.to(self.device)
        if self.config.precision == "fp16" and self.strategy.needs_grads:
            raise ConfigError(
                "training.precision: fp16 scales the loss for backward, which gradient-based "
                f"balancing ({type(self.strategy).__name__}) does not take; use bf16"
            )
        self.scaler = grad_scaler(self.device, self.config.precision)
        self.loss_fn = MultiTaskLoss(loss_tasks, count_reducer)
        for m in model.modules():
            if isinstance(m, EmbeddingCollection):
                m.sparse_grad = self.config.optimizer.sparse_embeddings
        # training.freeze: requires_grad off before the optimiser is built (no state for them)
        self.frozen = freeze_parameters(model, self.config.freeze)
        if isinstance(optimizer, Optimizer):
            self.optimizer = optimizer
        else:
            self.optimizer = build_optimizer(model, self.strategy, self.config.optimizer, optimizer)
        self._scheduler_factory = scheduler
        self.scheduler: LRScheduler | None = None  # built by fit (the horizon needs the data)
        self.metrics = MetricSet(schema)
        self.monitor = monitor if monitor is not None else monitor_key(self.config.monitor, schema)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.meta = dict(meta or {})
        cbs: list[Callback] = list(callbacks)
        if self.config.progress is True or (self.config.progress == "auto" and sys.stderr.isatty()):
            cbs.insert(0, ProgressBar(progress_label))
        if self.config.early_stopping is not None:
            es = self.config.early_stopping
            cbs.append(EarlyStopping(es.patience, es.min_delta))
        self.callbacks = cbs
        self._best_state: dict[str, Tensor] | None = None
        self._active: list[Callback] = cbs
        # run after every backward (distributed training all-reduces the gradients here)
        self.grad_sync: Callable[[], None] | None = None
        # per-task gradients of this process -> of the whole batch (multi-process training)
        self.jacobian_sync: Callable[[Tensor], Tensor] | None = None

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, path: str | Path, state: TrainState) -> None:
        save_checkpoint(
            path,
            model=self.model,
            strategy=self.strategy,
            optimizer=self.optimizer,
            meta={
                **self.meta,
                "trainer": state.to_dict(),
                **({"scheduler": self.scheduler.state_dict()} if self.scheduler else {}),
                **({"grad_scaler": self.scaler.state_dict()} if self.scaler else {}),
            },
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
        self._restore_weights(ckpt, path)
        try:
            self.strategy.load_state_dict(ckpt.strategy)
            self.optimizer.load_state_dict(ckpt.optimizer)
            if self.scheduler is not None and "scheduler" in ckpt.meta:
                self.scheduler.load_state_dict(ckpt.meta["scheduler"])
            if self.scaler is not None and "grad_scaler" in ckpt.meta:
                self.scaler.load_state_dict(ckpt.meta["grad_scaler"])
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
        announce(self.frozen)  # one line on stderr when training.freeze froze something
        ckpt_dir = self.run_dir / "checkpoints" if self.run_dir else None
        state = TrainState(monitor_key="/".join(self.monitor))
        # the scheduler before a resume: it records the base rates, then the checkpoint
        # restores the current ones and the schedule's position
        self.scheduler = self._make_scheduler(train.num_batches(cfg.batch_size))
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
        if not self.config.optimizer.sparse_embeddings and state.step == 0:
            materialize_state(self.optimizer)
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

    def _make_scheduler(self, batches_per_epoch: int) -> LRScheduler | None:
        if self._scheduler_factory is not None:
            return self._scheduler_factory(self.optimizer)
        total = self.config.epochs * batches_per_epoch
        return build_scheduler(self.optimizer, self.config.scheduler, total)

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
            scheduler=self.scheduler,
            device=self.device,
            precision=cfg.precision,
            scaler=self.scaler,
            jacobian_sync=self.jacobian_sync,
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
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        state.is_best = False
        if valid is not None:
            metrics = self.evaluate(valid)
            record["valid"] = metrics
            aux = {t.name for t in self.schema.tasks if t.auxiliary}
            value = monitored_value(metrics, self.monitor, aux)
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

    def _restore_weights(self, ckpt: Checkpoint, path: Path) -> None:
        """Load a checkpoint's model weights (a sharded trainer also reads its shard files)."""
        restore_model(self.model, ckpt.model, source=str(path))

    def _load_best(self, ckpt_dir: Path | None) -> None:
        if ckpt_dir is not None and (ckpt_dir / "best.safetensors").is_file():
            ckpt = load_checkpoint(ckpt_dir / "best.safetensors")
            self._restore_weights(ckpt, ckpt_dir / "best.safetensors")
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
            device=self.device,
            precision=self.config.precision,
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
            device=self.device,
            precision=self.config.precision,
        )
        return {k: v.numpy() for k, v in preds.items()}
