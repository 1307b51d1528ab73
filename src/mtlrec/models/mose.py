"""MoSE: a mixture of sequential (recurrent) experts over a behaviour sequence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelOutput, MultiTaskModel, params_of
from mtlrec.models.options import ChainParams, heads_kwargs
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.gates import Gate
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mixture import mix
from mtlrec.nn.sequence import SequenceExpertBank
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class MoSEParams(ChainParams):
    sequence: str | None = Field(
        default=None, description="the behaviour-sequence feature; default: the schema's first"
    )
    cell: Literal["lstm", "gru"] = "lstm"
    bottom_hidden: int = Field(default=32, ge=1, description="state width of the shared bottom")
    num_experts: int = Field(default=4, ge=1)
    expert_hidden: int = Field(default=32, ge=1)
    gate_hidden: tuple[int, ...] = ()
    gate_temperature: float = Field(default=1.0, gt=0.0)


@MODELS.register("mose", params=MoSEParams, paper="Qin et al. KDD 2020")
class MoSE(MultiTaskModel):
    """MoSE: recurrent experts over a behaviour sequence, one gate per task.

    Paper: Z. Qin, Y. Cheng, Z. Zhao, Z. Chen, D. Metzler, J. Qin, "Multitask Mixture of
    Sequential Experts for User Activity Streams", KDD 2020. A shared recurrent bottom reads the
    embedded behaviour sequence; K recurrent experts read the bottom's states; one softmax gate
    per task weighs the experts' final states; each task's tower reads its mixture.

    Adapted to row-level tasks: experts are summarised by their state after the last real
    element (padding never updates a state, so it cannot change the output); gates and towers
    also read the row's other features (the flat embedding, ``x``).
    Shapes: sequence ``[B, L, E]`` -> bottom ``[1, B, L, Hb]`` -> experts ``[K, B, He]`` ->
    per-task mixture ``[T, B, He]``; towers read ``[mixture_t, x]``.
    """

    Params = MoSEParams
    paper = "Qin et al., KDD 2020"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: MoSEParams
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        names = [s.name for s in layout.sequences]
        if not names or (p.sequence is not None and p.sequence not in names):
            raise ConfigError(
                f"mose needs a sequence feature (model.params.sequence={p.sequence!r}; "
                f"sequence features: {names})"
            )
        self.sequence = p.sequence or names[0]
        dim = next(s.dim for s in layout.sequences if s.name == self.sequence)
        self.embedding = self.make_embedding()
        d = self.embedding.out_dim
        self.bottom = SequenceExpertBank(1, dim, p.bottom_hidden, cell=p.cell)
        self.experts = SequenceExpertBank(
            p.num_experts, p.bottom_hidden, p.expert_hidden, cell=p.cell, shared_input=False
        )
        self.gates = nn.ModuleDict(
            {
                t: Gate(
                    p.bottom_hidden + d,
                    p.num_experts,
                    hidden=p.gate_hidden,
                    temperature=p.gate_temperature,
                    activation=p.activation,
                )
                for t in self.task_names
            }
        )
        self.heads = TaskHeads(self.tasks, p.expert_hidden + d, p.tower_hidden, **heads_kwargs(p))

    def forward(self, features: Features) -> ModelOutput:
        x = self.embedding(features).flat  # [B, D]
        seq, mask = self.embedding.embed_sequence(features, self.sequence)  # [B, L, E], [B, L]
        states, last = self.bottom(seq, mask)  # [1, B, L, Hb], [1, B, Hb]
        k = self.experts.num
        _, finals = self.experts(states.expand(k, -1, -1, -1), mask)  # [K, B, He]
        gate_in = torch.cat([last[0], x], dim=-1)  # [B, Hb + D]
        gates = {t: self.gates[t](gate_in) for t in self.task_names}  # t -> [B, K]
        mixed = mix(torch.stack([gates[t] for t in self.task_names]), finals)  # [T, B, He]
        reps = {t: torch.cat([mixed[i], x], -1) for i, t in enumerate(self.task_names)}
        logits, read = self.heads.run(reps)
        return ModelOutput(logits, gates=gates, tower_inputs=read)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return params_of(self.gates[task], self.heads.towers[task])

    def last_shared_layer(self) -> nn.Parameter:
        return self.experts.w_ih  # the recurrent experts' input weights, [K, in, G * H]
