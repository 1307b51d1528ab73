"""What every model is and returns.

A model maps :class:`~mtlrec.batch.Features` to a :class:`ModelOutput`: logits per task (never
probabilities), the gate weights it used, and the input of every task's tower (the "shared
representation" some balancing strategies differentiate against). It declares its shared and
task-specific parameters, so that nothing outside it needs ``isinstance``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout
from mtlrec.schema import TaskSpec


@dataclass
class ModelOutput:
    """A model's outputs, keyed by name.

    Shapes:
        logits[task]: ``[B]`` (binary, regression) or ``[B, C]`` (multiclass).
        log_probs[task]: ``[B]`` log-probabilities of derived binary tasks (ESMM's pCTCVR),
            for which no logit exists.
        gates[name]: ``[B, E]`` gate weights of gate ``name`` (rows sum to 1).
        tower_inputs[task]: ``[B, D]`` the representation the task's tower reads.
        aux_losses[name]: scalar regularisers the model asks to add to the objective.
    """

    logits: dict[str, Tensor]
    log_probs: dict[str, Tensor] = field(default_factory=dict)
    gates: dict[str, Tensor] = field(default_factory=dict)
    tower_inputs: dict[str, Tensor] = field(default_factory=dict)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)

    def predictions(self, tasks: Sequence[TaskSpec]) -> dict[str, Tensor]:
        """Probabilities (binary), values (regression) or class probabilities (multiclass)."""
        out: dict[str, Tensor] = {}
        for t in tasks:
            if t.name in self.log_probs:
                out[t.name] = self.log_probs[t.name].exp()
                continue
            z = self.logits[t.name]
            if t.kind == "binary":
                out[t.name] = torch.sigmoid(z)
            elif t.kind == "multiclass":
                out[t.name] = torch.softmax(z, dim=-1)
            else:
                out[t.name] = z
        return out


class ModelParams(BaseModel):
    """Options every model takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tower_hidden: tuple[int, ...] = Field(default=(64,), description="hidden widths of towers")
    activation: str = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    embedding_init_std: float = Field(default=0.05, gt=0.0)
    fm_tasks: tuple[str, ...] = Field(
        default=(),
        description="tasks whose logit gets a factorization-machine term (DeepFM-style)",
    )
    fm_dim: int = Field(default=8, ge=1, description="factor width of the FM term")


class MultiTaskModel(nn.Module, ABC):
    """Base class: input layout, tasks and parameter bookkeeping.

    Subclasses build their blocks in ``__init__`` from ``self.layout`` and ``self.tasks``, and
    implement :meth:`forward` and :meth:`task_parameters`.
    """

    Params: ClassVar[type[ModelParams]] = ModelParams
    paper: ClassVar[str] = ""

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: ModelParams
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a model needs at least one task")
        self.layout = layout
        self.tasks = tuple(tasks)
        self.task_names = tuple(t.name for t in tasks)
        self.params = params
        if params.fm_tasks:
            self._add_fm(params.fm_tasks, params.fm_dim)

    def _add_fm(self, fm_tasks: Sequence[str], dim: int) -> None:
        """Add one FM term (first + second order over the fields) to the logits of
        ``fm_tasks``, after the architecture's own forward (works for every model)."""
        from mtlrec.errors import ConfigError
        from mtlrec.nn.fm import FactorizationMachine

        kinds = {t.name: t.kind for t in self.tasks}
        for t in fm_tasks:
            if kinds.get(t) not in ("binary", "regression"):
                raise ConfigError(f"fm_tasks: {t!r} is not a binary or regression task here")
        self.fm = FactorizationMachine(self.layout, dim)

        def add_fm(module: nn.Module, args: tuple, output: ModelOutput) -> ModelOutput:
            term = module.fm(args[0])  # [B] (module, not self: survives deepcopy)
            logits = dict(output.logits)
            for t in fm_tasks:
                logits[t] = logits[t] + term
            output.logits = logits
            return output

        self.register_forward_hook(add_fm)

    @property
    def loss_task_names(self) -> tuple[str, ...]:
        """Tasks that carry a loss (all by default; ESMM's CVR has none)."""
        return self.task_names

    def make_embedding(self) -> EmbeddingCollection:
        return EmbeddingCollection(self.layout, init_std=self.params.embedding_init_std)

    @abstractmethod
    def forward(self, features: Features) -> ModelOutput:
        """Logits (and gates, tower inputs) of one batch."""

    @abstractmethod
    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters that only task ``task`` uses (its tower, gate, own experts...)."""

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters used by more than one task (everything not task-specific)."""
        own = {id(p) for t in self.task_names for p in self.task_parameters(t)}
        return [p for p in self.parameters() if id(p) not in own]

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Embedding tables (optimisers may treat them apart, e.g. without weight decay)."""
        return [
            p for m in self.modules() if isinstance(m, EmbeddingCollection) for p in m.parameters()
        ]


def params_of(*modules: nn.Module | None) -> list[nn.Parameter]:
    """The parameters of some modules, without duplicates, in order."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        if m is not None:
            for p in m.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())
