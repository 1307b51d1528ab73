"""Optimisers: Adam, AdamW, Adagrad, SGD over named parameter groups.

Groups: dense model weights (``weight_decay``), embedding tables (``embedding_weight_decay``,
0 by default) and the balancing strategy's own parameters (no decay). See
:mod:`mtlrec.train.optimizers` for why these are not ``torch.optim`` classes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mtlrec.config import OptimizerConfig
from mtlrec.models.base import MultiTaskModel
from mtlrec.train.optimizers import SGD, Adagrad, Adam, Optimizer


def param_groups(
    model: MultiTaskModel, strategy: nn.Module | None, cfg: OptimizerConfig
) -> list[dict[str, Any]]:
    emb_ids = {id(p) for p in model.embedding_parameters()}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in emb_ids]
    emb = [p for p in model.embedding_parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [
        {"params": dense, "weight_decay": cfg.weight_decay, "name": "dense"},
        {"params": emb, "weight_decay": cfg.embedding_weight_decay, "name": "embedding"},
    ]
    if strategy is not None:
        own = [p for p in strategy.parameters() if p.requires_grad]
        groups.append({"params": own, "weight_decay": 0.0, "name": "balancing"})
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: MultiTaskModel, strategy: nn.Module | None, cfg: OptimizerConfig
) -> Optimizer:
    """The configured optimiser over the model's (and the strategy's) parameters."""
    groups = param_groups(model, strategy, cfg)
    if cfg.name in ("adam", "adamw"):
        return Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, decoupled=cfg.name == "adamw")
    if cfg.name == "adagrad":
        return Adagrad(groups, lr=cfg.lr, eps=cfg.eps)
    return SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
