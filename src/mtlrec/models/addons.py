"""Options any model can take, attached by :class:`~mtlrec.models.base.MultiTaskModel` (the
architectures know nothing of them): the selection-bias tower, domain-adversarial tasks and
DIEN's next-behaviour loss. Their parameters are fields of ``ModelParams``
(``docs/architectures.md``).

* ``bias_tower`` (:class:`~mtlrec.nn.bias.BiasTower`, Zhao et al., RecSys 2019): a forward
  pre-hook takes the ``role: bias`` features out of every batch before the architecture runs
  (registered whenever the schema has bias features, tower or not); a forward hook adds the
  tower's logit to the chosen tasks' logits (in training; outside training per ``serve_as``).
* ``adversarial_tasks`` (:class:`~mtlrec.nn.auxiliary.GradientReversal`, Ganin & Lempitsky,
  ICML 2015): the auxiliary task's tower reads its input through a gradient-reversal layer (a
  forward pre-hook on the tower, attached once the architecture has built its towers).
* ``next_item`` (:class:`~mtlrec.nn.auxiliary.NextBehaviourLoss`, Zhou et al., AAAI 2019): a
  forward hook adds the weighted loss to ``ModelOutput.aux_losses`` in training.

This module does not import the model base class (which imports it); the model is typed
``Any`` here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mtlrec.errors import ConfigError
from mtlrec.nn.auxiliary import GradientReversal, NextBehaviourLoss
from mtlrec.nn.bias import BiasTower, split_bias
from mtlrec.nn.conditional import ConditionedTowers
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout
from mtlrec.nn.heads import TaskHeads

# the blocks holding one tower per task, and the per-task module that reads the representation
_TOWER_BLOCKS: tuple[tuple[type[nn.Module], str], ...] = (
    (TaskHeads, "towers"),
    (ConditionedTowers, "bodies"),
)


class BiasTowerParams(BaseModel):
    """A shallow tower over the selection-bias features (schema ``role: bias``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: tuple[str, ...] = Field(
        min_length=1, description="tasks whose logit gets the bias logit in training"
    )
    features: tuple[str, ...] = Field(
        default=(), description="bias features the tower reads (default: every role: bias one)"
    )
    hidden: tuple[int, ...] = Field(
        default=(16,), description="hidden widths (empty: a linear model)"
    )
    dropout: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="feature drop-out of the bias features in training (the paper: 10%)",
    )
    serve_as: Literal["drop", "missing"] | dict[str, float] = Field(
        default="drop",
        description="outside training: 'drop' the bias logit, add it with the bias features "
        "'missing', or at given values ({position: 1}; pre-indexed ids or untransformed "
        "numbers); scores never depend on a row's own bias features",
    )


class NextItemParams(BaseModel):
    """DIEN's auxiliary loss over one sequence feature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature: str = Field(description="a sequence feature (behaviours, oldest first)")
    weight: float = Field(default=1.0, gt=0.0, description="alpha, the loss's weight")
    negatives: int = Field(default=1, ge=1, description="sampled negatives per position")


def _subset(layout: FeatureLayout, names: set[str]) -> FeatureLayout:
    """The part of a layout that holds the named features."""
    sparse = tuple(f for f in layout.sparse if f.name in names)
    seqs = tuple(s for s in layout.sequences if s.name in names)
    tables = {f.table for f in sparse} | {s.table for s in seqs}
    return dataclasses.replace(
        layout,
        sparse=sparse,
        sequences=seqs,
        dense=tuple(n for n in layout.dense if n in names),
        table_sizes={k: v for k, v in layout.table_sizes.items() if k in tables},
        table_dims={k: v for k, v in layout.table_dims.items() if k in tables},
    )


def _names(layout: FeatureLayout) -> list[str]:
    return [f.name for f in layout.sparse] + [s.name for s in layout.sequences] + [*layout.dense]


def _check_tasks(model: Any, option: str, tasks: Any) -> None:
    kinds = {t.name: t.kind for t in model.tasks}
    for t in tasks:
        if kinds.get(t) not in ("binary", "regression"):
            raise ConfigError(f"{option}: {t!r} is not a binary or regression task here")


def attach_bias(model: Any) -> None:
    """Split the bias features off every batch; with ``bias_tower``, add the tower."""
    p: BiasTowerParams | None = model.params.bias_tower
    bias = model.layout.bias
    if bias is None:
        if p is not None:
            raise ConfigError("bias_tower: the schema has no feature with role: bias")
        return

    def split(module: nn.Module, args: tuple) -> tuple:
        main = split_bias(args[0], module.layout.bias)
        lay = module.layout
        if main.sparse.shape[1] != len(lay.sparse) or main.dense.shape[1] != len(lay.dense):
            raise ValueError(  # the bias columns are found by name: unnamed columns are ambiguous
                f"features of {main.sparse.shape[1]} sparse / {main.dense.shape[1]} dense columns "
                f"{main.sparse_names or '(unnamed)'} for a model reading {len(lay.sparse)} / "
                f"{len(lay.dense)}: give Features their column names (sparse_names, dense_names)"
            )
        return (main, *args[1:])

    model.register_forward_pre_hook(split)
    if p is None:
        return  # the bias features are read by nothing (e.g. a baseline without them)
    _check_tasks(model, "bias_tower.tasks", p.tasks)
    names = set(p.features or _names(bias))
    unknown = sorted(names - set(_names(bias)))
    if unknown:
        raise ConfigError(f"bias_tower.features: {unknown} are not role: bias features")
    sub = _subset(bias, names)
    serve = None if p.serve_as == "drop" else {} if p.serve_as == "missing" else p.serve_as
    try:
        model.bias_tower = BiasTower(
            sub,
            p.tasks,
            p.hidden,
            feature_dropout=p.dropout,
            serve=serve,
            activation=model.params.activation,
            init_std=model.params.embedding_init_std,
        )
    except ValueError as e:
        raise ConfigError(f"bias_tower: {e}") from None
    reads_all = len(names) == len(_names(bias))

    def add_bias(module: nn.Module, args: tuple, output: Any) -> Any:
        tower = module.bias_tower  # (module, not model: survives deepcopy)
        feats = args[0].bias
        if feats is not None and not reads_all:
            feats = split_bias(feats, tower.layout).bias
        z = tower(feats)  # [B, T] in training, [1, T] or None outside
        if z is None:
            return output
        logits = dict(output.logits)
        for k, t in enumerate(tower.tasks):
            logits[t] = logits[t] + z[:, k]  # [B]
        output.logits = logits
        return output

    model.register_forward_hook(add_bias)


def attach_adversarial(model: Any) -> None:
    """A gradient-reversal layer in front of every tower of the ``adversarial_tasks``."""
    specs = {t.name: t for t in model.tasks}
    for task, lam in model.params.adversarial_tasks.items():
        if task not in specs:
            raise ConfigError(f"adversarial_tasks: no task {task!r} (tasks: {list(specs)})")
        if not specs[task].auxiliary:
            raise ConfigError(
                f"adversarial_tasks: {task!r} must be an auxiliary task (auxiliary: true): "
                "the layers below its tower learn to make it unpredictable"
            )
        towers = [
            getattr(m, attr)[task]
            for m in model.modules()
            for block, attr in _TOWER_BLOCKS
            if isinstance(m, block) and task in getattr(m, attr)
        ]
        if not towers:
            raise ConfigError(f"adversarial_tasks: this model builds no tower for {task!r}")
        try:
            grl = GradientReversal(lam)
        except ValueError as e:
            raise ConfigError(f"adversarial_tasks: {task}: {e}") from None
        for tower in towers:
            tower.register_forward_pre_hook(lambda _m, args, grl=grl: (grl(args[0]), *args[1:]))


def main_embedding(model: Any) -> str:
    """The name of the model's own embedding collection (the first one over its layout)."""
    for name, m in model.named_modules():
        if isinstance(m, EmbeddingCollection) and m.layout is model.layout:
            return name
    raise ConfigError("next_item: this model has no embedding collection over its inputs")


def attach_next_item(model: Any) -> None:
    """DIEN's auxiliary loss on a sequence feature, added to ``aux_losses`` in training."""
    p: NextItemParams = model.params.next_item
    seq = next((s for s in model.layout.sequences if s.name == p.feature), None)
    if seq is None:
        names = [s.name for s in model.layout.sequences]
        raise ConfigError(f"next_item.feature: {p.feature!r} is not a sequence feature {names}")
    path = main_embedding(model)
    model.next_item = NextBehaviourLoss(
        seq.name, seq.table, seq.dim, model.layout.table_sizes[seq.table], p.negatives
    )
    key, weight = f"next_item_{seq.name}", p.weight

    def add_loss(module: nn.Module, args: tuple, output: Any) -> Any:
        if not module.training:
            return output
        loss = module.next_item(module.get_submodule(path), args[0])  # []
        output.aux_losses = {**output.aux_losses, key: weight * loss}
        return output

    model.register_forward_hook(add_loss)
