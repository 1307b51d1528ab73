"""One training step and one scoring pass: the work the trainer's loops call."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mtlrec.autograd import BackwardResult, multitask_backward
from mtlrec.batch import Batch
from mtlrec.errors import TrainingError
from mtlrec.losses import MultiTaskLoss
from mtlrec.metrics import MetricSet
from mtlrec.models.base import MultiTaskModel
from mtlrec.weighting.base import Weighting


@dataclass
class StepContext:
    model: MultiTaskModel
    loss_fn: MultiTaskLoss
    strategy: Weighting
    optimizer: torch.optim.Optimizer
    grad_clip: float | None = None


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
    shared = ctx.model.shared_parameters() if ctx.strategy.needs_grads else ()
    result = multitask_backward(losses, ctx.strategy, shared_parameters=shared, aux_loss=aux)  # type: ignore[arg-type]
    if ctx.grad_clip is not None:
        try:
            torch.nn.utils.clip_grad_norm_(
                ctx.model.parameters(), ctx.grad_clip, error_if_nonfinite=True
            )
        except RuntimeError:
            raise TrainingError(f"non-finite gradient norm {where}") from None
    ctx.optimizer.step()
    ctx.strategy.on_step_end(result.losses)
    return result


@torch.inference_mode()
def score(model: MultiTaskModel, batches: Iterable[Batch], tasks) -> dict[str, Tensor]:
    """Predictions (probabilities / values) of every row, task -> ``[N]`` or ``[N, C]``."""
    model.eval()
    chunks: dict[str, list[Tensor]] = {t.name: [] for t in tasks}
    for b in batches:
        preds = model(b.features).predictions(tasks)
        for k, v in preds.items():
            chunks[k].append(v)
    return {k: torch.cat(v) if v else torch.empty(0) for k, v in chunks.items()}


@torch.inference_mode()
def evaluate(
    model: MultiTaskModel, batches: Iterable[Batch], metrics: MetricSet, tasks
) -> dict[str, dict[str, float]]:
    """Per-task metrics over the given batches (state reset first)."""
    model.eval()
    metrics.reset()
    for b in batches:
        metrics.update(model(b.features).predictions(tasks), b)
    return metrics.compute()
