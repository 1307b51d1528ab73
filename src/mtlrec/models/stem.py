"""STEM-Net: shared and task-specific embeddings with All Forward Task-specific Backward gates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from mtlrec.batch import Features
from mtlrec.models.base import ModelOutput, MultiTaskModel, params_of
from mtlrec.models.options import ChainParams, heads_kwargs
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.experts import ExpertBank
from mtlrec.nn.gates import Gate
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.stem import aftb_mix
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class STEMParams(ChainParams):
    expert_hidden: tuple[int, ...] = Field(default=(256, 128), min_length=1)
    gate_hidden: tuple[int, ...] = ()


@MODELS.register("stem", params=STEMParams, paper="Su et al. AAAI 2024")
class STEM(MultiTaskModel):
    """STEM-Net: shared and task-specific embeddings, All Forward Task-specific Backward gates.

    T + 1 embedding tables (one per task, one shared), one expert on each (run as one
    :class:`ExpertBank` over the stacked embeddings), and per
    task a softmax gate over all T + 1 experts whose gradient reaches only the task's own and
    the shared expert (other tasks' experts enter with stop-gradient, :func:`aftb_mix`).

    Paper: L. Su et al., "STEM: Unleashing the Power of Embeddings for Multi-task
    Recommendation", AAAI 2024. Gate t reads ``[E_t(x), E_shared(x)]`` (our choice of gate
    input). Expert k is bound to embedding k, so experts are not interchangeable; the bank is
    named ``bank``. Gates are reported as ``gates[task]`` over (task experts..., shared).
    """

    Params = STEMParams
    paper = "Su et al., AAAI 2024"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: STEMParams
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        t = len(self.tasks)
        self.embeddings = nn.ModuleDict(
            {n: self.make_embedding() for n in (*self.task_names, "__shared__")}
        )
        d = self.embeddings["__shared__"].out_dim
        self.bank = ExpertBank(
            t + 1, d, p.expert_hidden, activation=p.activation, dropout=p.dropout,
            shared_input=False, groups=(1,) * (t + 1),  # expert k < T: task k's; T: shared
        )  # fmt: skip
        self.gates = nn.ModuleDict(
            {
                n: Gate(2 * d, t + 1, hidden=p.gate_hidden, activation=p.activation)
                for n in self.task_names
            }
        )
        own = torch.zeros(t, t + 1, dtype=torch.bool)
        own[torch.arange(t), torch.arange(t)] = True
        own[:, t] = True  # the shared expert trains with every task
        self.register_buffer("trainable", own, persistent=False)
        self.heads = TaskHeads(self.tasks, p.expert_hidden[-1], p.tower_hidden, **heads_kwargs(p))

    def forward(self, features: Features) -> ModelOutput:
        embs = [self.embeddings[n](features).flat for n in self.embeddings]  # (T+1) x [B, D]
        experts = self.bank(torch.stack(embs))  # [T+1, B, H]
        shared = embs[-1]
        gates = {
            n: self.gates[n](torch.cat([embs[i], shared], -1))  # [B, T+1]
            for i, n in enumerate(self.task_names)
        }
        stacked = torch.stack([gates[n] for n in self.task_names])  # [T, B, T+1]
        mixed = aftb_mix(stacked, experts, self.trainable)  # [T, B, H]
        logits, read = self.heads.run(mixed)
        return ModelOutput(logits, gates=gates, tower_inputs=read)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        # the task's expert too: the other tasks' gates read it through stop-gradient
        k = self.task_names.index(task)
        own = params_of(self.embeddings[task], self.gates[task], self.heads.towers[task])
        return [*own, *self.bank.group_parameters(k)]

    def last_shared_layer(self) -> nn.Parameter:
        return self.bank.group_layer_weight(len(self.tasks), -1)  # the shared expert, [1, in, out]
