"""Mixture-of-experts models: OMoE (one gate) and MMoE (one gate per task)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from mtlrec.batch import Features
from mtlrec.models.base import ModelOutput, MultiTaskModel, params_of
from mtlrec.models.options import ChainParams, heads_kwargs
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.experts import ExpertBank
from mtlrec.nn.gates import Gate, GateOutput, gate_penalty
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mixture import mix
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class GatedParams(ChainParams):
    """Gate options shared by every gated model (see ``docs/gated.md``)."""

    gate_hidden: tuple[int, ...] = ()
    gate_temperature: float = Field(default=1.0, gt=0.0)
    gate_type: Literal["softmax", "dselect"] = "softmax"
    dselect_k: int = Field(default=2, ge=1, description="DSelect-k: number of selectors")
    dselect_gamma: float = Field(default=1.0, gt=0.0, description="DSelect-k: smooth-step width")
    gate_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="expert dropout")
    gate_regularizer: Literal["none", "load_balance", "entropy"] = "none"
    gate_reg_weight: float = Field(default=0.01, ge=0.0)

    def gate_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~mtlrec.nn.gates.Gate` / ``GateBank``."""
        return {
            "hidden": self.gate_hidden,
            "temperature": self.gate_temperature,
            "activation": self.activation,
            "kind": self.gate_type,
            "k": self.dselect_k,
            "gamma": self.dselect_gamma,
            "dropout": self.gate_dropout,
        }

    def gate_aux(self, outs: Sequence[GateOutput]) -> dict[str, torch.Tensor]:
        """The weighted gate regulariser over some gate outputs (empty when off)."""
        if self.gate_regularizer == "none" or self.gate_reg_weight == 0 or not outs:
            return {}
        pens = [gate_penalty(o, self.gate_regularizer) for o in outs]
        total = torch.stack([p for p in pens if p is not None]).sum()
        return {f"gate_{self.gate_regularizer}": self.gate_reg_weight * total}


class MoEParams(GatedParams):
    num_experts: int = Field(default=8, ge=1)
    expert_hidden: tuple[int, ...] = Field(default=(256, 128), min_length=1)


class _MoEBase(MultiTaskModel):
    Params = MoEParams

    def __init__(
        self,
        layout: FeatureLayout,
        tasks: Sequence[TaskSpec],
        params: MoEParams,
        per_task_gates: bool,
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        self.embedding = self.make_embedding()
        d_in = self.embedding.out_dim
        self.experts = ExpertBank(
            p.num_experts, d_in, p.expert_hidden, activation=p.activation, dropout=p.dropout
        )
        # MMoE: one gate per task (even with one task); OMoE: one gate for all
        self.gate_names = self.task_names if per_task_gates else ("shared",)
        self.gates = nn.ModuleDict(
            {g: Gate(d_in, p.num_experts, **p.gate_options()) for g in self.gate_names}
        )
        self.heads = TaskHeads(self.tasks, p.expert_hidden[-1], p.tower_hidden, **heads_kwargs(p))

    def last_shared_layer(self) -> nn.Parameter:
        return self.experts.weights[-1]  # the experts' last layer, [E, in, out] (or [in, E*out])

    def _gate_and_mix(self, features: Features) -> tuple[dict, torch.Tensor, dict]:
        x = self.embedding(features).flat  # [B, D]
        experts = self.experts(x)  # [E, B, H]
        routed = {g: self.gates[g].route(x) for g in self.gate_names}  # name -> [B, E]
        gates = {g: r.weights for g, r in routed.items()}
        stacked = torch.stack([gates[g] for g in self.gate_names])  # [G, B, E]
        aux = self.params.gate_aux(list(routed.values()))  # type: ignore[attr-defined]
        return gates, mix(stacked, experts), aux  # mixed: [G, B, H]


@MODELS.register("mmoe", params=MoEParams)
class MMoE(_MoEBase):
    """Multi-gate Mixture-of-Experts: shared experts, one softmax gate per task.

    Paper: J. Ma, Z. Zhao, X. Yi, J. Chen, L. Hong, E. H. Chi, "Modeling Task Relationships in
    Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018. Task k's tower reads
    ``f^k(x) = sum_i g^k(x)_i f_i(x)`` with ``g^k(x) = softmax(W_gk x)``.
    """

    paper = "Ma et al., KDD 2018"

    def __init__(self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: MoEParams) -> None:
        super().__init__(layout, tasks, params, per_task_gates=True)

    def forward(self, features: Features) -> ModelOutput:
        gates, mixed, aux = self._gate_and_mix(features)  # mixed: [T, B, H]
        logits, read = self.heads.run(mixed)
        return ModelOutput(logits, gates=gates, tower_inputs=read, aux_losses=aux)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return params_of(self.gates[task], self.heads.towers[task])


@MODELS.register("omoe", params=MoEParams)
class OMoE(_MoEBase):
    """One-gate Mixture-of-Experts: shared experts mixed by a single gate for all tasks.

    Paper: the OMoE baseline of Ma et al., KDD 2018 (MMoE), Section 4.
    """

    paper = "Ma et al., KDD 2018 (baseline)"

    def __init__(self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: MoEParams) -> None:
        super().__init__(layout, tasks, params, per_task_gates=False)

    def forward(self, features: Features) -> ModelOutput:
        gates, mixed, aux = self._gate_and_mix(features)  # mixed: [1, B, H]
        h = mixed[0]
        logits, read = self.heads.run(h)
        return ModelOutput(logits, gates=gates, tower_inputs=read, aux_losses=aux)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return params_of(self.heads.towers[task])
