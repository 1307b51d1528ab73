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

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from mtlrec.config import OptimizerConfig, OptimizerGroupConfig
from mtlrec.errors import ConfigError
from mtlrec.models.base import MultiTaskModel
from mtlrec.train.ftrl import FTRL

OptimizerFactory = type[Optimizer] | Callable[[list[dict[str, Any]]], Optimizer]
"""What a Python user may pass instead of the configured optimiser: a ``torch.optim.Optimizer``
class (built over mtlrec's parameter groups with ``lr`` from the config) or a callable from
parameter groups to an optimiser."""

_CLASSES: dict[str, type[Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


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


def _kwargs(cfg: OptimizerConfig, lr: float, *, fused: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"lr": lr}
    if cfg.name in ("adam", "adamw"):
        kw |= {"betas": tuple(cfg.betas), "eps": cfg.eps}
    elif cfg.name == "adagrad":
        kw |= {"eps": cfg.eps}
    else:
        kw |= {"momentum": cfg.momentum}
    if fused:
        kw["fused"] = True
    return kw


def _fusable(groups: Sequence[dict[str, Any]]) -> bool:
    """Whether torch's fused kernels take every parameter (floating, CPU or CUDA, one device)."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    return (
        bool(params)
        and devices <= {"cpu", "cuda"}
        and len(devices) == 1
        and all(p.is_floating_point() for p in params)
    )


def make_optimizer(
    groups: list[dict[str, Any]],
    cfg: OptimizerConfig,
    lr: float,
    factory: OptimizerFactory | None = None,
) -> Optimizer:
    """The configured ``torch.optim`` optimiser over ``groups`` (default learning rate ``lr``),
    or the user's ``factory``."""
    if factory is not None:
        if isinstance(factory, type):
            return factory(groups, lr=lr)
        opt = factory(groups)
        if not isinstance(opt, Optimizer):
            raise ConfigError(
                f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer"
            )
        return opt
    cls = _CLASSES[cfg.name]
    emb = [g for g in groups if g.get("name") == "embedding"]
    if cfg.sparse_embeddings and emb:
        dense = [g for g in groups if g.get("name") != "embedding"]
        members: list[Optimizer] = []
        if dense:
            members.append(cls(dense, **_kwargs(cfg, lr, fused=_fusable(dense))))
        if cfg.name in ("adam", "adamw"):
            members.append(torch.optim.SparseAdam(emb, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps))
        else:  # Adagrad and SGD take sparse gradients themselves (not in the fused kernels)
            members.append(cls(emb, **_kwargs(cfg, lr, fused=False)))
        return members[0] if len(members) == 1 else CombinedOptimizer(members)
    return cls(groups, **_kwargs(cfg, lr, fused=_fusable(groups)))


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
        return grouped_optimizer(model, strategy, cfg, factory)
    return make_optimizer(param_groups(model, strategy, cfg), cfg, cfg.lr, factory)


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
    strategy: nn.Module | None,
    cfg: OptimizerConfig,
    factory: OptimizerFactory | None = None,
) -> CombinedOptimizer:
    """The main optimiser over the parameters no group matches (mtlrec's named groups, as
    :func:`param_groups`), then one ``torch.optim`` optimiser per ``cfg.groups`` entry over its
    parameters (one parameter group named ``group:<i>``), behind one
    :class:`CombinedOptimizer`.

    With ``sparse_embeddings``, an Adam/AdamW group's embedding tables go to ``SparseAdam``
    (lazy rows) as in the main optimiser; Adagrad, SGD and FTRL take sparse gradients
    themselves. The balancing strategy's parameters always stay in the main optimiser.
    """
    matched = match_groups(model, cfg.groups)
    taken = {id(p) for pairs in matched for _, p in pairs}
    main_groups = [
        {**g, "params": [p for p in g["params"] if id(p) not in taken]}
        for g in param_groups(model, strategy, cfg)
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


class CombinedOptimizer(Optimizer):
    """Several ``torch.optim`` optimisers behind one ``Optimizer``.

    Args:
        members: the optimisers (a parameter may belong to several, e.g. the shared parameters
            of per-task optimisers).
        active: ``() -> index`` of the one member to step (None: every member steps).

    ``param_groups`` are the members' own group dicts, in order, so schedulers and per-group
    settings reach them; ``state_dict`` lays the members' parameter indices end to end and tags
    each group with its member (``"member"``).
    """

    def __init__(self, members: Sequence[Optimizer], active: Callable[[], int] | None = None):
        if not members:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        seen: dict[int, nn.Parameter] = {}
        for m in members:
            for g in m.param_groups:
                for p in g["params"]:
                    seen.setdefault(id(p), p)
        super().__init__(list(seen.values()), {})
        self.members = list(members)
        self.active = active
        self.param_groups = [g for m in self.members for g in m.param_groups]

    @property
    def state(self) -> dict[Any, Any]:  # type: ignore[override]
        merged: dict[Any, Any] = {}
        for m in self.members:
            merged.update(m.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:  # torch's __init__ assigns an empty state
        del value

    def zero_grad(self, set_to_none: bool = True) -> None:
        for m in self.members:
            m.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("CombinedOptimizer.step takes no closure")
        if self.active is not None:
            self.members[self.active()].step()
        else:
            for m in self.members:
                m.step()
        return None

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for k, m in enumerate(self.members):
            sd = m.state_dict()
            n = sum(len(g["params"]) for g in sd["param_groups"])
            for i, s in sd["state"].items():
                state[offset + int(i)] = s
            for g in sd["param_groups"]:
                groups.append({**g, "params": [offset + int(i) for i in g["params"]], "member": k})
            offset += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        offset = 0
        for k, m in enumerate(self.members):
            mine = [g for g in groups if int(g.get("member", -1)) == k]
            n = sum(len(g["params"]) for g in mine)
            sub_groups = [
                {
                    **{a: b for a, b in g.items() if a != "member"},
                    "params": [int(i) - offset for i in g["params"]],
                }
                for g in mine
            ]
            sub_state = {
                int(i) - offset: s
                for i, s in state_dict["state"].items()
                if offset <= int(i) < offset + n
            }
            m.load_state_dict({"state": sub_state, "param_groups": sub_groups})
            offset += n
        self.param_groups = [g for m in self.members for g in m.param_groups]


@torch.no_grad()
def materialize_state(optimizer: Optimizer) -> None:
    """Allocate the optimiser's state (and zero gradients) now, before training starts.

    Allocated lazily by the first step, the moment buffers land between that step's temporary
    buffers and fragment the heap for the rest of the run (tens of MB of peak RSS on the speed
    harness). The state is created by one step with zero gradients, a learning rate of 0 and no
    weight decay, after which every ``step`` counter is set back to 0: the next real step is
    exactly a first step. Parameters with sparse gradients (lazy tables) are left alone, as are
    members that are not Adam, AdamW, Adagrad or SGD (their first step may not be neutral).
    """
    members = optimizer.members if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    for opt in members:
        if type(opt) not in _CLASSES.values():
            continue
        saved = [(g, g["lr"], g.get("weight_decay", 0.0)) for g in opt.param_groups]
        params = [p for g in opt.param_groups for p in g["params"]]
        grads = {id(p): p.grad for p in params}
        for g in opt.param_groups:
            g["lr"] = 0.0
            if "weight_decay" in g:
                g["weight_decay"] = 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        try:
            opt.step()
        finally:
            for g, lr, wd in saved:
                g["lr"] = lr
                if "weight_decay" in g:
                    g["weight_decay"] = wd
            for p in params:
                old = grads[id(p)]
                if old is not None:
                    p.grad = old
        for st in opt.state.values():
            step = st.get("step")
            if isinstance(step, torch.Tensor):
                step.zero_()
            elif step is not None:
                st["step"] = 0
