"""ESM²: conversion modelled over the entire space through post-click behaviour decomposition."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelOutput, ModelParams, MultiTaskModel, params_of
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mlp import MLP
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec

# the three conditional towers of the decomposition (internal: not schema tasks)
ACTION = "esm2:action|click"
BUY_AFTER_ACTION = "esm2:buy|action"
BUY_AFTER_OTHER = "esm2:buy|other"


class ESM2Params(ModelParams):
    ctr_task: str = Field(default="ctr", description="impression -> click (label: click)")
    ctavr_task: str | None = Field(
        default="ctavr",
        description="impression -> click and deterministic action (label: click & action); "
        "None: no action label, the action is latent",
    )
    cvr_task: str = Field(default="cvr", description="click -> purchase (mask: click; no loss)")
    ctcvr_task: str = Field(default="ctcvr", description="impression -> click and purchase")
    base: Literal["embedding", "shared_bottom"] = Field(
        default="embedding",
        description="what the towers read: the shared embedding (the paper) or a shared MLP",
    )
    bottom_hidden: tuple[int, ...] = Field(default=(256, 128), min_length=1)
    tower_hidden: tuple[int, ...] = (200, 80)


def log_cvr(z_action: Tensor, z_buy_action: Tensor, z_buy_other: Tensor) -> Tensor:
    """``log pCVR = log(y2 y3 + (1 - y2) y4)`` from the three conditional towers' logits, in log
    space: ``logaddexp(log y2 + log y3, log(1 - y2) + log y4)`` with ``log y = logsigmoid(z)``
    and ``log(1 - y2) = logsigmoid(-z2)`` (Wen et al., SIGIR 2020: pCVR over the decomposition).

    Shapes:
        ``[B]`` each -> ``[B]``.
    """
    via_action = F.logsigmoid(z_action) + F.logsigmoid(z_buy_action)  # [B]
    via_other = F.logsigmoid(-z_action) + F.logsigmoid(z_buy_other)  # [B]
    return torch.logaddexp(via_action, via_other)


@MODELS.register("esm2", params=ESM2Params, paper="Wen et al. SIGIR 2020")
class ESM2(MultiTaskModel):
    """ESM²: impression -> click -> (deterministic / other action) -> purchase, every
    probability over the entire space of impressions.

    Paper: H. Wen, J. Zhang, Y. Wang, F. Lv, W. Bao, Q. Lin, K. Yang, "Entire Space Multi-Task
    Modeling via Post-Click Behavior Decomposition for Conversion Rate Prediction", SIGIR 2020.
    Four towers over shared embeddings: ``y1 = p(click)``, ``y2 = p(action | click)``,
    ``y3 = p(buy | action)``, ``y4 = p(buy | click, no action)``. Derived probabilities:
    ``pCTAVR = y1 y2``, ``pCVR = y2 y3 + (1 - y2) y4`` and ``pCTCVR = y1 pCVR``. Loss: binary
    cross-entropy of ``pCTR``, ``pCTAVR`` and ``pCTCVR`` against click, click & action and
    click & purchase over all impressions (weights: the balancing strategy's, 1 for
    ``static``); CVR has no loss of its own and is evaluated on clicked rows. All products are
    sums of log-sigmoids (:func:`log_cvr`), returned as ``ModelOutput.log_probs``.

    Task roles (options): ``ctr_task`` (a logit), ``ctavr_task``, ``cvr_task``, ``ctcvr_task``
    (log-probabilities). With ``ctavr_task: null`` there is no action label and ``y2`` is a
    latent mixing weight trained through pCTCVR only. Other schema tasks get ordinary towers.
    """

    Params = ESM2Params
    paper = "Wen et al., SIGIR 2020"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: ESM2Params
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        self.roles = {
            r: getattr(p, r)
            for r in ("ctr_task", "ctavr_task", "cvr_task", "ctcvr_task")
            if getattr(p, r) is not None
        }
        self._check_roles(p)
        self.ctr, self.cvr, self.ctcvr, self.ctavr = (
            p.ctr_task,
            p.cvr_task,
            p.ctcvr_task,
            p.ctavr_task,
        )
        self.embedding = self.make_embedding()
        d = self.embedding.out_dim
        self.bottom = (
            MLP(d, p.bottom_hidden, activation=p.activation, dropout=p.dropout)
            if p.base == "shared_bottom"
            else nn.Identity()
        )
        width = p.bottom_hidden[-1] if p.base == "shared_bottom" else d
        inner = [
            TaskSpec(name=n, kind="binary") for n in (ACTION, BUY_AFTER_ACTION, BUY_AFTER_OTHER)
        ]
        derived = {self.cvr, self.ctcvr, self.ctavr}
        towers = [t for t in self.tasks if t.name not in derived] + inner
        self.heads = TaskHeads(
            towers, width, p.tower_hidden, activation=p.activation, dropout=p.dropout
        )

    def _check_roles(self, p: ESM2Params) -> None:
        kinds = {t.name: t.kind for t in self.tasks}
        names = list(self.roles.values())
        if len(set(names)) != len(names):
            raise ConfigError(f"esm2: the task roles must name different tasks, got {self.roles}")
        for role, name in self.roles.items():
            if kinds.get(name) != "binary":
                raise ConfigError(
                    f"esm2: model.params.{role} is {name!r} but the schema has no binary task "
                    f"of that name (tasks: {list(kinds)})"
                    + ("; set ctavr_task: null when there is no action label"
                       if role == "ctavr_task" else "")
                )  # fmt: skip
        for t in self.tasks:
            if t.name in (p.ctr_task, p.ctavr_task, p.ctcvr_task) and t.mask is not None:
                raise ConfigError(
                    f"esm2: task {t.name!r} has mask {t.mask!r}, but ESM² trains pCTR, pCTAVR "
                    "and pCTCVR over the entire space of impressions (Wen et al., SIGIR 2020): "
                    "drop the mask (only the CVR task keeps its click mask, for evaluation)"
                )
            if t.name in (ACTION, BUY_AFTER_ACTION, BUY_AFTER_OTHER):
                raise ConfigError(f"esm2: task name {t.name!r} is reserved for its own towers")
        # terms added to a logit after the forward would miss the products formed from it
        added = {
            "fm_tasks": p.fm_tasks,
            "wide_tasks": getattr(p, "wide_tasks", ()),
            "bias_tower.tasks": getattr(getattr(p, "bias_tower", None), "tasks", ()),
        }
        for option, tasks in added.items():
            if set(tasks) & set(names):
                raise ConfigError(
                    f"esm2: {option} cannot include the ctr, ctavr, cvr or ctcvr task (the "
                    "entire-space products are formed from the towers' own logits)"
                )

    @property
    def loss_task_names(self) -> tuple[str, ...]:
        """Every task but CVR (trained only through pCTCVR)."""
        return tuple(t for t in self.task_names if t != self.cvr)

    def forward(self, features: Features) -> ModelOutput:
        h = self.bottom(self.embedding(features).flat)  # [B, H]
        every, read = self.heads.run(h)
        z1, z2 = every[self.ctr], every[ACTION]
        lcvr = log_cvr(z2, every[BUY_AFTER_ACTION], every[BUY_AFTER_OTHER])  # [B]
        l1 = F.logsigmoid(z1)  # [B] log pCTR
        log_probs = {self.cvr: lcvr, self.ctcvr: l1 + lcvr}
        if self.ctavr is not None:
            log_probs[self.ctavr] = l1 + F.logsigmoid(z2)  # log pCTAVR = log y1 + log y2
        logits = {t: every[t] for t in self.task_names if t in every}
        reads = {t: read[t] for t in logits}
        return ModelOutput(logits, log_probs=log_probs, tower_inputs=reads)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        # the four towers serve the derived products together: shared
        if task in self.roles.values():
            return []
        return params_of(self.heads.towers[task])

    def last_shared_layer(self) -> nn.Parameter | None:
        # every role loss (pCTR, pCTAVR, pCTCVR) contains y1: the click tower's output layer;
        # with other tasks, the shared bottom (none on embeddings)
        if set(self.loss_task_names) <= set(self.roles.values()):
            return self.heads.towers[self.ctr].layers[-1].weight  # [1, hidden]
        if isinstance(self.bottom, MLP):
            return self.bottom.layers[-1].weight
        return None
