"""The ``torch.optim`` optimisers mtlrec builds from its config, and :class:`CombinedOptimizer`:
several of them behind one ``torch.optim.Optimizer``.

Adam, AdamW, Adagrad and SGD with their fused CPU kernels; ``sparse_embeddings`` with Adam/AdamW
puts the tables in ``torch.optim.SparseAdam`` (lazy: only the rows a batch looked up move) beside
fused Adam. A :class:`CombinedOptimizer`'s ``param_groups`` are its members' group dicts (a
scheduler that sets a group's ``lr`` sets the member's), and its state dict has
``torch.optim``'s shape, the members' indices laid end to end. :func:`materialize_state`
allocates an optimiser's state before the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from mtlrec.config import OptimizerConfig
from mtlrec.errors import ConfigError

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
