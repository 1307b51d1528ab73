"""Optimisers: Adam, AdamW, Adagrad, SGD over named parameter groups.

Groups: dense model weights (``weight_decay``), embedding tables (``embedding_weight_decay``,
0 by default) and the balancing strategy's own parameters (no decay). The fused CPU kernels are
used where torch has them (one kernel over all tensors instead of a Python loop).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtlrec.config import OptimizerConfig
from mtlrec.models.base import MultiTaskModel


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
) -> torch.optim.Optimizer:
    """The configured optimiser over the model's (and the strategy's) parameters."""
    groups = param_groups(model, strategy, cfg)
    kw: dict[str, Any] = {"lr": cfg.lr}
    if cfg.name == "adam":
        cls: type[torch.optim.Optimizer] = torch.optim.Adam
        kw.update(betas=cfg.betas, eps=cfg.eps)
    elif cfg.name == "adamw":
        cls = torch.optim.AdamW
        kw.update(betas=cfg.betas, eps=cfg.eps)
    elif cfg.name == "adagrad":
        cls = torch.optim.Adagrad
        kw.update(eps=cfg.eps)
    else:
        cls = torch.optim.SGD
        kw.update(momentum=cfg.momentum)
    try:
        return cls(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return cls(groups, **kw)
