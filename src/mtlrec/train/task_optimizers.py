"""One optimiser per task, for alternating training.

Optimiser ``t`` holds the shared parameters and task t's own parameters (at the learning rate
``training.optimizer.task_lr[t]``, default ``lr``), with its own moment estimates; at each step
only the active task's optimiser steps (the strategy's :meth:`active`), so the other tasks'
towers and optimiser states are untouched.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mtlrec.config import OptimizerConfig
from mtlrec.errors import ConfigError
from mtlrec.models.base import MultiTaskModel
from mtlrec.train.optim import make_optimizer
from mtlrec.train.optimizers import Optimizer


class TaskOptimizers(Optimizer):
    """T optimisers behind the :class:`Optimizer` interface; ``step`` runs the active one.

    Args:
        model: the model; its tasks must be the strategy's tasks.
        strategy: a strategy with ``active() -> int`` (index of the task trained this step).
        cfg: the optimiser configuration.
    """

    def __init__(self, model: MultiTaskModel, strategy: nn.Module, cfg: OptimizerConfig) -> None:
        if any(p.requires_grad for p in strategy.parameters()):
            raise ConfigError("alternating training takes a strategy without parameters")
        self.strategy = strategy
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
        self.optimizers: list[Optimizer] = []
        for t in names:
            own = [p for p in model.task_parameters(t) if p.requires_grad]
            groups: list[dict[str, Any]] = [
                {"params": dense, "weight_decay": cfg.weight_decay, "name": "dense"},
                {"params": emb, "weight_decay": cfg.embedding_weight_decay, "name": "embedding"},
                {"params": own, "weight_decay": cfg.weight_decay, "name": f"task:{t}"},
            ]
            groups = [g for g in groups if g["params"]]
            self.optimizers.append(make_optimizer(groups, cfg, cfg.task_lr.get(t, cfg.lr)))
        self.defaults = dict(self.optimizers[0].defaults)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self.state = {}

    def active(self) -> Optimizer:
        return self.optimizers[self.strategy.active()]  # type: ignore[operator]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none)

    def materialize(self) -> None:
        for o in self.optimizers:
            o.materialize()

    def step(self) -> None:
        self.active().step()

    def _dense_update(self, group: dict[str, Any], params: list[nn.Parameter]) -> None:
        self.active()._dense_update(group, params)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for k, o in enumerate(self.optimizers):
            sd = o.state_dict()
            n = sum(len(g["params"]) for g in sd["param_groups"])
            for i, s in sd["state"].items():
                state[offset + int(i)] = s
            for g in sd["param_groups"]:
                groups.append(
                    {**g, "params": [offset + int(i) for i in g["params"]], "optimizer": k}
                )
            offset += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        offset = 0
        for k, o in enumerate(self.optimizers):
            mine = [g for g in groups if int(g.get("optimizer", -1)) == k]
            n = sum(len(g["params"]) for g in mine)
            sub_groups = [
                {
                    **{a: b for a, b in g.items() if a != "optimizer"},
                    "params": [int(i) - offset for i in g["params"]],
                }
                for g in mine
            ]
            sub_state = {
                int(i) - offset: s
                for i, s in state_dict["state"].items()
                if offset <= int(i) < offset + n
            }
            o.load_state_dict({"state": sub_state, "param_groups": sub_groups})
            offset += n
