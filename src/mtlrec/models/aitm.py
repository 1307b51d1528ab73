"""AITM: multi-step conversions with adaptive information transfer between the steps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelOutput, ModelParams, MultiTaskModel, params_of
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mlp import ParallelMLP
from mtlrec.nn.transfer import AdaptiveTransfer
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class AITMParams(ModelParams):
    tower_hidden: tuple[int, ...] = Field(default=(128, 64), min_length=1)
    head_hidden: tuple[int, ...] = ()
    calibration_weight: float = Field(default=0.6, ge=0.0, description="alpha of L_lc")


@MODELS.register("aitm", params=AITMParams, paper="Xi et al. KDD 2021")
class AITM(MultiTaskModel):
    """AITM: steps of a conversion path linked by adaptive information transfer.

    The schema's tasks, in order, are the steps of a conversion path (e.g. impression -> click
    -> purchase, every label over all rows).

    Paper: D. Xi et al., "Modeling the Sequential Dependence among Audience Multi-step
    Conversions with Multi-task Learning in Targeted Display Advertising", KDD 2021. A shared
    embedding feeds one tower per task (all as one :class:`ParallelMLP`), ``q_t``; step t > 1
    reads ``z_t = AIT(z_{t-1}, q_t)`` (:class:`~mtlrec.nn.transfer.AdaptiveTransfer`), step 1
    reads ``z_1 = q_1``; a head maps ``z_t`` to the logit. The behavioural expectation
    calibrator ``L_lc = alpha * mean_i sum_t max(y_t(i) - y_{t-1}(i), 0)`` between consecutive
    binary steps is returned as ``aux_losses['calibration']``; the transfer weights over
    (transferred, own) are reported as gates ``ait_<task>``.
    """

    Params = AITMParams
    paper = "Xi et al., KDD 2021"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: AITMParams
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        if len(self.tasks) < 2:
            raise ConfigError("aitm needs at least two tasks (the steps of a conversion path)")
        self.embedding = self.make_embedding()
        k = p.tower_hidden[-1]
        self.towers = ParallelMLP(
            len(self.tasks), self.embedding.out_dim, p.tower_hidden, activation=p.activation,
            dropout=p.dropout,
        )  # fmt: skip
        self.transfers = nn.ModuleDict({t: AdaptiveTransfer(k) for t in self.task_names[1:]})
        self.heads = TaskHeads(
            self.tasks, k, p.head_hidden, activation=p.activation, dropout=p.dropout
        )

    def forward(self, features: Features) -> ModelOutput:
        q = self.towers(self.embedding(features).flat)  # [T, B, k]
        z = {self.task_names[0]: q[0]}
        gates = {}
        for i, t in enumerate(self.task_names[1:], start=1):  # steps depend on each other
            z[t], gates[f"ait_{t}"] = self.transfers[t](z[self.task_names[i - 1]], q[i])
        logits, read = self.heads.run(z)
        aux = {}
        p: AITMParams = self.params  # type: ignore[assignment]
        if self.training and p.calibration_weight > 0:
            pen = []
            for prev, cur in zip(self.tasks, self.tasks[1:], strict=False):
                if prev.kind == cur.kind == "binary":
                    gap = torch.sigmoid(logits[cur.name]) - torch.sigmoid(logits[prev.name])
                    pen.append(gap.clamp_min(0).mean())
            if pen:
                aux["calibration"] = p.calibration_weight * torch.stack(pen).sum()
        return ModelOutput(logits, gates=gates, tower_inputs=read, aux_losses=aux)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        # every head is its step's own; a transfer also feeds the later steps (through z_t),
        # so only the last step's transfer is task-specific
        if task == self.task_names[-1] and task in self.transfers:
            return params_of(self.transfers[task], self.heads.towers[task])
        return params_of(self.heads.towers[task])

    def last_shared_layer(self) -> nn.Parameter:
        # the towers' last layer, [T, in, out]: step 1 reads q_1 and every later step reads
        # q_1 through the transfers (and its own q_t); no transfer is reached by step 1
        return self.towers.weights[-1]
