"""Optimisers: ``torch.optim`` classes over mtlrec's named parameter groups.

Groups (each a dict with a ``name``): ``dense`` (model weights, ``weight_decay``),
``embedding`` (the tables, ``embedding_weight_decay``, 0 by default), one ``task:<name>`` group
per task named in ``task_lr`` (that task's own parameters at its own learning rate) and
``balancing`` (the balancing strategy's own parameters, no decay, the strategy's ``param_lr``
when it sets one).

The classes are ``torch.optim``'s own (Adam, AdamW, Adagrad, SGD with their fused CPU kernels),
so torch's learning-rate schedulers and any third-party optimiser work with them. Two cases need
more than one ``torch.optim`` instance behind one object, :class:`CombinedOptimizer`:

* ``sparse_embeddings`` with Adam/AdamW: the tables' sparse gradients go to
  ``torch.optim.SparseAdam`` (lazy: only the rows a batch looked up move) and the dense groups to
  fused Adam;
* alternating training (a strategy with ``per_task_optimizers``): one optimiser per task over the
  shared parameters and that task's own ones, each with its own moment estimates; only the
  active task's optimiser steps.

* per-part optimisers (``groups``): parameter-name patterns mapped to their own optimiser and
  settings (Wide & Deep: FTRL-Proximal, :class:`~mtlrec.train.ftrl.FTRL`, on ``wide.*``, Adam
  or Adagrad on the rest); one member per group, the unmatched parameters in the main one.

A :class:`CombinedOptimizer` is a ``torch.optim.Optimizer`` whose ``param_groups`` are its
members' group dicts (a scheduler that sets a group's ``lr`` sets the member's), and whose state
dict has ``torch.optim``'s shape, members' indices laid end to end.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from mtlrec.config import OptimizerConfig
from mtlrec.errors import ConfigError
from mtlrec.models.base import MultiTaskModel
from mtlrec.train.optimizer_groups import grouped_optimizer, match_groups
from mtlrec.train.torch_optim import (
    CombinedOptimizer,
    OptimizerFactory,
    make_optimizer,
    materialize_state,
)

__all__ = [
    "CombinedOptimizer",
    "OptimizerFactory",
    "build_optimizer",
    "grouped_optimizer",
    "make_optimizer",
    "match_groups",
    "materialize_state",
    "param_groups",
    "task_optimizers",
]


def param_groups(
    model: MultiTaskModel, strategy: nn.Module | None, cfg: OptimizerConfig
) -> list[dict[str, Any]]:
    """The named parameter groups of a model (and its balancing strategy); empty groups are
    left out, and a parameter is in one group only (a task group takes it first)."""
    unknown = set(cfg.task_lr) - set(model.task_names)
    if unknown:
        raise ConfigError(
            f"training.optimizer.task_lr names unknown tasks {sorted(unknown)}; the model's "
            f"tasks are {list(model.task_names)}"
        )
    emb_ids = {id(p) for p in model.embedding_parameters()}
    task_groups: list[dict[str, Any]] = []
    taken: set[int] = set()
    for task, lr in cfg.task_lr.items():
        own = [
            p
            for p in model.task_group_parameters(task)  # tower, own gate and experts
            if p.requires_grad and id(p) not in taken and id(p) not in emb_ids
        ]
        taken.update(id(p) for p in own)
        task_groups.append(
            {"params": own, "weight_decay": cfg.weight_decay, "lr": lr, "name": f"task:{task}"}
        )
    dense = [
        p
        for p in model.parameters()
        if p.requires_grad and id(p) not in emb_ids and id(p) not in taken
    ]
    emb = [p for p in model.embedding_parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [
        {"params": dense, "weight_decay": cfg.weight_decay, "name": "dense"},
        {"params": emb, "weight_decay": cfg.embedding_weight_decay, "name": "embedding"},
        *task_groups,
    ]
    if strategy is not None:
        own = [p for p in strategy.parameters() if p.requires_grad]
        group: dict[str, Any] = {"params": own, "weight_decay": 0.0, "name": "balancing"}
        lr = getattr(strategy, "param_lr", None)
        if lr is not None:
            group["lr"] = lr
        groups.append(group)
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: MultiTaskModel,
    strategy: nn.Module | None,
    cfg: OptimizerConfig,
    factory: OptimizerFactory | None = None,
) -> Optimizer:
    """The configured optimiser over the model's (and the strategy's) parameters; one per task
    for a strategy with ``per_task_optimizers`` (alternating training); with ``cfg.groups``, one
    more per group behind a :class:`CombinedOptimizer` (:func:`grouped_optimizer`)."""
    if strategy is not None and getattr(strategy, "per_task_optimizers", False):
        if cfg.groups:
            raise ConfigError(
                "training.optimizer.groups cannot be combined with alternating training (one "
                "optimiser per task); drop the groups or choose another balancing strategy"
            )
        return task_optimizers(model, strategy, cfg, factory)
    if cfg.groups:
        return grouped_optimizer(model, param_groups(model, strategy, cfg), cfg, factory)
    return make_optimizer(param_groups(model, strategy, cfg), cfg, cfg.lr, factory)


def task_optimizers(
    model: MultiTaskModel,
    strategy: nn.Module,
    cfg: OptimizerConfig,
    factory: OptimizerFactory | None = None,
) -> CombinedOptimizer:
    """One optimiser per task for alternating training: optimiser ``t`` holds the shared
    parameters and task t's own ones (at ``task_lr[t]``, default ``lr``); only the active task's
    optimiser (the strategy's ``active()``) steps, so the other tasks' states are untouched."""
    if any(p.requires_grad for p in strategy.parameters()):
        raise ConfigError("alternating training takes a strategy without parameters")
    names = list(strategy.task_names)  # type: ignore[attr-defined]
    unknown = set(cfg.task_lr) - set(names)
    if unknown:
        raise ConfigError(
            f"training.optimizer.task_lr names unknown tasks {sorted(unknown)}; the trained "
            f"tasks are {names}"
        )
    own_ids = {id(p) for t in model.task_names for p in model.task_parameters(t)}
    emb_ids = {id(p) for p in model.embedding_parameters()}
    shared = [p for p in model.parameters() if p.requires_grad and id(p) not in own_ids]
    dense = [p for p in shared if id(p) not in emb_ids]
    emb = [p for p in shared if id(p) in emb_ids]
    members: list[Optimizer] = []
    for t in names:
        own = [p for p in model.task_parameters(t) if p.requires_grad]
        groups: list[dict[str, Any]] = [
            {"params": dense, "weight_decay": cfg.weight_decay, "name": "dense"},
            {"params": emb, "weight_decay": cfg.embedding_weight_decay, "name": "embedding"},
            {"params": own, "weight_decay": cfg.weight_decay, "name": f"task:{t}"},
        ]
        groups = [g for g in groups if g["params"]]
        members.append(make_optimizer(groups, cfg, cfg.task_lr.get(t, cfg.lr), factory))
    return CombinedOptimizer(members, active=strategy.active)  # type: ignore[attr-defined]
