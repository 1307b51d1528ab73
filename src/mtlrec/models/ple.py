"""Customized Gate Control (CGC) and Progressive Layered Extraction (PLE).

Paper: H. Tang, J. Liu, M. Zhao, X. Gong, "Progressive Layered Extraction (PLE): A Novel
Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
from torch import nn

from mtlrec.batch import Features
from mtlrec.models.base import ModelOutput, MultiTaskModel, params_of
from mtlrec.models.moe import GatedParams
from mtlrec.models.options import heads_kwargs
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.extraction import ExtractionLevel
from mtlrec.nn.heads import TaskHeads
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class CGCParams(GatedParams):
    experts_per_task: int = Field(default=2, ge=1, description="task-specific experts per task")
    shared_experts: int = Field(default=2, ge=1)
    expert_hidden: tuple[int, ...] = Field(default=(256, 128), min_length=1)


class PLEParams(CGCParams):
    num_levels: int = Field(default=2, ge=1, description="extraction levels")


class _Extraction(MultiTaskModel):
    """Stacked extraction levels; the last one has no shared gate."""

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: CGCParams, levels: int
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        self.embedding = self.make_embedding()
        width = p.expert_hidden[-1]
        self.levels = nn.ModuleList(
            ExtractionLevel(
                len(self.tasks),
                p.experts_per_task,
                p.shared_experts,
                self.embedding.out_dim if i == 0 else width,
                p.expert_hidden,
                shared_gate=i < levels - 1,
                first=i == 0,
                gate_options=p.gate_options(),
                activation=p.activation,
                dropout=p.dropout,
            )
            for i in range(levels)
        )
        self.heads = TaskHeads(self.tasks, width, p.tower_hidden, **heads_kwargs(p))

    def forward(self, features: Features) -> ModelOutput:
        h = self.embedding(features).flat  # [B, D]
        gates, routed = {}, []
        last = len(self.levels) - 1
        for i, level in enumerate(self.levels):
            h, outs = level(h)  # [T (+1), B, H]: task streams, then the shared one
            routed += outs
            prefix = "" if i == last else f"level{i}."
            for j, t in enumerate(self.task_names):
                gates[prefix + t] = outs[0].weights[j]  # [B, m + s]
            if len(outs) > 1:
                gates[f"{prefix}shared"] = outs[1].weights  # [B, E]
        aux = self.params.gate_aux(routed)  # type: ignore[attr-defined]
        logits, read = self.heads.run(h)
        return ModelOutput(logits, gates=gates, tower_inputs=read, aux_losses=aux)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        # what only this task's loss reaches: its tower; the last level's task experts and
        # gate; and the task gate of the level before (its mixture feeds only this task's
        # experts and gate of the last level, which has no shared gate). Task experts below the
        # last level also feed that level's shared gate, and so every task: shared.
        k = self.task_names.index(task)
        levels = list(self.levels)
        own = [*params_of(self.heads.towers[task]), *levels[-1].task_parameters(k)]
        if len(levels) > 1:
            own += levels[-2].task_gate_parameters(k)
        return own

    def task_group_parameters(self, task: str) -> list[nn.Parameter]:
        # the task's tower and, at every level, its own experts and gate
        k = self.task_names.index(task)
        own = params_of(self.heads.towers[task])
        return own + [p for lvl in self.levels for p in lvl.task_parameters(k)]

    def last_shared_layer(self) -> nn.Parameter:
        # the shared experts of the last level, last layer: every task's gate weighs them
        return self.levels[-1].experts.group_layer_weight(len(self.tasks), -1)


@MODELS.register("cgc", params=CGCParams, paper="Tang et al., RecSys 2020")
class CGC(_Extraction):
    """Customized Gate Control: task-specific and shared experts, one gate per task.

    Paper: Tang et al., RecSys 2020 (PLE), Section 4.2. Task k's tower reads
    ``g^k(x) = w^k(x) S^k(x)``, where ``S^k(x)`` stacks task k's ``experts_per_task`` experts
    and the ``shared_experts`` shared experts and ``w^k(x) = softmax(W^k_g x)`` (or any gate of
    ``gate_type``). Task k's loss never reaches another task's experts.
    """

    Params = CGCParams
    paper = "Tang et al., RecSys 2020"

    def __init__(self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: CGCParams) -> None:
        super().__init__(layout, tasks, params, levels=1)


@MODELS.register("ple", params=PLEParams, paper="Tang et al., RecSys 2020")
class PLE(_Extraction):
    """Progressive Layered Extraction: stacked CGC levels with shared gates between them.

    Paper: Tang et al., RecSys 2020, Section 4.3. Level j's task-k experts and gate read task
    k's output of level j-1, ``g^{k,j}(x) = w^{k,j}(g^{k,j-1}(x)) S^{k,j}(x)``; the shared
    experts and the shared gate read the shared output, and the shared gate of every level but
    the last weighs all experts of its level (every task's and the shared ones). The towers
    read the task outputs of the last level.
    """

    Params = PLEParams
    paper = "Tang et al., RecSys 2020"

    def __init__(self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: PLEParams) -> None:
        super().__init__(layout, tasks, params, levels=params.num_levels)
