"""ESMM: CVR modelled over the entire space through pCTCVR = pCTR x pCVR."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelOutput, MultiTaskModel, params_of
from mtlrec.models.options import ChainParams, heads_kwargs
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mlp import MLP
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class ESMMParams(ChainParams):
    ctr_task: str = "ctr"
    cvr_task: str = "cvr"
    ctcvr_task: str = "ctcvr"
    base: Literal["embedding", "shared_bottom"] = Field(
        default="embedding",
        description="what the towers read: the shared embedding (the paper) or a shared MLP",
    )
    bottom_hidden: tuple[int, ...] = Field(default=(256, 128), min_length=1)
    tower_hidden: tuple[int, ...] = (200, 80)


@MODELS.register("esmm", params=ESMMParams, paper="Ma et al. SIGIR 2018")
class ESMM(MultiTaskModel):
    """ESMM: CTR and CVR towers, CVR trained over the entire space via pCTCVR = pCTR * pCVR.

    A CTR tower and a CVR tower over shared embeddings, and ``pCTCVR = pCTR * pCVR`` as a
    derived task.

    Paper: X. Ma, L. Zhao, G. Huang, Z. Wang, Z. Hu, X. Zhu, K. Gai, "Entire Space Multi-Task
    Model: An Effective Approach for Estimating Post-Click Conversion Rate", SIGIR 2018.
    Loss (Eq. 3): BCE of pCTR against clicks plus BCE of pCTCVR against click & conversion,
    both over all impressions; the CVR tower has no loss of its own and learns through pCTCVR
    from every impression, clicked or not. ``log pCTCVR = log_sigmoid(z_ctr) +
    log_sigmoid(z_cvr)`` (probabilities multiplied in log space, never logits).

    The schema holds three binary tasks named by ``ctr_task`` (label: click), ``ctcvr_task``
    (label: click and conversion) and ``cvr_task`` (label: conversion, mask: click; evaluated
    on clicked rows, never trained directly). Other tasks get ordinary towers on the same base.
    """

    Params = ESMMParams
    paper = "Ma et al., SIGIR 2018"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: ESMMParams
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        kinds = {t.name: t.kind for t in self.tasks}
        for role in ("ctr_task", "cvr_task", "ctcvr_task"):
            name = getattr(p, role)
            if kinds.get(name) != "binary":
                raise ConfigError(
                    f"esmm: model.params.{role} is {name!r} but the schema has no binary task "
                    f"of that name (tasks: {list(kinds)})"
                )
        masked = {t.name: t.mask for t in self.tasks if t.name in (p.ctr_task, p.ctcvr_task)}
        for name, mask in masked.items():
            if mask is not None:
                raise ConfigError(
                    f"esmm: task {name!r} has mask {mask!r}, but ESMM trains its CTR and CTCVR "
                    "tasks over the entire space of impressions (Ma et al., SIGIR 2018, Eq. 3): "
                    "a mask would restrict pCTCVR to a sub-space and bring back the sample "
                    "selection bias that ESMM removes; drop the mask (only the CVR task keeps "
                    "its click mask, for evaluation)"
                )
        if set(p.fm_tasks) & {p.ctr_task, p.cvr_task, p.ctcvr_task}:
            raise ConfigError("esmm: fm_tasks cannot include the ctr, cvr or ctcvr task")
        if set(p.wide_tasks) & {p.ctr_task, p.cvr_task, p.ctcvr_task}:
            raise ConfigError("esmm: wide_tasks cannot include the ctr, cvr or ctcvr task")
        self.ctr, self.cvr, self.ctcvr = p.ctr_task, p.cvr_task, p.ctcvr_task
        self.embedding = self.make_embedding()
        d = self.embedding.out_dim
        self.bottom = (
            MLP(d, p.bottom_hidden, activation=p.activation, dropout=p.dropout)
            if p.base == "shared_bottom"
            else nn.Identity()
        )
        width = p.bottom_hidden[-1] if p.base == "shared_bottom" else d
        towers = [t for t in self.tasks if t.name != self.ctcvr]
        self.heads = TaskHeads(towers, width, p.tower_hidden, **heads_kwargs(p))

    @property
    def loss_task_names(self) -> tuple[str, ...]:
        """Every task but CVR (trained only through pCTCVR)."""
        return tuple(t for t in self.task_names if t != self.cvr)

    def forward(self, features: Features) -> ModelOutput:
        h = self.bottom(self.embedding(features).flat)  # [B, H]
        logits, read = self.heads.run(h)
        log_ctcvr = F.logsigmoid(logits[self.ctr]) + F.logsigmoid(logits[self.cvr])  # [B]
        return ModelOutput(logits, log_probs={self.ctcvr: log_ctcvr}, tower_inputs=read)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        # the CTR and CVR towers both serve pCTCVR too: they are shared, not task-specific
        if task in (self.ctr, self.cvr, self.ctcvr):
            return []
        return params_of(self.heads.towers[task])

    def last_shared_layer(self) -> nn.Parameter | None:
        # the CTR loss reaches the CTR tower only, the CTCVR loss the CTR and CVR towers: the
        # last layer both reach is the CTR tower's output layer. Other tasks' towers read the
        # base, so with them the last common layer is the shared bottom (none on embeddings).
        if set(self.loss_task_names) <= {self.ctr, self.ctcvr}:
            return self.heads.towers[self.ctr].layers[-1].weight  # [1, hidden]
        if isinstance(self.bottom, MLP):
            return self.bottom.layers[-1].weight
        return None
