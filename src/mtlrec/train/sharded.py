"""Training with sharded embedding tables (``model.embedding_backend: torchrec``).

The model's tables are TorchRec bags (:mod:`mtlrec.nn.torchrec_embedding`), built on ``meta``;
:class:`ShardedTrainer` places them before anything else touches them:

* **Plan**: every process computes the same plan from the table sizes
  (:mod:`mtlrec.train.sharding_plan`): small tables whole on one process, large ones split by
  rows over all, column splits on request. TorchRec shards the bags (``shard``; its all-to-all
  moves the ids to the tables and the pooled vectors back), each process allocates only its
  shards and fills them from :func:`~mtlrec.nn.torchrec_embedding.initial_rows`, so one process
  and N processes start from the same weights.
* **Tables' optimiser**: fused into backward (FBGEMM): row-wise Adagrad by default (one value
  per row of state), plain Adagrad or SGD. Their learning rate follows the dense optimiser's
  schedule. TorchRec divides the tables' gradients by the number of processes, as the dense
  gradients are averaged: with the loss normalised by the global count of valid rows
  (:func:`~mtlrec.train.distributed.global_count_reducer`), N processes train like one process
  on the whole batch.
* **Dense part**: replicated and data-parallel as in :mod:`mtlrec.train.distributed` (rank 0's
  weights at the start, one flat all-reduce of the gradients per step, global loss values for
  the balancing strategy). Gradient-based strategies are supported: the per-task gradients of
  the shared dense parameters are averaged over the processes before the strategy sees them
  (``jacobian_sync`` of :func:`~mtlrec.autograd.multitask_backward`).
* **Equal shares**: TorchRec's row-wise exchange on gloo needs the same number of rows in
  every process, so a process whose share of a batch is smaller is topped up with filler rows
  (out-of-vocabulary ids, every task masked out: no loss, no gradient), and scoring runs the
  same number of equal blocks everywhere (filler predictions are dropped).
* **Checkpoints**: every process writes its shards, process 0 the dense part and the manifest
  (:mod:`mtlrec.train.shard_checkpoint`); resuming reads the shards back, with the same or
  another number of processes.

In one process the same code runs on a private one-process group (the tables whole), so the
torchrec backend behaves alike with and without ``--nproc``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from mtlrec.batch import OOV_ID, Batch
from mtlrec.config import ConfigWarning, OptimizerConfig, ShardingConfig, TrainingConfig
from mtlrec.data.batch_source import BatchSource
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.errors import CheckpointError, ConfigError
from mtlrec.models.base import ModelOutput, MultiTaskModel
from mtlrec.nn.torchrec_embedding import TorchRecEmbeddingCollection
from mtlrec.schema import Schema
from mtlrec.train.callbacks import Callback
from mtlrec.train.checkpoint import Checkpoint, save_checkpoint
from mtlrec.train.distributed import (
    DistContext,
    GlobalLossValues,
    _RankRandomness,
    average_gradients,
    comm_device,
    global_count_reducer,
    import_dynamo_before_group,
)
from mtlrec.train.optimizers import make_optimizer
from mtlrec.train.placement import float_output, move_features, resolve_device
from mtlrec.train.shard_checkpoint import SHARD_FORMAT, ShardSet, load_into, local_pieces
from mtlrec.train.shard_checkpoint import write_rank_file as _write_rank_file
from mtlrec.train.sharding_plan import Placement, TableShape, choose_plan
from mtlrec.train.state import FitResult, TrainState
from mtlrec.train.step import forward
from mtlrec.train.trainer import Trainer


def collections_of(model: nn.Module) -> dict[str, TorchRecEmbeddingCollection]:
    """Module path -> every TorchRec embedding collection of a model."""
    return {p: m for p, m in model.named_modules() if isinstance(m, TorchRecEmbeddingCollection)}


def local_context(device: torch.device) -> DistContext:
    """This process's group: the one it joined (torchrun / ``--nproc``), or a private
    one-process group (TorchRec's sharded modules need a process group even alone)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        import_dynamo_before_group()
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistContext(dist.get_rank(), dist.get_world_size(), dist.get_backend())


def fused_optimizer(sharding: ShardingConfig, opt: OptimizerConfig) -> tuple[type, dict[str, Any]]:
    """The tables' optimiser class and arguments for TorchRec's ``apply_optimizer_in_backward``
    (each maps to an FBGEMM kernel: EXACT_ROWWISE_ADAGRAD, EXACT_ADAGRAD, EXACT_SGD)."""
    import torchrec.optim as trec_optim

    lr = sharding.lr if sharding.lr is not None else opt.lr
    if sharding.optimizer == "rowwise_adagrad":
        return trec_optim.RowWiseAdagrad, {"lr": lr, "eps": sharding.eps}
    if sharding.optimizer == "adagrad":
        return trec_optim.Adagrad, {"lr": lr, "eps": sharding.eps}
    return trec_optim.SGD, {"lr": lr}


def shard_model(
    model: nn.Module,
    context: DistContext,
    sharding: ShardingConfig,
    config: TrainingConfig,
    device: torch.device,
) -> dict[str, Placement]:
    """Shard every TorchRec collection of ``model`` in place (this process allocates its
    shards only) and return the plan (``module/table`` -> placement).

    Raises:
        ConfigError: the model has no TorchRec tables, or an override names no table.
    """
    from torchrec.distributed.types import ShardingEnv

    collections = collections_of(model)
    if not collections:
        raise ConfigError("the model has no TorchRec tables (model.embedding_backend: torch?)")
    shapes = [
        TableShape(f"{path}/{t.name}", t.rows, t.dim)
        for path, m in collections.items()
        for t in m.tables
    ]
    plan = choose_plan(
        shapes,
        context.world_size,
        row_wise_min_rows=sharding.row_wise_min_rows,
        overrides=sharding.tables,
    )
    split = [k for k, p in plan.items() if p.kind == "column_wise" and len(p.ranks) > 1]
    if split and sharding.optimizer == "rowwise_adagrad":
        warnings.warn(
            f"tables {split} are split by columns and updated by row-wise Adagrad, which keeps "
            "one state per row of each column shard: the updates differ from one process's "
            "(model.sharding.optimizer: adagrad or sgd update them exactly)",
            ConfigWarning,
            stacklevel=2,
        )
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))
    spec = fused_optimizer(sharding, config.optimizer)
    for path, m in collections.items():
        m.shard(
            {
                t.name: (plan[f"{path}/{t.name}"].kind, plan[f"{path}/{t.name}"].ranks)
                for t in m.tables
            },
            env=env,
            device=device,
            optimizer=spec,
            seed=config.seed,
            key=path,
            local_size=local,
        )
    return plan


def pad_batch(batch: Batch, rows: int) -> Batch:
    """``batch`` topped up to ``rows`` rows with filler rows: out-of-vocabulary ids, empty
    sequences, zero dense values, every task masked out (no loss and no gradient)."""
    k = rows - len(batch)
    if k <= 0:
        return batch
    f = batch.features

    def more(t: Tensor, value: float | int | bool = 0) -> Tensor:
        return torch.cat([t, t.new_full((k, *t.shape[1:]), value)])

    features = type(f)(
        more(f.sparse, OOV_ID),
        more(f.dense),
        {n: more(v) for n, v in f.sequences.items()},
        f.sparse_names,
        f.dense_names,
    )
    return Batch(
        features,
        {t: more(v) for t, v in batch.labels.items()},
        {t: more(v, False) for t, v in batch.masks.items()},
        {t: more(v) for t, v in batch.weights.items()},
        None if batch.groups is None else more(batch.groups),
    )


def gather_rows(a: np.ndarray, device: torch.device) -> np.ndarray:
    """Concatenate, in rank order, the rows of ``a`` of every process (sizes may differ)."""
    dev = comm_device(device)
    t = torch.from_numpy(np.ascontiguousarray(a)).to(dev)
    size = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts = [int(x.item()) for x in sizes]
    padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).cpu().numpy()


class EqualShares:
    """A BatchSource whose batches have the same number of rows in every process (the largest
    share of each global batch; see :func:`pad_batch`)."""

    def __init__(self, inner: Any, device: torch.device = torch.device("cpu")) -> None:
        self.inner = inner
        self.device = comm_device(device)

    @property
    def has_targets(self) -> bool:
        return bool(self.inner.has_targets)

    def __len__(self) -> int:
        return len(self.inner)

    def num_batches(self, batch_size: int) -> int:
        return int(self.inner.num_batches(batch_size))

    def batches(self, batch_size: int, **kwargs: Any) -> Iterator[Batch]:
        for batch in self.inner.batches(batch_size, **kwargs):
            top = torch.tensor([len(batch)], dtype=torch.int64, device=self.device)
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            yield pad_batch(batch, int(top.item()))


def _take(output: ModelOutput, rows: int) -> ModelOutput:
    """The first ``rows`` rows of an output (filler rows dropped)."""
    import dataclasses

    def cut(d: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v[:rows] for k, v in d.items()}

    return dataclasses.replace(
        output,
        logits=cut(output.logits),
        log_probs=cut(output.log_probs),
        gates=cut(output.gates),
        tower_inputs={},
    )


class _DenseState:
    """The model as :func:`save_checkpoint` sees it: the weights outside the TorchRec tables
    (``state_dict``, ``named_parameters``); anything else is the model's."""

    def __init__(self, model: nn.Module, state: dict[str, Tensor], tables: set[int]) -> None:
        self._model = model
        self._state = state
        self._tables = tables

    def state_dict(self) -> dict[str, Tensor]:
        return self._state

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        for n, p in self._model.named_parameters(*args, **kwargs):
            if id(p) not in self._tables:
                yield n, p

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class _BroadcastDense(Callback):
    """At the start of fit, every process takes rank 0's dense weights and strategy state."""

    def on_fit_start(self, trainer: Any, state: TrainState) -> None:
        if trainer.context.world_size == 1:
            return
        with torch.no_grad():
            tensors = [*trainer.dense_state().values(), *trainer.strategy.state_dict().values()]
            for t in tensors:
                if t.is_floating_point() or t.dtype in (torch.int64, torch.int32):
                    dist.broadcast(t, src=0)


class _TableLearningRate(Callback):
    """The tables' learning rate follows the dense optimiser's schedule (its first group's rate
    relative to its initial one)."""

    def on_fit_start(self, trainer: Any, state: TrainState) -> None:
        trainer.sync_table_lr(force=True)

    def on_step_end(self, trainer: Any, state: TrainState) -> None:
        trainer.sync_table_lr()


class ShardedTrainer(Trainer):
    """A :class:`Trainer` for a model with TorchRec tables, in one process or one process of
    a group (see the module notes).

    Takes the Trainer's arguments plus ``context`` (None: a private one-process group) and
    ``sharding`` (the plan's settings and the tables' optimiser). ``run_dir`` is required: the
    best epoch's shards are kept there. Pass the training data as this process's share
    (:class:`~mtlrec.train.distributed.RankShard`) and validation data whole.

    Raises:
        ConfigError: what sharded training cannot do (see :meth:`check_supported`).
    """

    def __init__(
        self,
        model: MultiTaskModel,
        schema: Schema,
        *,
        context: DistContext | None = None,
        sharding: ShardingConfig | None = None,
        **kwargs: Any,
    ) -> None:
        config: TrainingConfig = kwargs.get("config") or TrainingConfig()
        device = resolve_device(config.device)
        self.context = context or local_context(device)
        self.sharding = sharding or ShardingConfig()
        if kwargs.get("run_dir") is None:
            raise ConfigError(
                "sharded training keeps its checkpoints in a run folder: pass run_dir"
            )
        if config.precision == "fp16":
            raise ConfigError(
                "training.precision: fp16 scales the loss, which the tables' fused optimiser "
                "would apply unscaled; use bf16 with model.embedding_backend: torchrec"
            )
        if not self.context.is_main and config.progress:
            config = config.model_copy(update={"progress": False})
        kwargs["config"] = config
        if kwargs.get("strategy") is not None:  # refused before any table is allocated
            check_supported(kwargs["strategy"], config, self.context.world_size)
        self.collections = collections_of(model)
        self.plan = shard_model(model, self.context, self.sharding, config, device)
        fused = {id(p) for m in self.collections.values() for p in m.parameters()}
        self._fused_ids = fused
        user = kwargs.get("optimizer")
        if isinstance(user, Optimizer):
            held = {id(p) for g in user.param_groups for p in g["params"]}
            if held & fused:
                raise ConfigError(
                    "the optimizer holds TorchRec table weights; they are updated by their "
                    "fused optimiser (model.sharding.optimizer)"
                )
        else:
            kwargs["optimizer"] = self._dense_factory(config.optimizer, user)
        world = self.context.world_size
        if world > 1:
            kwargs["count_reducer"] = global_count_reducer(world)
        kwargs["callbacks"] = [
            _BroadcastDense(),
            _RankRandomness(self.context.rank),
            _TableLearningRate(),
            *kwargs.get("callbacks", ()),
        ]
        super().__init__(model, schema, **kwargs)
        self.check_supported()
        self._table_lr = self.sharding.lr if self.sharding.lr is not None else config.optimizer.lr
        self._table_factor: float | None = None
        self._dense_params = [
            p for p in model.parameters() if p.requires_grad and id(p) not in fused
        ] + [p for p in self.strategy.parameters() if p.requires_grad]
        if world > 1:
            self.loss_fn = GlobalLossValues(self.loss_fn)  # type: ignore[assignment]
            self.grad_sync = self.sync_gradients
            self.jacobian_sync = self.mean_over_processes

    def _dense_factory(self, cfg: OptimizerConfig, user: Any) -> Any:
        fused = self._fused_ids

        def build(groups: list[dict[str, Any]]) -> Optimizer:
            kept = []
            for g in groups:
                params = [p for p in g["params"] if id(p) not in fused]
                if params:
                    kept.append({**g, "params": params})
            if user is not None:
                return user(kept, lr=cfg.lr) if isinstance(user, type) else user(kept)
            return make_optimizer(kept, cfg, cfg.lr)

        return build

    def check_supported(self) -> None:
        """Refuse what sharded training cannot do exactly (see :func:`check_supported`)."""
        check_supported(self.strategy, self.config, self.context.world_size)

    # -- synchronisation ---------------------------------------------------------------------
    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Average the dense gradients over the processes (one flat all-reduce)."""
        average_gradients(self._dense_params, self.context.world_size, comm_device(self.device))

    @torch.no_grad()
    def mean_over_processes(self, jac: Tensor) -> Tensor:
        """Per-task gradients ``[T, P]`` of this process -> their mean over the processes
        (each process's losses are its share of the global mean, so the mean is the whole
        batch's gradients)."""
        total = jac.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.context.world_size

    def sync_table_lr(self, force: bool = False) -> None:
        """Set the tables' learning rate to their base rate times the dense schedule's
        factor."""
        g = self.optimizer.param_groups[0]
        factor = float(g["lr"]) / float(g.get("initial_lr", g["lr"]) or 1.0)
        if not force and factor == self._table_factor:
            return
        self._table_factor = factor
        for m in self.collections.values():
            fo = m.fused_optimizer()
            for group in fo.param_groups:
                group["lr"] = self._table_lr * factor
            fo.step()  # a fused optimiser's step only passes the rate to its kernels

    # -- weights -----------------------------------------------------------------------------
    def _is_table_key(self, key: str) -> bool:
        return any(key.startswith(f"{p}.ebc.") for p in self.collections)

    def dense_state(self) -> dict[str, Tensor]:
        """The model's state outside the TorchRec tables (views of the live tensors)."""
        return {k: v for k, v in self.model.state_dict().items() if not self._is_table_key(k)}

    def save(self, path: str | Path, state: TrainState) -> None:
        """Every process writes its shards into a new folder; process 0 then writes the dense
        checkpoint whose manifest names that folder, and removes the older ones."""
        path = Path(path)
        ctx = self.context
        tag = [f"{state.step:09d}-{secrets.token_hex(4)}" if ctx.is_main else ""]
        dist.broadcast_object_list(tag, src=0)
        rel = f"{path.stem}.shards/{tag[0]}"
        folder = path.parent / rel
        folder.mkdir(parents=True, exist_ok=True)
        entry = _write_rank_file(folder, ctx.rank, local_pieces(self.collections))
        entries: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(entries, entry)
        if ctx.is_main:
            manifest = {
                "format": SHARD_FORMAT,
                "dir": rel,
                "world_size": ctx.world_size,
                "plan": {k: [p.kind, list(p.ranks)] for k, p in self.plan.items()},
                "files": sorted(entries, key=lambda e: e["rank"]),
            }
            save_checkpoint(
                path,
                model=cast(nn.Module, _DenseState(self.model, self.dense_state(), self._fused_ids)),
                strategy=self.strategy,
                optimizer=self.optimizer,
                meta={
                    **self.meta,
                    "trainer": state.to_dict(),
                    **({"scheduler": self.scheduler.state_dict()} if self.scheduler else {}),
                    "shards": manifest,
                },
            )
            for old in (path.parent / f"{path.stem}.shards").iterdir():
                if old.name != tag[0]:
                    shutil.rmtree(old, ignore_errors=True)
        ctx.barrier()

    @torch.no_grad()
    def _restore_weights(self, ckpt: Checkpoint, path: Path) -> None:
        """The dense weights from the checkpoint, this process's shards from the shard files
        its manifest names (saved by any number of processes)."""
        manifest = ckpt.meta.get("shards")
        if not isinstance(manifest, dict):
            raise CheckpointError(
                f"{path}: a checkpoint without TorchRec shards (trained with "
                "model.embedding_backend: torch?); train anew in another output folder"
            )
        own = self.dense_state()
        missing = sorted(set(own) - set(ckpt.model))
        extra = sorted(set(ckpt.model) - set(own))
        if missing or extra:
            what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            raise CheckpointError(f"{path}: weights do not fit this model ({what})")
        for k, v in own.items():
            if v.shape != ckpt.model[k].shape:
                raise CheckpointError(
                    f"{path}: weight {k} has shape {tuple(ckpt.model[k].shape)}, the model "
                    f"expects {tuple(v.shape)}"
                )
            v.copy_(ckpt.model[k])
        load_into(ShardSet(path.parent, manifest), local_pieces(self.collections))

    # -- loops -------------------------------------------------------------------------------
    def fit(
        self,
        train: ColumnarDataset | BatchSource,
        valid: ColumnarDataset | None = None,
        *,
        resume: bool = False,
    ) -> FitResult:
        """As :meth:`Trainer.fit`; with several processes every batch has the same number of
        rows in every process (:class:`EqualShares`)."""
        if self.context.world_size > 1:
            train = cast(BatchSource, EqualShares(train, self.device))
        return super().fit(train, valid, resume=resume)

    def _share_blocks(self, data: ColumnarDataset) -> Iterator[tuple[Batch, int]]:
        """This process's contiguous share of ``data`` in blocks of equal size in every
        process: ``(block, real rows)``; the same number of blocks everywhere."""
        n, w, r = len(data), self.context.world_size, self.context.rank
        lo, hi = n * r // w, n * (r + 1) // w
        top = -(-n // w)  # the largest share
        size = min(self.config.eval_batch_size, self.config.inference_block_rows)
        for k in range(0, top, size):
            a, b = min(lo + k, hi), min(lo + k + size, hi)
            yield pad_batch(data.take(slice(a, b)), min(size, top - k)), b - a

    @torch.no_grad()  # not inference_mode: FBGEMM's CPU kernels are reached through autograd
    def _score_shares(self, data: ColumnarDataset) -> Iterator[tuple[ModelOutput, Batch]]:
        self.model.eval()
        for block, real in self._share_blocks(data):
            feats = move_features(block.features, self.device)
            out = forward(self.model, feats, self.device, self.config.precision)
            out = float_output(out, cpu=True) if self.device.type != "cpu" else out
            yield _take(out, real), block.slice(0, real)

    def evaluate(self, data: ColumnarDataset) -> dict[str, dict[str, float]]:
        """Metrics of the whole split: each process scores a share of the rows (equal blocks
        everywhere); predictions and labels are all-gathered."""
        if not data.has_targets:
            raise ConfigError(f"{data.source}: no label columns to evaluate against")
        self.metrics.reset()
        for out, block in self._score_shares(data):
            self.metrics.update(out, block)
        return self.metrics.compute(gather=lambda a: gather_rows(a, self.device))

    def predict(self, data: ColumnarDataset) -> dict[str, np.ndarray]:
        """Predictions of every row (every process gets them all)."""
        parts: dict[str, list[Tensor]] = {}
        for out, _ in self._score_shares(data):
            for k, v in out.predictions(self.schema.tasks).items():
                parts.setdefault(k, []).append(v)
        result = {}
        for t in self.schema.tasks:
            width = (t.output_dim,) if t.kind == "multiclass" else ()
            mine = torch.cat(parts[t.name]) if parts.get(t.name) else torch.empty((0, *width))
            result[t.name] = gather_rows(mine.numpy(), self.device)
        return result


def check_supported(strategy: nn.Module, config: TrainingConfig, world: int) -> None:
    """Refuse what sharded training cannot do exactly (one clear line).

    Raises:
        ConfigError: a strategy reading the whole batch's outputs or a representation's
            per-task gradients over several processes, per-task gradients of the tables,
            alternating training, sparse embedding gradients.
    """
    s, name = cast(Any, strategy), type(strategy).__name__
    if world > 1 and s.needs_outputs:
        raise ConfigError(
            f"balancing strategy {name} reads the model outputs of the whole batch, which "
            "multi-process training does not gather; train it in one process"
        )
    if world > 1 and s.needs_grads and s.grad_target == "representation":
        raise ConfigError(
            f"balancing strategy {name}: grad_target representation takes per-task "
            "gradients of each process's own rows, which cannot be combined; use "
            "grad_target: parameters"
        )
    if s.needs_grads and getattr(s, "include_embeddings", False):
        raise ConfigError(
            f"balancing strategy {name}: include_embeddings with TorchRec tables (they are "
            "updated inside backward by their fused optimiser); set it to false"
        )
    if getattr(s, "per_task_optimizers", False):
        raise ConfigError(
            f"balancing strategy {name} trains with one optimiser per task, which the "
            "tables' fused optimiser does not follow; use the torch backend"
        )
    if config.optimizer.sparse_embeddings:
        raise ConfigError(
            "training.optimizer.sparse_embeddings is for the torch backend; TorchRec tables "
            "update only the rows a batch reads already"
        )
