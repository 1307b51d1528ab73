"""Multi-level MMoE: MMoE layers stacked, every task keeping its own stream."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
from torch import nn

from mtlrec.batch import Features
from mtlrec.models.base import ModelOutput, MultiTaskModel, params_of
from mtlrec.models.moe import GatedParams
from mtlrec.models.options import heads_kwargs
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.extraction import StackedMoELevel
from mtlrec.nn.heads import TaskHeads
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class MLMMoEParams(GatedParams):
    num_levels: int = Field(default=2, ge=1)
    num_experts: int = Field(default=4, ge=1, description="experts per level")
    expert_hidden: tuple[int, ...] = Field(default=(256, 128), min_length=1)


@MODELS.register("ml_mmoe", params=MLMMoEParams, paper="Tang et al., RecSys 2020 (baseline)")
class MLMMoE(MultiTaskModel):
    """Multi-level MMoE: ``num_levels`` MMoE layers, each with shared experts and task gates.

    Paper: the ML-MMoE baseline of Tang et al., RecSys 2020 (PLE), Section 5, built on the MMoE
    of Ma et al., KDD 2018. Level 1 is an MMoE over the embedding; at level j > 1 the shared
    experts and task k's gate read task k's output of level j-1:
    ``h^{k,j} = sum_i g^{k,j}(h^{k,j-1})_i f^j_i(h^{k,j-1})``. Unlike PLE there are no
    task-specific experts and no shared gate. With one level it is MMoE.
    """

    Params = MLMMoEParams
    paper = "Tang et al., RecSys 2020 (baseline)"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: MLMMoEParams
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        self.embedding = self.make_embedding()
        width = p.expert_hidden[-1]
        self.levels = nn.ModuleList(
            StackedMoELevel(
                len(self.tasks),
                p.num_experts,
                self.embedding.out_dim if i == 0 else width,
                p.expert_hidden,
                first=i == 0,
                gate_options=p.gate_options(),
                activation=p.activation,
                dropout=p.dropout,
            )
            for i in range(p.num_levels)
        )
        self.heads = TaskHeads(self.tasks, width, p.tower_hidden, **heads_kwargs(p))

    def forward(self, features: Features) -> ModelOutput:
        h = self.embedding(features).flat  # [B, D]
        gates, routed = {}, []
        last = len(self.levels) - 1
        for i, level in enumerate(self.levels):
            h, g = level(h)  # h: [T, B, H], g.weights: [T, B, E]
            routed.append(g)
            prefix = "" if i == last else f"level{i}."
            gates |= {prefix + t: g.weights[j] for j, t in enumerate(self.task_names)}
        aux = self.params.gate_aux(routed)  # type: ignore[attr-defined]
        logits, read = self.heads.run(h)
        return ModelOutput(logits, gates=gates, tower_inputs=read, aux_losses=aux)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        # task k's gate at every level: its mixture is task k's stream, which only task k's
        # gates and task k's pass through the (shared) experts of the next level read
        k = self.task_names.index(task)
        gates = [p for lvl in self.levels for p in lvl.task_gate_parameters(k)]
        return [*params_of(self.heads.towers[task]), *gates]

    def last_shared_layer(self) -> nn.Parameter:
        return self.levels[-1].experts.weights[-1]  # the last level's experts, last layer
