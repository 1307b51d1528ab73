"""Per-task losses on logits, over each task's sample space and sample weights.

For task t with mask m, weights w and per-row loss l (on logits, or on log-probabilities for
derived tasks such as ESMM's pCTCVR):

    L_t = sum_i m_i * w_i * l_i / N_t,   N_t = sum_i m_i   (L_t = 0 when N_t = 0)

so a task's loss is a mean over its valid rows (invariant to batch size), sample weights are
multipliers on the per-row loss (uniform weights of 1 give the unweighted mean), and a batch
with no valid row gives exactly 0 with zero gradient (never NaN). Masked rows contribute
exactly zero gradient: they are removed with ``torch.where``, not multiplied by 0.

Under data parallelism the denominator must be the global count of valid rows, not each
process's: ``count_reducer`` maps the local count to ``global_count / world_size`` (DDP then
averages the gradients over the processes, which restores the global mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrec.batch import Batch
from mtlrec.models.base import ModelOutput
from mtlrec.schema import TaskSpec

_LOG_HALF = -math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative x."""
    return torch.where(x > _LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binary_loss_from_log_prob(log_p: Tensor, y: Tensor) -> Tensor:
    """Binary cross-entropy of a probability given as ``log p`` (no logit exists)."""
    log_p = log_p.clamp(max=-1e-7)
    return -(y * log_p + (1.0 - y) * log1mexp(log_p))


def focal_loss_with_logits(z: Tensor, y: Tensor, gamma: float, alpha: float | None) -> Tensor:
    """Focal loss (Lin et al., ICCV 2017): ``-alpha_t (1 - p_t)^gamma log p_t``, per row."""
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")  # -log p_t
    p_t = torch.exp(-bce)
    loss = (1.0 - p_t).pow(gamma) * bce
    if alpha is not None:
        loss = loss * (alpha * y + (1.0 - alpha) * (1.0 - y))
    return loss


def per_row_loss(task: TaskSpec, output: ModelOutput, y: Tensor) -> Tensor:
    """Unreduced loss of one task, ``[B]``."""
    if task.name in output.log_probs:
        return binary_loss_from_log_prob(output.log_probs[task.name], y)
    z = output.logits[task.name]
    name = task.loss_name
    if name == "bce":
        return F.binary_cross_entropy_with_logits(z, y, reduction="none")
    if name == "focal":
        return focal_loss_with_logits(z, y, task.focal_gamma, task.focal_alpha)
    if name == "mse":
        return (z - y).square()
    if name == "huber":
        return F.huber_loss(z, y, reduction="none", delta=task.huber_delta)
    return F.cross_entropy(z, y.long(), reduction="none")


class MultiTaskLoss(nn.Module):
    """Masked, weighted mean loss per task.

    Args:
        tasks: the tasks to compute (each must be in the model's outputs).
        count_reducer: maps a local count of valid rows to the denominator to use
            (distributed training); identity by default.

    Returns (forward):
        task -> scalar loss.

    Example:
        >>> import torch
        >>> from mtlrec.schema import TaskSpec
        >>> from mtlrec.models.base import ModelOutput
        >>> from mtlrec.batch import Batch, Features
        >>> t = TaskSpec(name="ctr", kind="binary")
        >>> b = Batch(Features(torch.zeros(2, 0, dtype=torch.int32), torch.zeros(2, 0)),
        ...           {"ctr": torch.tensor([1.0, 0.0])}, {"ctr": torch.tensor([True, False])},
        ...           {"ctr": torch.ones(2)})
        >>> out = ModelOutput({"ctr": torch.tensor([0.0, 50.0])})
        >>> round(MultiTaskLoss([t])(out, b)["ctr"].item(), 4)  # only the first row counts
        0.6931
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        count_reducer: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.count_reducer = count_reducer

    def forward(self, output: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for t in self.tasks:
            m = batch.masks[t.name]
            # labels and weights outside the mask may be anything (NaN, out of range): replace
            # them before the loss, or 0 * NaN would reach the gradient
            y = torch.where(m, batch.labels[t.name], 0.0)
            w = torch.where(m, batch.weights[t.name], 0.0)
            row = per_row_loss(t, output, y)  # [B]
            total = torch.where(m, row * w, torch.zeros_like(row)).sum()
            count = m.sum().to(row.dtype)
            if self.count_reducer is not None:
                count = self.count_reducer(count)
            # count may be fractional under DDP (global / world); 0 only if no valid row anywhere
            losses[t.name] = total / torch.where(count > 0, count, torch.ones_like(count))
        return losses
