"""Optimisers: Adam, AdamW, Adagrad, SGD over named parameter groups.

Groups: dense model weights (``weight_decay``), embedding tables (``embedding_weight_decay``,
0 by default), one group per task named in ``task_lr`` (that task's own parameters at its own
learning rate) and the balancing strategy's own parameters (no decay; the strategy's ``param_lr``
when it sets one). A strategy with ``per_task_optimizers`` (alternating training) gets one
optimiser per task (:class:`mtlrec.train.task_optimizers.TaskOptimizers`). See
:mod:`mtlrec.train.optimizers` for why these are not ``torch.optim`` classes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mtlrec.config import OptimizerConfig
from mtlrec.errors import ConfigError
from mtlrec.models.base import MultiTaskModel
from mtlrec.train.optimizers import SGD, Adagrad, Adam, Optimizer


def param_groups(
    model: MultiTaskModel, strategy: nn.Module | None, cfg: OptimizerConfig
) -> list[dict[str, Any]]:
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
            for p in model.task_parameters(task)
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


def make_optimizer(groups: list[dict[str, Any]], cfg: OptimizerConfig, lr: float) -> Optimizer:
    """The configured optimiser class over the given groups (default learning rate ``lr``)."""
    if cfg.name in ("adam", "adamw"):
        return Adam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, decoupled=cfg.name == "adamw")
    if cfg.name == "adagrad":
        return Adagrad(groups, lr=lr, eps=cfg.eps)
    return SGD(groups, lr=lr, momentum=cfg.momentum)


def build_optimizer(
    model: MultiTaskModel, strategy: nn.Module | None, cfg: OptimizerConfig
) -> Optimizer:
    """The configured optimiser over the model's (and the strategy's) parameters."""
    if strategy is not None and getattr(strategy, "per_task_optimizers", False):
        from mtlrec.train.task_optimizers import TaskOptimizers

        return TaskOptimizers(model, strategy, cfg)
    return make_optimizer(param_groups(model, strategy, cfg), cfg, cfg.lr)
