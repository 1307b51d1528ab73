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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
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
    grad_target: Literal["parameters", "representation"] = "parameters"
    include_embeddings: bool = False
    #: learning rate of the strategy's own parameters (None: the optimiser's)
    param_lr: float | None = None
    paper: ClassVar[str] = ""

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        self.task_names = tuple(task_names)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

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

    def on_step_end(self, losses: Tensor) -> None:
        """Called after every optimiser step with the detached losses ``[T]``."""
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
    subclass defines. Subclasses call :meth:`init_shared_update` in ``__init__``.
    """

    def init_shared_update(self) -> None:
        self._losses = torch.zeros(len(self.task_names))
        self.register_buffer("last_alpha", torch.zeros(len(self.task_names)), persistent=False)

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        self._losses = losses.detach()
        return torch.ones_like(losses)

    def aggregate(self, jacobian: Tensor, weights: Tensor) -> Tensor:
        alpha = self.shared_weights(self._losses, jacobian)  # type: ignore[attr-defined]
        self.last_alpha.copy_(alpha.detach().float())
        return alpha.to(jacobian.dtype) @ jacobian.detach()
