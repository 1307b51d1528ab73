"""One training step and one scoring pass: the work the trainer's loops call."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mtlrec.autograd import BackwardResult, multitask_backward
from mtlrec.batch import Batch, Features
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.errors import TrainingError
from mtlrec.losses import MultiTaskLoss
from mtlrec.metrics import MetricSet
from mtlrec.models.base import MultiTaskModel
from mtlrec.schema import TaskSpec
from mtlrec.train.placement import autocast, float_output, move_batch, move_features
from mtlrec.weighting.base import Weighting


@dataclass
class StepContext:
    model: MultiTaskModel
    loss_fn: MultiTaskLoss
    strategy: Weighting
    optimizer: Optimizer
    grad_clip: float | None = None
    # called after backward, before clipping: e.g. the all-reduce of distributed training
    grad_sync: Callable[[], None] | None = None
    # stepped after every optimiser step (learning-rate schedule)
    scheduler: LRScheduler | None = None
    # placement and precision (mtlrec.train.placement); None: where the batch is
    device: torch.device | None = None
    precision: str = "fp32"
    # fp16's gradient scaler (torch.amp.GradScaler)
    scaler: Any = None
    # per-task gradients of this process -> of the whole batch (multi-process training)
    jacobian_sync: Callable[[Tensor], Tensor] | None = None


def forward(model: MultiTaskModel, features: Features, device: Any, precision: str) -> Any:
    """The model's forward pass under the configured precision: the one place that autocasts.
    Outputs come back in float32 (on the model's device)."""
    with autocast(device, precision):
        output = model(features)
    return float_output(output) if precision != "fp32" else output


def train_step(ctx: StepContext, batch: Batch, *, where: str = "") -> BackwardResult:
    """Forward, losses, the finite-loss guard, backward through the strategy, clip, update.

    Raises:
        TrainingError: a task's loss, or a gradient, is NaN or infinite; the message names
            ``where`` (epoch / step), the task and, for a gradient, the parameter (see
            :func:`check_gradients`).
    """
    ctx.model.train()
    batch = move_batch(batch, ctx.device)
    rng = torch.get_rng_state()  # a few KB: lets a gradient failure replay this forward
    output = forward(ctx.model, batch.features, ctx.device, ctx.precision)
    losses = ctx.loss_fn(output, batch)
    vec = torch.stack([losses[t] for t in ctx.strategy.task_names])  # [T]
    if not bool(torch.isfinite(vec).all()):
        bad = [
            t
            for t, v in zip(ctx.strategy.task_names, vec.tolist(), strict=True)
            if not np.isfinite(v)
        ]
        raise TrainingError(
            f"non-finite loss for task {bad[0]!r} {where} (losses: "
            + ", ".join(
                f"{t}={v:.4g}" for t, v in zip(ctx.strategy.task_names, vec.tolist(), strict=True)
            )
            + "); check the inputs and labels of this batch, or lower the learning rate"
        )
    aux = sum(output.aux_losses.values()) if output.aux_losses else None
    scale = None if ctx.scaler is None else ctx.scaler.scale(torch.ones((), device=vec.device))
    ctx.optimizer.zero_grad(set_to_none=True)
    strategy = ctx.strategy
    if strategy.needs_outputs:
        strategy.observe(output, batch)
    use_params = strategy.needs_grads and strategy.grad_target == "parameters"
    shared = strategy.grad_parameters(ctx.model) if use_params else ()
    result = multitask_backward(
        losses,  # type: ignore[arg-type]
        strategy,
        shared_parameters=shared,
        aux_loss=aux,
        representation=output.tower_inputs,
        counts=getattr(losses, "counts", None),  # tasks without a valid row are absent
        jacobian_sync=ctx.jacobian_sync,
        grad_scale=scale,
    )
    if ctx.grad_sync is not None:
        ctx.grad_sync()
    if ctx.scaler is not None:  # fp16: unscale; a step with an overflow is skipped
        ctx.scaler.unscale_(ctx.optimizer)
        if ctx.grad_clip is not None:
            clip_grad_norm(ctx.model.parameters(), ctx.grad_clip)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    elif ctx.grad_clip is None:
        check_gradients(ctx, batch, result, where=where, rng_state=rng)
    else:  # the clipping norm is the finiteness check; a non-finite one is then explained
        norm = clip_grad_norm(ctx.model.parameters(), ctx.grad_clip)
        if not math.isfinite(norm):
            check_gradients(ctx, batch, result, where=where, rng_state=rng)
            raise TrainingError(
                f"the gradient norm overflows {where}: every entry is finite, but too large to "
                "clip; lower the learning rate"
            )
    if ctx.scaler is None:
        ctx.optimizer.step()
    if ctx.scheduler is not None:
        ctx.scheduler.step()
    if strategy.needs_rescore:  # e.g. FAMO: the same batch's losses after the update
        strategy.after_update(result.losses, lambda: rescore_losses(ctx, batch))
    ctx.strategy.on_step_end(result.losses)
    return result


@torch.no_grad()
def gradients_finite(grads: Sequence[Tensor]) -> bool:
    """Whether every entry of every gradient is finite. Sparse gradients are checked on their
    values.

    The fast path is one fused pass and one host sync: the L2 norms of all the tensors
    (``torch._foreach_norm``, one kernel per device and dtype on accelerators), summed; a NaN
    or infinite entry makes that sum non-finite. Only when it is not finite (a bad entry, or a
    finite gradient so large that its norm overflows) is each tensor checked entry by entry,
    which settles the answer exactly."""
    flat = [g._values() if g.is_sparse else g for g in grads]
    if not flat:
        return True
    norms = torch._foreach_norm(flat)
    if len({n.dtype for n in norms}) > 1:
        norms = [n.to(torch.float64) for n in norms]
    if bool(torch.isfinite(torch.stack(norms).sum())):
        return True
    return all(bool(torch.isfinite(g).all()) for g in flat)


def check_gradients(
    ctx: StepContext,
    batch: Batch,
    result: BackwardResult,
    *,
    where: str = "",
    rng_state: Tensor | None = None,
) -> None:
    """Raise if a gradient is NaN or infinite, naming the parameter and the task behind it.

    The fast check is :func:`gradients_finite` over every gradient, at every step. Only when it
    fails: the offending parameters are found, and since the step's gradient mixes the tasks
    (weighted, or combined by a gradient strategy), each task's own gradient on them is
    recomputed from a second forward pass of the batch (the CPU random state of the step's
    forward replayed, so dropout repeats) to find which task produces the non-finite value.
    When no single task does, the combination is to blame (the strategy's weights, or the
    gradient synchronisation) and the message says so.

    Raises:
        TrainingError: a gradient is not finite.
    """
    named = [(n, p, g) for n, p in ctx.model.named_parameters() if (g := p.grad) is not None]
    if gradients_finite([g for _, _, g in named]):
        return
    bad = [(n, p) for n, p, g in named if not gradients_finite([g])]
    shown = ", ".join(repr(n) for n, _ in bad[:3]) + (
        f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    )
    names = ctx.strategy.task_names
    culprits, aux = _nonfinite_sources(ctx, batch, [p for _, p in bad], rng_state)
    losses = ", ".join(f"{t}={v:.4g}" for t, v in zip(names, result.losses.tolist(), strict=True))
    if culprits or aux:
        blame = (
            f"task {culprits[0]!r}" + (f" (and {culprits[1:]})" if len(culprits) > 1 else "")
            if culprits
            else f"the model's auxiliary losses {aux}"
        )
        why = (
            f"recomputed per task, {blame} alone gives a non-finite gradient there, while its "
            f"loss is finite (losses: {losses}): a numerically unstable loss or layer (e.g. a "
            "power or a division at a saturated output), or a learning rate that is too high"
        )
    else:
        weights = ", ".join(
            f"{t}={v:.4g}" for t, v in zip(names, result.weights.tolist(), strict=True)
        )
        why = (
            "recomputed per task, every task's own gradient is finite there: the non-finite "
            f"value comes from combining them, by the balancing strategy "
            f"{type(ctx.strategy).__name__} (weights: {weights}) or the gradient "
            "synchronisation between processes"
        )
    raise TrainingError(f"non-finite gradient {where} in parameter {shown}; {why}")


def _nonfinite_sources(
    ctx: StepContext,
    batch: Batch,
    params: Sequence[torch.nn.Parameter],
    rng_state: Tensor | None,
) -> tuple[list[str], list[str]]:
    """The tasks (and auxiliary losses) whose own gradient on ``params`` is not finite, from
    one more forward pass of ``batch`` (failure path only)."""

    def nonfinite(loss: Tensor) -> bool:
        if not loss.requires_grad:
            return False
        grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        return not gradients_finite([g for g in grads if g is not None])

    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        output = ctx.model(batch.features)
        losses = ctx.loss_fn(output, batch)
        tasks = [t for t in ctx.strategy.task_names if nonfinite(losses[t])]
        aux = [k for k, v in output.aux_losses.items() if nonfinite(v)]
    return tasks, aux


@torch.no_grad()
def rescore_losses(ctx: StepContext, batch: Batch) -> Tensor:
    """The losses ``[T]`` (strategy order) of ``batch`` under the current parameters: one
    forward pass without gradient, in training mode like the step's own."""
    losses = ctx.loss_fn(ctx.model(batch.features), batch)
    return torch.stack([losses[t] for t in ctx.strategy.task_names]).detach()


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Scale all gradients (dense and sparse) so that their global L2 norm is at most
    ``max_norm``; returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sq = [(g.coalesce().values() if g.is_sparse else g).pow(2).sum() for g in grads]
    norm = float(torch.stack(sq).sum().sqrt())
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm


def _blocks(batch: Batch, rows: int) -> Iterable[tuple[int, Batch]]:
    n = len(batch)
    if n <= rows:
        yield 0, batch
        return
    for lo in range(0, n, rows):
        yield lo, batch.slice(lo, lo + rows)


@torch.inference_mode()
def score(
    model: MultiTaskModel,
    data: ColumnarDataset,
    tasks: Sequence[TaskSpec],
    batch_size: int,
    block_rows: int = 2048,
    *,
    device: torch.device | None = None,
    precision: str = "fp32",
) -> dict[str, Tensor]:
    """Predictions (probabilities / values) of every row, task -> ``[N]`` or ``[N, C]``.

    Data batches of ``batch_size`` rows are scored in blocks of at most ``block_rows`` rows:
    the same result, and the activations are the size of a training step's, so scoring after
    training reuses the memory training already holds instead of adding its own. Results are
    written into tensors allocated once (many small allocations between large buffers would
    fragment the heap).
    """
    model.eval()
    n = len(data)
    out = {
        t.name: torch.empty((n, t.output_dim) if t.kind == "multiclass" else (n,)) for t in tasks
    }
    start = 0
    for b in data.batches(batch_size):
        for lo, block in _blocks(b, block_rows):
            output = forward(model, move_features(block.features, device), device, precision)
            preds = output.predictions(tasks)
            a, z = start + lo, start + lo + len(block)
            for k, v in preds.items():
                out[k][a:z] = v
        start += len(b)
    return out


@torch.inference_mode()
def evaluate(
    model: MultiTaskModel,
    batches: Iterable[Batch],
    metrics: MetricSet,
    tasks: Sequence[TaskSpec],
    block_rows: int = 2048,
    *,
    device: torch.device | None = None,
    precision: str = "fp32",
) -> dict[str, dict[str, float]]:
    """Per-task metrics over the given batches (state reset first; blocks as in
    :func:`score`).

    The metric set gets the model's outputs (logits, and log-probabilities of derived tasks),
    not probabilities: float32 rounds every probability above ``1 - 6e-8`` to 1.0, and ranking
    metrics computed on those ties go wrong. ``tasks`` are the model's tasks; the metric set
    evaluates those of its own schema.
    """
    model.eval()
    metrics.reset()
    for b in batches:
        for _, block in _blocks(b, block_rows):
            output = forward(model, move_features(block.features, device), device, precision)
            if device is not None and device.type != "cpu":
                output = float_output(output, cpu=True)
            metrics.update(output, block)
    return metrics.compute()
