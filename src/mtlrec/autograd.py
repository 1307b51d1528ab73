"""The one place that calls backward.

:func:`multitask_backward` turns per-task losses into gradients with a balancing strategy:

* loss-based strategies (``needs_grads = False``): one backward of
  ``sum_t w_t L_t + regulariser + auxiliary losses``;
* gradient-based strategies: the per-task gradients of the shared parameters, ``J [T, P]``,
  come from ONE batched vector-Jacobian product (``is_grads_batched``: the T one-hot cotangents
  run through the graph together, no repeated ``retain_graph`` passes), the strategy maps them to
  weights or to a combined gradient ``g [P]``, and one backward of the weighted objective fills
  the task-specific parameters; the shared parameters' task part ``w @ J`` is then replaced by
  ``g``.

A task whose loss has no valid row in the batch (``counts[task] == 0``: its loss is exactly 0 by
design, see :mod:`mtlrec.losses`) is absent for the step: the strategy is told which tasks are
present (:meth:`~mtlrec.weighting.base.Weighting.begin_step`) and an absent task's weight is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtlrec.weighting.base import Weighting


@dataclass(frozen=True)
class BackwardResult:
    """What one backward did (detached)."""

    objective: Tensor
    losses: Tensor
    weights: Tensor
    #: ``[T]`` bool: the tasks with at least one valid row this step
    present: Tensor | None = None


def task_jacobian(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Per-task gradients of ``losses [T]`` w.r.t. ``params``, flattened: ``[T, P]``.

    One batched backward; the graph is kept for the objective's backward. A parameter no loss
    reaches gets zero rows (torch's ``materialize_grads`` would give it one unbatched zero
    tensor, ``[*p.shape]`` instead of ``[T, *p.shape]``).
    """
    t = losses.shape[0]
    eye = torch.eye(t, dtype=losses.dtype, device=losses.device)  # [T, T] one-hot cotangents
    grads = torch.autograd.grad(
        losses,
        list(params),
        grad_outputs=eye,
        is_grads_batched=True,
        retain_graph=True,
        allow_unused=True,
    )  # each [T, *p.shape], or None for a parameter no loss reaches
    return torch.cat(
        [
            p.new_zeros(t, p.numel()) if g is None else g.reshape(t, -1)
            for p, g in zip(params, grads, strict=True)
        ],
        dim=1,
    )  # [T, P]


def _add_flat_grad(params: Sequence[nn.Parameter], flat: Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        piece = flat[offset : offset + n].view_as(p)
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.add_(piece)
        offset += n


def present_mask(
    task_names: Sequence[str], counts: Mapping[str, Tensor | float] | None, device: torch.device
) -> Tensor:
    """``[T]`` bool: the tasks whose valid-row count is positive (all when ``counts`` is None
    or does not name a task)."""
    if counts is None:
        return torch.ones(len(task_names), dtype=torch.bool, device=device)
    return torch.tensor(
        [float(counts[t]) > 0 if t in counts else True for t in task_names],
        dtype=torch.bool,
        device=device,
    )


def multitask_backward(
    losses: dict[str, Tensor],
    strategy: Weighting,
    *,
    shared_parameters: Sequence[nn.Parameter] = (),
    aux_loss: Tensor | None = None,
    representation: dict[str, Tensor] | None = None,
    counts: Mapping[str, Tensor | float] | None = None,
    jacobian_sync: Callable[[Tensor], Tensor] | None = None,
    grad_scale: Tensor | None = None,
) -> BackwardResult:
    """Backpropagate per-task losses through a balancing strategy.

    Args:
        losses: task -> scalar loss (every task of the strategy).
        strategy: the balancing strategy.
        shared_parameters: parameters used by several tasks (needed by gradient-based
            strategies only).
        aux_loss: scalar added to the objective as is (model regularisers).
        representation: task -> the tensor its tower reads (``ModelOutput.tower_inputs``);
            needed by strategies with ``grad_target = "representation"``, whose per-task
            gradients are then taken of the distinct tensors among these (one batched
            backward through the towers only), and whose combined gradient flows back to the
            shared parameters in the same single backward as the objective.
        counts: task -> number of valid rows behind its loss (``MultiTaskLoss`` reports them
            as ``losses.counts``); a task counting 0 is absent for this step (weight 0, and the
            strategy records nothing from it). None: every task is present.
        jacobian_sync: maps this process's per-task gradients ``[T, P]`` of the shared
            parameters to the whole batch's before the strategy sees them (multi-process
            training: their mean over the processes, each process's losses being its share of
            the global mean). Then the shared parameters' gradient is left as ``g - w @ J +
            w @ J_local``, which the gradient all-reduce averages to ``g``. Not with
            ``grad_target = "representation"`` (a representation's rows are the process's own).
        grad_scale: multiplies the objective before backward (fp16's gradient scaler); loss-based
            strategies only.

    Returns:
        The objective, the loss vector, the weights used and the present tasks (detached).
    """
    vec = torch.stack([losses[t] for t in strategy.task_names])  # [T]
    present = present_mask(strategy.task_names, counts, vec.device)
    strategy.begin_step(present)
    if not bool(present.any()):  # no task has a row: only the model's own regularisers
        w = torch.zeros_like(vec).detach()
        obj = (w * vec).sum()
        if aux_loss is not None:
            obj = obj + aux_loss
        if obj.requires_grad:
            (obj if grad_scale is None else obj * grad_scale).backward()
        return BackwardResult(obj.detach(), vec.detach(), w, present)
    if not strategy.needs_grads:
        w = _only_present(strategy.weights(vec.detach()), present)
        obj = strategy.objective(vec, w)
        if aux_loss is not None:
            obj = obj + aux_loss
        (obj if grad_scale is None else obj * grad_scale).backward()
        return BackwardResult(obj.detach(), vec.detach(), w.detach(), present)
    if grad_scale is not None:
        raise ValueError("grad_scale (fp16) is for loss-based strategies only")
    if strategy.grad_target == "representation":
        if jacobian_sync is not None:
            raise ValueError(
                "jacobian_sync: per-task gradients of a representation cannot be combined "
                "across processes (each process has its own rows)"
            )
        return _representation_backward(vec, strategy, representation or {}, aux_loss, present)
    shared = [p for p in shared_parameters if p.requires_grad]
    if not shared:
        from mtlrec.errors import ConfigError

        raise ConfigError(
            f"balancing strategy {type(strategy).__name__} works on the gradients of parameters "
            "shared by the tasks, and this model shares none; use a loss-based strategy"
        )
    jac = task_jacobian(vec, shared)  # [T, P]
    if jacobian_sync is not None:
        jac = jacobian_sync(jac)  # [T, P] of the whole batch
    w = _only_present(strategy.weights(vec.detach(), jac), present)
    g = strategy.aggregate(jac, w)  # [P]
    obj = strategy.objective(vec, w)
    if aux_loss is not None:
        obj = obj + aux_loss
    obj.backward()  # task-specific parameters, plus w @ J (+ aux) on the shared ones
    _add_flat_grad(shared, g - w.detach() @ jac)  # shared: replace w @ J by g
    return BackwardResult(obj.detach(), vec.detach(), w.detach(), present)


def _only_present(w: Tensor, present: Tensor) -> Tensor:
    """The weights with absent tasks' set to 0 (their loss is 0 with zero gradient anyway; this
    keeps the reported weights and the objective honest)."""
    return torch.where(present, w, torch.zeros_like(w))


def shared_representation(strategy: Weighting, representation: dict[str, Tensor]) -> list[Tensor]:
    """The distinct tensors the strategy's tasks' towers read (one for a shared-bottom model).

    Raises:
        ConfigError: no tower input, or every task reads its own (no representation is shared,
            e.g. MMoE's per-task gate mixtures: use ``grad_target: parameters``).
    """
    from mtlrec.errors import ConfigError

    missing = [t for t in strategy.task_names if t not in representation]
    if missing:
        raise ConfigError(
            f"grad_target 'representation': the model gives no tower input for {missing}"
        )
    reps: dict[int, Tensor] = {}
    for t in strategy.task_names:
        reps.setdefault(id(representation[t]), representation[t])
    if len(reps) == len(strategy.task_names) > 1:
        raise ConfigError(
            "grad_target 'representation': every task's tower reads its own input, so the "
            "tasks share no representation; use grad_target: parameters with this model"
        )
    return list(reps.values())


def _representation_backward(
    vec: Tensor,
    strategy: Weighting,
    representation: dict[str, Tensor],
    aux_loss: Tensor | None,
    present: Tensor,
) -> BackwardResult:
    reps = shared_representation(strategy, representation)
    jac = task_jacobian(vec, reps)  # [T, R], R = sum of the representations' sizes
    w = _only_present(strategy.weights(vec.detach(), jac), present)
    g = strategy.aggregate(jac, w)  # [R]
    obj = strategy.objective(vec, w)
    if aux_loss is not None:
        obj = obj + aux_loss
    corr = g - w.detach() @ jac  # replace w @ J by g on the representation
    pieces, offset = [], 0
    for r in reps:
        pieces.append(corr[offset : offset + r.numel()].view_as(r))
        offset += r.numel()
    # one backward from two roots: the objective and the correction on the representation
    torch.autograd.backward([obj, *reps], [torch.ones_like(obj), *pieces])
    return BackwardResult(obj.detach(), vec.detach(), w.detach(), present)
