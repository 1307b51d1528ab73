"""Per-part optimisers (``training.optimizer.groups``): parameter-name patterns mapped to their
own optimiser and settings (Wide & Deep: FTRL-Proximal, :class:`~mtlrec.train.ftrl.FTRL`, on
``wide.*``, Adam or Adagrad on the rest); one member per group, the unmatched parameters in the
main optimiser, all behind one :class:`~mtlrec.train.torch_optim.CombinedOptimizer`."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from mtlrec.config import OptimizerConfig, OptimizerGroupConfig
from mtlrec.errors import ConfigError
from mtlrec.models.base import MultiTaskModel
from mtlrec.train.ftrl import FTRL
from mtlrec.train.torch_optim import (
    _CLASSES,
    CombinedOptimizer,
    OptimizerFactory,
    _fusable,
    _kwargs,
    make_optimizer,
)


def match_groups(
    model: nn.Module, groups: Sequence[OptimizerGroupConfig]
) -> list[list[tuple[str, nn.Parameter]]]:
    """The trainable parameters each entry of ``training.optimizer.groups`` takes.

    Args:
        model: the model (patterns are matched against ``model.named_parameters()`` names with
            :func:`fnmatch.fnmatchcase`; ``*`` crosses dots, so ``wide.*`` takes every
            parameter under ``wide``).
        groups: the configured groups.

    Returns:
        Per group, its ``(name, parameter)`` pairs in the model's order.

    Raises:
        ConfigError: a pattern that matches no parameter (the message lists a few names), or a
            parameter that two groups match (the message names both).

    Example:
        >>> from torch import nn
        >>> m = nn.ModuleDict({"wide": nn.Linear(2, 1), "deep": nn.Linear(2, 1)})
        >>> g = OptimizerGroupConfig(params=["wide.*"], name="ftrl")
        >>> [n for n, _ in match_groups(m, [g])[0]]
        ['wide.weight', 'wide.bias']
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    owner: dict[str, tuple[int, str]] = {}
    out: list[list[tuple[str, nn.Parameter]]] = []
    for i, g in enumerate(groups):
        mine: dict[str, nn.Parameter] = {}
        for pattern in g.params:
            hits = [(n, p) for n, p in named if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                few = ", ".join(n for n, _ in named[:8])
                raise ConfigError(
                    f"training.optimizer.groups[{i}]: pattern {pattern!r} matches no parameter; "
                    f"the model's parameters include: {few}"
                    + (f" ... ({len(named)} in all)" if len(named) > 8 else "")
                )
            for n, p in hits:
                if n in owner and owner[n][0] != i:
                    j, other = owner[n]
                    raise ConfigError(
                        f"parameter {n!r} is matched by training.optimizer.groups[{j}] "
                        f"(pattern {other!r}) and groups[{i}] (pattern {pattern!r}); a "
                        "parameter may belong to one group only"
                    )
                owner.setdefault(n, (i, pattern))
                mine[n] = p
        out.append([(n, p) for n, p in named if n in mine])
    return out


def grouped_optimizer(
    model: MultiTaskModel,
    main_groups: list[dict[str, Any]],
    cfg: OptimizerConfig,
    factory: OptimizerFactory | None = None,
) -> CombinedOptimizer:
    """The main optimiser over the parameters no group matches (``main_groups``: mtlrec's named
    groups, :func:`~mtlrec.train.optimizers.param_groups`), then one ``torch.optim`` optimiser
    per ``cfg.groups`` entry over its parameters (one parameter group named ``group:<i>``),
    behind one :class:`CombinedOptimizer`.

    With ``sparse_embeddings``, an Adam/AdamW group's embedding tables go to ``SparseAdam``
    (lazy rows) as in the main optimiser; Adagrad, SGD and FTRL take sparse gradients
    themselves. The balancing strategy's parameters always stay in the main optimiser.
    """
    matched = match_groups(model, cfg.groups)
    taken = {id(p) for pairs in matched for _, p in pairs}
    main_groups = [
        {**g, "params": [p for p in g["params"] if id(p) not in taken]} for g in main_groups
    ]
    main_groups = [g for g in main_groups if g["params"]]
    members: list[Optimizer] = []
    if main_groups:
        main = make_optimizer(main_groups, cfg, cfg.lr, factory)
        members += main.members if isinstance(main, CombinedOptimizer) else [main]
    emb_ids = {id(p) for p in model.embedding_parameters()}
    for i, (g, pairs) in enumerate(zip(cfg.groups, matched, strict=True)):
        params = [p for _, p in pairs]
        lazy = cfg.sparse_embeddings and any(id(p) in emb_ids for p in params)
        members += _group_optimizers(i, g, params, emb_ids, g.lr or cfg.lr, lazy=lazy)
    return CombinedOptimizer(members)


def _group_optimizers(
    i: int,
    g: OptimizerGroupConfig,
    params: list[nn.Parameter],
    emb_ids: set[int],
    lr: float,
    *,
    lazy: bool,
) -> list[Optimizer]:
    """The optimiser(s) of group ``i`` (two when Adam meets lazily updated tables)."""
    name = f"group:{i}"
    if g.name == "ftrl":
        return [FTRL([{"params": params, "name": name}], lr=lr, beta=g.beta, l1=g.l1, l2=g.l2)]
    if lazy and (g.weight_decay > 0 or (g.name == "sgd" and g.momentum > 0)):
        raise ConfigError(
            f"training.optimizer.groups[{i}] ({g.name}) takes embedding tables, whose gradients "
            "are sparse (sparse_embeddings: true): it needs weight_decay 0 (and momentum 0)"
        )
    sub = OptimizerConfig(
        name=g.name, lr=lr, momentum=g.momentum, betas=g.betas, eps=g.eps, weight_decay=0.0
    )
    cls = _CLASSES[g.name]
    if lazy and g.name in ("adam", "adamw"):
        tables = [p for p in params if id(p) in emb_ids]
        dense = [p for p in params if id(p) not in emb_ids]
        out: list[Optimizer] = [
            torch.optim.SparseAdam(
                [{"params": tables, "name": name}], lr=lr, betas=tuple(g.betas), eps=g.eps
            )
        ]
        if dense:
            groups = [{"params": dense, "weight_decay": g.weight_decay, "name": name}]
            out.insert(0, cls(groups, **_kwargs(sub, lr, fused=_fusable(groups))))
        return out
    groups = [{"params": params, "weight_decay": g.weight_decay, "name": name}]
    return [cls(groups, **_kwargs(sub, lr, fused=not lazy and _fusable(groups)))]
