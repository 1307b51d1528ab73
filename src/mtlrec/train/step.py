"""One training step and one scoring pass: the work the trainer's loops call."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mtlrec.autograd import BackwardResult, multitask_backward
from mtlrec.batch import Batch
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.errors import TrainingError
from mtlrec.losses import MultiTaskLoss
from mtlrec.metrics import MetricSet
from mtlrec.models.base import MultiTaskModel
from mtlrec.schema import TaskSpec
from mtlrec.train.optimizers import Optimizer
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


def train_step(ctx: StepContext, batch: Batch, *, where: str = "") -> BackwardResult:
    """Forward, losses, the finite-loss guard, backward through the strategy, clip, update.

    Raises:
        TrainingError: a task's loss (or the gradient norm) is NaN or infinite; the message
            names the task and ``where`` (epoch / step).
    """
    ctx.model.train()
    output = ctx.model(batch.features)
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
    )
    if ctx.grad_sync is not None:
        ctx.grad_sync()
    if ctx.grad_clip is not None:
        norm = clip_grad_norm(ctx.model.parameters(), ctx.grad_clip)
        if not math.isfinite(norm):
            raise TrainingError(f"non-finite gradient norm {where}")
    ctx.optimizer.step()
    ctx.strategy.on_step_end(result.losses)
    return result


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
            preds = model(block.features).predictions(tasks)
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
) -> dict[str, dict[str, float]]:
    """Per-task metrics over the given batches (state reset first; blocks as in
    :func:`score`)."""
    model.eval()
    metrics.reset()
    for b in batches:
        for _, block in _blocks(b, block_rows):
            metrics.update(model(block.features).predictions(tasks), block)
    return metrics.compute()
