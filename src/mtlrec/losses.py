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
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative x.

    Two forms, each used where it is accurate (Maechler, "Accurately Computing
    log(1 - exp(-|a|))", 2012): ``log(-expm1(x))`` above ``-log 2``, ``log1p(-exp(x))`` below.
    Each form only ever sees inputs from its own side, so the unused one cannot put an
    infinite value (and then NaN) into the gradient.
    """
    near = x > _LOG_HALF
    upper = torch.log(-torch.expm1(torch.where(near, x, _LOG_HALF)))
    lower = torch.log1p(-torch.exp(torch.where(near, _LOG_HALF, x)))
    return torch.where(near, upper, lower)


def binary_loss_from_log_prob(log_p: Tensor, y: Tensor) -> Tensor:
    """Binary cross-entropy of a probability given as ``log p`` (no logit exists), per row:
    ``-(y log p + (1 - y) log(1 - p))`` with ``log(1 - p) = log1mexp(log p)``.

    No clamp near ``p = 1``: with ESMM's ``log pCTCVR = log_sigmoid(z_ctr) +
    log_sigmoid(z_cvr)`` (Ma et al., SIGIR 2018), a confident false positive is charged its
    exact loss (29.3 at logits (30, 30)) and gets its full gradient. The result is exact to the
    precision of ``log p`` and the gradient is finite for every ``log p <= 0``: only
    ``|log p| < tiny / eps`` (about 1e-31 in float32, i.e. both ESMM logits above about 70),
    where ``1 / |log p|`` would leave the gradient no headroom before overflow, is held at that
    bound, with zero gradient there.
    """
    info = torch.finfo(log_p.dtype)
    bound = info.tiny / info.eps  # float32: ~9.9e-32; float64: ~1e-292
    safe = torch.where(log_p < -bound, log_p, torch.full_like(log_p, -bound))
    return -(y * log_p + (1.0 - y) * log1mexp(safe))


def _focal_one_class(z: Tensor, gamma: float) -> Tensor:
    """Focal loss of label 1 at logit ``z``: ``sigmoid(-z)^gamma * softplus(-z)``, written as
    ``exp(gamma * log_sigmoid(-z)) * -log_sigmoid(z)`` so that no step divides by or raises
    ``0`` to a negative power: the value and the gradient are finite at every finite logit,
    for every ``gamma >= 0`` (``(1 - p)^gamma`` with ``gamma < 1`` has an infinite derivative
    at ``p = 1``, which float32 reaches at ``|z| > 17``)."""
    return torch.exp(gamma * F.logsigmoid(-z)) * -F.logsigmoid(z)


def focal_loss_with_logits(z: Tensor, y: Tensor, gamma: float, alpha: float | None) -> Tensor:
    """Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, Eq. 5),
    per row: ``-alpha_t (1 - p_t)^gamma log p_t``.

    A label ``y`` in [0, 1] gives ``y * FL(z | 1) + (1 - y) * FL(z | 0)``: exactly Eq. 5 for
    labels 0 and 1 (the data layer's binary labels), and for ``gamma = 0`` and no ``alpha``
    exactly the binary cross-entropy, soft labels included. Each class's term is computed in
    log space (see :func:`_focal_one_class`): finite value and gradient at every finite logit.

    Args:
        z: logits.
        y: labels (0/1; soft labels as above).
        gamma: focusing parameter, ``>= 0``.
        alpha: weight of the positive class (``1 - alpha`` on the negative), or None.

    Shapes:
        z, y, returns: ``[B]``.
    """
    pos = _focal_one_class(z, gamma)  # label 1: p_t = sigmoid(z)
    neg = _focal_one_class(-z, gamma)  # label 0: p_t = sigmoid(-z)
    if alpha is not None:
        pos, neg = alpha * pos, (1.0 - alpha) * neg
    return y * pos + (1.0 - y) * neg


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


class TaskLosses(dict[str, Tensor]):
    """task -> scalar loss, with ``counts``: task -> the number of valid rows behind the loss
    (after ``count_reducer``: the global count under data parallelism). A task counting 0 had
    no row in the batch (its loss is 0 by design) and is absent for the step's balancing
    strategy (see :func:`mtlrec.autograd.multitask_backward`)."""

    def __init__(self, losses: dict[str, Tensor], counts: dict[str, Tensor]) -> None:
        super().__init__(losses)
        self.counts = counts


class MultiTaskLoss(nn.Module):
    """Masked, weighted mean loss per task.

    Args:
        tasks: the tasks to compute (each must be in the model's outputs).
        count_reducer: maps a local count of valid rows to the denominator to use
            (distributed training); identity by default.

    Returns (forward):
        task -> scalar loss (a :class:`TaskLosses`, which also holds the valid-row counts).

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

    def forward(self, output: ModelOutput, batch: Batch) -> TaskLosses:
        losses: dict[str, Tensor] = {}
        counts: dict[str, Tensor] = {}
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
            counts[t.name] = count.detach()
        return TaskLosses(losses, counts)
