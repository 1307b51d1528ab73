"""Shared-Bottom: one bottom network shared by all tasks, one tower per task."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
from torch import nn

from mtlrec.batch import Features
from mtlrec.models.base import ModelOutput, MultiTaskModel, params_of
from mtlrec.models.options import ChainParams, heads_kwargs
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mlp import MLP
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class SharedBottomParams(ChainParams):
    bottom_hidden: tuple[int, ...] = Field(default=(256, 128), min_length=1)


@MODELS.register("shared_bottom", params=SharedBottomParams)
class SharedBottom(MultiTaskModel):
    """Hard parameter sharing: a shared bottom MLP feeding per-task towers.

    Paper: R. Caruana, "Multitask Learning", Machine Learning 28 (1997); the "Shared-Bottom"
    baseline of Ma et al., KDD 2018 (MMoE), Fig. 1(a).
    """

    Params = SharedBottomParams
    paper = "Caruana 1997; Ma et al. KDD 2018 (baseline)"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: SharedBottomParams
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        self.embedding = self.make_embedding()
        self.bottom = MLP(
            self.embedding.out_dim, p.bottom_hidden, activation=p.activation, dropout=p.dropout
        )
        self.heads = TaskHeads(self.tasks, p.bottom_hidden[-1], p.tower_hidden, **heads_kwargs(p))

    def forward(self, features: Features) -> ModelOutput:
        h = self.bottom(self.embedding(features).flat)  # [B, H]
        logits, read = self.heads.run(h)
        return ModelOutput(logits, tower_inputs=read)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return params_of(self.heads.towers[task])

    def last_shared_layer(self) -> nn.Parameter:
        return self.bottom.layers[-1].weight  # [out, in]
