"""The contract between per-task losses and the update of the shared parameters.

A strategy is an ``nn.Module`` (its learnable weights and running state live in its
``state_dict``, so checkpoints and resume keep them). It never calls backward and never touches
``.grad``: :func:`mtlrec.autograd.multitask_backward` is the one place that does.

* Loss-based strategies implement :meth:`Weighting.weights` from the losses ``[T]``; the
  objective is ``sum_t w_t L_t`` (plus :meth:`Weighting.regularizer`, e.g. the log-variance term
  of uncertainty weighting, through which their own parameters learn).
* Gradient-based strategies set ``needs_grads = True``; they then receive the per-task
  gradients ``jacobian [T, P]`` of the shared parameters (or of the shared representation, with
  ``grad_target = "representation"``), computed in one batched backward, and either return
  weights or override :meth:`Weighting.aggregate` to map ``[T, P] -> [P]`` (gradient surgery).
  :meth:`Weighting.grad_parameters` chooses which shared parameters (``GradParams`` options).
* Strategies with ``needs_outputs = True`` see each step's outputs and batch in
  :meth:`Weighting.observe` before backward (e.g. a running AUC).
* Strategies with ``needs_rescore = True`` get :meth:`Weighting.after_update` after the
  optimiser step, with a closure that re-scores the step's batch under the updated parameters
  (no gradient): FAMO's update of its logits in the paper's form.

Absent tasks. A masked task may have no valid row in a batch (conversion masked by click, a
short last batch): its loss is exactly 0 with zero gradient. :func:`multitask_backward` then
marks it absent for that step (:meth:`Weighting.begin_step`; :attr:`Weighting.present` is the
``[T]`` bool mask of the current step) and every strategy treats the step as if the task did not
exist: weights over the present tasks only (an absent task's weight is 0, and "sums to T"
becomes "sums to the number of present tasks"), its state carried over unchanged, and nothing
recorded from the empty batch (no initial loss, no loss history, no logit update).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

if TYPE_CHECKING:
    from mtlrec.batch import Batch
    from mtlrec.models.base import ModelOutput, MultiTaskModel


class GradParams(BaseModel):
    """Options of every gradient-based strategy: what the per-task gradients are taken of."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grad_target: Literal["parameters", "representation"] = Field(
        default="parameters",
        description="per-task gradients of the shared parameters, or of the shared "
        "representation (the tensor the towers read, ModelOutput.tower_inputs; MGDA-UB)",
    )
    include_embeddings: bool = Field(
        default=False,
        description="take per-task gradients of the embedding tables too (the papers' 'all "
        "shared parameters'; their size: [T, rows*dim] every step). Off (default): the tables "
        "get the plain sum of the task gradients and the dense shared layers the strategy's "
        "combination, which keeps the step within 2x of static weights on census",
    )


class Weighting(nn.Module, ABC):
    """Base class of loss-balancing strategies.

    Args:
        task_names: the tasks, in the order of the loss vector.

    Shapes:
        losses: ``[T]``; jacobian: ``[T, P]``; weights: ``[T]``.
    """

    needs_grads: ClassVar[bool] = False
    needs_outputs: ClassVar[bool] = False
    #: the train step calls :meth:`after_update` with a re-scoring closure (FAMO's paper form)
    needs_rescore: bool = False
    grad_target: Literal["parameters", "representation"] = "parameters"
    include_embeddings: bool = False
    #: learning rate of the strategy's own parameters (None: the optimiser's)
    param_lr: float | None = None
    paper: ClassVar[str] = ""

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        self.task_names = tuple(task_names)
        # tasks with at least one valid row in the current step (not saved: per step)
        self.present: Tensor
        self.register_buffer(
            "present", torch.ones(len(self.task_names), dtype=torch.bool), persistent=False
        )

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def begin_step(self, present: Tensor | None = None) -> None:
        """Mark the tasks present in this step (``[T]`` bool; None: all). Called by
        :func:`~mtlrec.autograd.multitask_backward` before :meth:`weights`; the mask holds until
        the next step, so :meth:`aggregate`, :meth:`after_update` and :meth:`on_step_end` see
        the same one."""
        if present is None:
            self.present.fill_(True)
        else:
            self.present.copy_(present.to(device=self.present.device, dtype=torch.bool))

    def present_index(self) -> Tensor:
        """Indices of the tasks present in this step, ``[T_p]`` (int64)."""
        return self.present.nonzero().squeeze(1)

    def accept_legacy_state(
        self, *, scalars: Sequence[str] = (), added: Sequence[str] = ()
    ) -> None:
        """Let checkpoints of earlier versions load: buffers ``scalars`` were then one value for
        every task (repeated for each task now), buffers ``added`` did not exist (they keep
        their initial value)."""

        def expand(state_dict: dict, prefix: str, *args: object) -> None:
            for name in scalars:
                key = prefix + name
                old = state_dict.get(key)
                new = getattr(self, name)
                if isinstance(old, Tensor) and old.dim() == 0 and new.dim() == 1:
                    state_dict[key] = old.expand(new.shape).to(new.dtype).clone()
            for name in added:
                state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())

        self._register_load_state_dict_pre_hook(expand)

    @abstractmethod
    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        """Task weights ``[T]`` for this step (treated as constants in the objective)."""

    def set_grad_options(self, params: GradParams) -> None:
        """Take ``grad_target`` / ``include_embeddings`` from a strategy's parameters."""
        self.grad_target = params.grad_target
        self.include_embeddings = params.include_embeddings

    def grad_parameters(self, model: MultiTaskModel) -> list[nn.Parameter]:
        """The shared parameters whose per-task gradients this strategy receives (gradient
        strategies with ``grad_target = "parameters"``): every shared parameter, without the
        embedding tables unless ``include_embeddings``."""
        shared = [p for p in model.shared_parameters() if p.requires_grad]
        if self.include_embeddings:
            return shared
        emb = {id(p) for p in model.embedding_parameters()}
        return [p for p in shared if id(p) not in emb]

    def observe(self, output: ModelOutput, batch: Batch) -> None:
        """Called before backward with the step's outputs, for strategies with
        ``needs_outputs = True`` (e.g. a running accuracy); never differentiates them."""
        del output, batch

    def regularizer(self, losses: Tensor) -> Tensor | None:
        """An extra differentiable term of the objective (None: nothing)."""
        del losses
        return None

    def objective(self, losses: Tensor, weights: Tensor) -> Tensor:
        """The scalar to differentiate: ``sum_t w_t L_t`` (+ regulariser)."""
        obj = (weights.detach() * losses).sum()
        reg = self.regularizer(losses)
        return obj if reg is None else obj + reg

    def aggregate(self, jacobian: Tensor, weights: Tensor) -> Tensor:
        """Shared-parameter gradient ``[P]`` from per-task gradients ``[T, P]``."""
        return weights @ jacobian

    def after_update(self, losses: Tensor, rescore: Callable[[], Tensor]) -> None:
        """Called after the optimiser step, before :meth:`on_step_end`, for strategies with
        ``needs_rescore``: ``losses [T]`` are the step's (detached) losses and ``rescore()``
        returns the losses ``[T]`` of the same batch under the updated parameters (one forward
        pass without gradient, paid only if called)."""
        del losses, rescore

    def on_step_end(self, losses: Tensor) -> None:
        """Called after every optimiser step with the detached losses ``[T]`` (absent tasks'
        entries are 0: read :attr:`present` before recording anything)."""
        del losses

    def on_epoch_end(self, epoch: int) -> None:
        """Called at the end of every epoch."""
        del epoch

    def describe(self, weights: Tensor) -> dict[str, float]:
        """Weights by task name, for logs."""
        return {t: float(w) for t, w in zip(self.task_names, weights.tolist(), strict=True)}


class SharedUpdateWeighting(Weighting):
    """A gradient strategy that only combines the shared update (MGDA, PE-LTR, IMTL).

    Task-specific parameters get their own task's gradient (weight 1 each); the shared
    parameters get ``alpha @ J`` with ``alpha = self.shared_weights(losses, J)``, which the
    subclass defines. ``shared_weights`` sees the present tasks only (the rows of ``J`` and the
    losses of the tasks with rows this step); absent tasks get ``alpha = 0``. Subclasses call
    :meth:`init_shared_update` in ``__init__``.
    """

    def init_shared_update(self) -> None:
        self._losses = torch.zeros(len(self.task_names))
        self.register_buffer("last_alpha", torch.zeros(len(self.task_names)), persistent=False)

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        self._losses = losses.detach()
        return torch.ones_like(losses)

    def aggregate(self, jacobian: Tensor, weights: Tensor) -> Tensor:
        idx = self.present_index()
        alpha = torch.zeros(self.num_tasks, dtype=torch.float64, device=jacobian.device)
        if idx.numel() > 0:
            sub = self.shared_weights(self._losses[idx], jacobian[idx])  # type: ignore[attr-defined]
            alpha[idx] = sub.to(torch.float64)
        self.last_alpha.copy_(alpha.detach().float())
        return alpha.to(jacobian.dtype) @ jacobian.detach()
