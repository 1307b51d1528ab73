"""Mixture-of-experts models: OMoE (one gate) and MMoE (one gate per task)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from mtlrec.batch import Features
from mtlrec.models.base import ModelOutput, ModelParams, MultiTaskModel, params_of
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.experts import ExpertBank
from mtlrec.nn.gates import Gate
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mixture import mix
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class MoEParams(ModelParams):
    num_experts: int = Field(default=8, ge=1)
    expert_hidden: tuple[int, ...] = Field(default=(256, 128), min_length=1)
    gate_hidden: tuple[int, ...] = ()
    gate_temperature: float = Field(default=1.0, gt=0.0)


class _MoEBase(MultiTaskModel):
    Params = MoEParams

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: MoEParams, gates: int
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        self.embedding = self.make_embedding()
        d_in = self.embedding.out_dim
        self.experts = ExpertBank(
            p.num_experts, d_in, p.expert_hidden, activation=p.activation, dropout=p.dropout
        )
        self.gate_names = self.task_names if gates > 1 else ("shared",)
        self.gates = nn.ModuleDict(
            {
                g: Gate(
                    d_in,
                    p.num_experts,
                    hidden=p.gate_hidden,
                    temperature=p.gate_temperature,
                    activation=p.activation,
                )
                for g in self.gate_names
            }
        )
        self.heads = TaskHeads(
            self.tasks,
            p.expert_hidden[-1],
            p.tower_hidden,
            activation=p.activation,
            dropout=p.dropout,
        )

    def _gate_and_mix(self, features: Features) -> tuple[dict, torch.Tensor]:
        x = self.embedding(features).flat  # [B, D]
        experts = self.experts(x)  # [E, B, H]
        gates = {g: self.gates[g](x) for g in self.gate_names}  # name -> [B, E]
        stacked = torch.stack([gates[g] for g in self.gate_names])  # [G, B, E]
        return gates, mix(stacked, experts)  # [G, B, H]


@MODELS.register("mmoe", params=MoEParams)
class MMoE(_MoEBase):
    """Multi-gate Mixture-of-Experts: shared experts, one softmax gate per task.

    Paper: J. Ma, Z. Zhao, X. Yi, J. Chen, L. Hong, E. H. Chi, "Modeling Task Relationships in
    Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018. Task k's tower reads
    ``f^k(x) = sum_i g^k(x)_i f_i(x)`` with ``g^k(x) = softmax(W_gk x)``.
    """

    paper = "Ma et al., KDD 2018"

    def __init__(self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: MoEParams) -> None:
        super().__init__(layout, tasks, params, gates=len(tasks))

    def forward(self, features: Features) -> ModelOutput:
        gates, mixed = self._gate_and_mix(features)  # mixed: [T, B, H]
        reps = {t: mixed[i] for i, t in enumerate(self.task_names)}
        return ModelOutput(self.heads(mixed), gates=gates, tower_inputs=reps)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return params_of(self.gates[task], self.heads.towers[task])


@MODELS.register("omoe", params=MoEParams)
class OMoE(_MoEBase):
    """One-gate Mixture-of-Experts: shared experts mixed by a single gate for all tasks.

    Paper: the OMoE baseline of Ma et al., KDD 2018 (MMoE), Section 4.
    """

    paper = "Ma et al., KDD 2018 (baseline)"

    def __init__(self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: MoEParams) -> None:
        super().__init__(layout, tasks, params, gates=1)

    def forward(self, features: Features) -> ModelOutput:
        gates, mixed = self._gate_and_mix(features)  # mixed: [1, B, H]
        h = mixed[0]
        return ModelOutput(self.heads(h), gates=gates, tower_inputs={t: h for t in self.task_names})

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return params_of(self.heads.towers[task])
