"""What every model is and returns.

A model maps :class:`~mtlrec.batch.Features` to a :class:`ModelOutput`: logits per task (never
probabilities), the gate weights it used, and the input of every task's tower (the "shared
representation" some balancing strategies differentiate against). It declares its shared and
task-specific parameters, so that nothing outside it needs ``isinstance``.
"""

from __future__ import annotations

from abc import ABC, ABCMeta, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.models.addons import (
    BiasTowerParams,
    NextItemParams,
    attach_adversarial,
    attach_bias,
    attach_next_item,
)
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

    ``task_specs`` are the tasks of the model that produced the output (attached by
    :class:`MultiTaskModel`), so that :meth:`predictions` can be asked by task name.
    """

    logits: dict[str, Tensor]
    log_probs: dict[str, Tensor] = field(default_factory=dict)
    gates: dict[str, Tensor] = field(default_factory=dict)
    tower_inputs: dict[str, Tensor] = field(default_factory=dict)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    task_specs: tuple[TaskSpec, ...] = ()

    def predictions(self, tasks: Sequence[TaskSpec | str] | None = None) -> dict[str, Tensor]:
        """Probabilities (binary), values (regression) or class probabilities (multiclass).

        Args:
            tasks: the tasks, as :class:`TaskSpec` objects or by name (names are looked up in
                ``task_specs``, the model's own tasks); None: every task of the model.

        Returns:
            Task name -> ``[B]`` (binary, regression) or ``[B, C]`` (multiclass).

        Raises:
            KeyError: a task name the model does not have (or, without ``task_specs``, any
                name: pass :class:`TaskSpec` objects then).
        """
        specs = {t.name: t for t in self.task_specs}
        out: dict[str, Tensor] = {}
        for t in self.task_specs if tasks is None else tasks:
            if isinstance(t, str):
                if t not in specs:
                    raise KeyError(
                        f"no task {t!r} in this output (tasks: {list(specs)})"
                        if specs
                        else f"task {t!r}: this output carries no task specs; pass TaskSpec "
                        "objects (the schema's tasks)"
                    )
                t = specs[t]
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

    def probabilities(self, tasks: Sequence[TaskSpec | str] | None = None) -> dict[str, Tensor]:
        """Per-task predictions by task name (the same as :meth:`predictions`): probabilities
        for binary tasks, class probabilities for multiclass ones, values for regression."""
        return self.predictions(tasks)


class _ModelMeta(ABCMeta):
    """Runs :meth:`MultiTaskModel._attach_late_options` once the instance's own ``__init__``
    (the most derived one) has returned: options that wrap the architecture's blocks (its
    towers, its embedding) can only be attached then."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        model = super().__call__(*args, **kwargs)
        model._attach_late_options()
        return model


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
    wide_tasks: tuple[str, ...] = Field(
        default=(),
        description="tasks whose logit gets a wide (linear) part, Wide & Deep "
        "(docs/architectures.md)",
    )
    wide_features: tuple[str, ...] | None = Field(
        default=None,
        description="sparse features of the wide part (null: every sparse feature; []: none, "
        "crosses only)",
    )
    wide_crosses: tuple[tuple[str, ...], ...] = Field(
        default=(), description="crosses of two or more sparse features, hashed into buckets"
    )
    wide_buckets: int = Field(default=16384, ge=1, description="rows of each cross's table")
    bias_tower: BiasTowerParams | None = Field(
        default=None,
        description="a shallow tower over the role: bias features (position, device...) whose "
        "logit is added to tasks' logits in training only (Zhao et al., RecSys 2019): "
        "{tasks, features, hidden, dropout, serve_as: drop | missing | {feature: value}}; "
        "docs/architectures.md",
    )
    adversarial_tasks: dict[str, float] = Field(
        default_factory=dict,
        description="auxiliary task -> lambda: its tower reads its input through a "
        "gradient-reversal layer (domain-adversarial, Ganin & Lempitsky, ICML 2015)",
    )
    next_item: NextItemParams | None = Field(
        default=None,
        description="DIEN's auxiliary loss: a GRU over a sequence feature's embeddings scores "
        "the next item against sampled negatives (Zhou et al., AAAI 2019): "
        "{feature, weight, negatives}",
    )


class MultiTaskModel(nn.Module, ABC, metaclass=_ModelMeta):
    """Base class: input layout, tasks and parameter bookkeeping.

    Subclasses build their blocks in ``__init__`` from ``self.layout`` and ``self.tasks``, and
    implement :meth:`forward` and :meth:`task_parameters`.
    """

    Params: ClassVar[type[ModelParams]] = ModelParams
    paper: ClassVar[str] = ""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = super().__call__(*args, **kwargs)
        # the output carries the model's task specs, so that predictions can be asked by task
        # name (ModelOutput.predictions); not while a graph is captured for export
        if isinstance(out, ModelOutput) and not (
            torch.jit.is_tracing() or torch.compiler.is_compiling()
        ):
            out.task_specs = self.tasks
        return out

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
        if params.wide_tasks or params.wide_features is not None or params.wide_crosses:
            self._add_wide(params)
        if layout.bias is not None or params.bias_tower is not None:
            attach_bias(self)  # the role: bias features never reach the architecture

    def _attach_late_options(self) -> None:
        """Options that need the architecture's blocks (its towers, its embedding), attached
        once the model's own ``__init__`` has returned (:mod:`mtlrec.models.addons`)."""
        if self.params.adversarial_tasks:
            attach_adversarial(self)
        if self.params.next_item is not None:
            attach_next_item(self)

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

    def _add_wide(self, p: ModelParams) -> None:
        """Add a wide part (Cheng et al., DLRS 2016; :class:`~mtlrec.nn.wide.WideLinear`, one
        linear model per task over sparse features and hashed crosses) to the logits of
        ``wide_tasks``, after the architecture's own forward, as the FM term."""
        from mtlrec.errors import ConfigError
        from mtlrec.nn.wide import WideLinear

        kinds = {t.name: t.kind for t in self.tasks}
        if not p.wide_tasks:
            raise ConfigError("wide_features / wide_crosses need wide_tasks (the tasks to feed)")
        for t in p.wide_tasks:
            if kinds.get(t) not in ("binary", "regression"):
                raise ConfigError(f"wide_tasks: {t!r} is not a binary or regression task here")
        features = p.wide_features
        if features is None:
            features = tuple(f.name for f in self.layout.sparse)
        try:
            self.wide = WideLinear(
                self.layout, p.wide_tasks, features, p.wide_crosses, p.wide_buckets
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        tasks = tuple(p.wide_tasks)

        def add_wide(module: nn.Module, args: tuple, output: ModelOutput) -> ModelOutput:
            term = module.wide(args[0])  # [B, T] (module, not self: survives deepcopy)
            logits = dict(output.logits)
            for k, t in enumerate(tasks):
                logits[t] = logits[t] + term[:, k]
            output.logits = logits
            return output

        self.register_forward_hook(add_wide)

    def predict_proba(
        self, features: Features, tasks: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Predictions per task name, in eval mode and without gradients: probabilities
        (binary), class probabilities (multiclass) or values (regression).

        Args:
            features: one batch of encoded features (``Batch.features``).
            tasks: task names (default: every task of the model).

        Returns:
            Task name -> ``[B]`` or ``[B, C]``.

        Example:
            >>> from mtlrec.models import build_model
            >>> from mtlrec.testing import tiny_dataset
            >>> pre, ds = tiny_dataset(20)
            >>> model = build_model("mmoe", pre.schema, pre.table_sizes(), {"num_experts": 2})
            >>> p = model.predict_proba(ds.features_at(slice(0, 4)))
            >>> sorted(p), tuple(p["click"].shape)
            (['click', 'watch'], (4,))
        """
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self(features).predictions(tasks)
        finally:
            self.train(was_training)

    @property
    def loss_task_names(self) -> tuple[str, ...]:
        """Tasks that carry a loss (all by default; ESMM's CVR has none)."""
        return self.task_names

    def make_embedding(self) -> EmbeddingCollection:
        """The embedding of ``self.layout`` on its backend (``layout.backend``): the fused
        torch tables, or TorchRec tables built on ``meta`` for sharding
        (:mod:`mtlrec.nn.torchrec_embedding`); both give ``Embedded`` and ``out_dim``."""
        if self.layout.backend == "torchrec":
            from mtlrec.nn.torchrec_embedding import TorchRecEmbeddingCollection

            return TorchRecEmbeddingCollection(  # type: ignore[return-value]
                self.layout, init_std=self.params.embedding_init_std
            )
        return EmbeddingCollection(self.layout, init_std=self.params.embedding_init_std)

    @abstractmethod
    def forward(self, features: Features) -> ModelOutput:
        """Logits (and gates, tower inputs) of one batch."""

    @abstractmethod
    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters that only task ``task``'s loss reaches (its tower, gate, own experts...):
        gradient-based balancing strategies give them that task's plain gradient and combine
        the gradients of everything else (:meth:`shared_parameters`)."""

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters used by more than one task (everything not task-specific)."""
        own = {id(p) for t in self.task_names for p in self.task_parameters(t)}
        return [p for p in self.parameters() if id(p) not in own]

    def task_group_parameters(self, task: str) -> list[nn.Parameter]:
        """The parameters that belong to task ``task``: its tower, its gates and its
        task-specific experts at every level, the optimiser group ``task:<name>`` of a
        per-task learning rate. A superset of :meth:`task_parameters` (default: the same):
        PLE's task experts below the last level are the task's own although other tasks'
        losses reach them through the next level's shared gate. Disjoint across tasks."""
        return self.task_parameters(task)

    def last_shared_layer(self) -> nn.Parameter | None:
        """The weight of the last shared layer that every loss task's loss reaches (GradNorm's
        ``W``, Chen et al., ICML 2018): a weight matrix (``[in, out]``, or ``[E, in, out]`` for a
        stack of experts), never a bias or a gate. None when the tasks share no dense layer.
        Every registered model declares its own (a test checks each over the registry)."""
        return None

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Embedding tables (optimisers may treat them apart, e.g. without weight decay)."""
        from mtlrec.nn.torchrec_embedding import TorchRecEmbeddingCollection

        kinds = (EmbeddingCollection, TorchRecEmbeddingCollection)
        return [p for m in self.modules() if isinstance(m, kinds) for p in m.parameters()]


def params_of(*modules: nn.Module | None) -> list[nn.Parameter]:
    """The parameters of some modules, without duplicates, in order."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        if m is not None:
            for p in m.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())
