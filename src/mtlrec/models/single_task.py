"""Single-task baselines: one independent network per task (nothing shared)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
from torch import nn

from mtlrec.batch import Features
from mtlrec.models.base import ModelOutput, ModelParams, MultiTaskModel, params_of
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mlp import MLP
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class SingleTaskParams(ModelParams):
    bottom_hidden: tuple[int, ...] = Field(default=(256, 128))


@MODELS.register("single_task", params=SingleTaskParams)
class SingleTask(MultiTaskModel):
    """Independent networks per task (own embeddings, bottom and tower): the baseline of the
    seesaw view.

    With one task it is a plain deep network; with several, training them together is the same
    as training them apart (no parameter is shared, so no gradient crosses tasks).
    """

    Params = SingleTaskParams
    paper = "baseline; Caruana, Multitask Learning, Machine Learning 28 (1997)"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: SingleTaskParams
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        self.embeddings = nn.ModuleDict({t: self.make_embedding() for t in self.task_names})
        d_in = self.embeddings[self.task_names[0]].out_dim
        self.bottoms = nn.ModuleDict(
            {
                t: MLP(d_in, p.bottom_hidden, activation=p.activation, dropout=p.dropout)
                for t in self.task_names
            }
        )
        d_out = p.bottom_hidden[-1] if p.bottom_hidden else d_in
        self.heads = TaskHeads(
            self.tasks, d_out, p.tower_hidden, activation=p.activation, dropout=p.dropout
        )

    def forward(self, features: Features) -> ModelOutput:
        reps = {t: self.bottoms[t](self.embeddings[t](features).flat) for t in self.task_names}
        logits, read = self.heads.run(reps)
        return ModelOutput(logits, tower_inputs=read)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return params_of(self.embeddings[task], self.bottoms[task], self.heads.towers[task])
