"""Asymmetric and customized sharing, two of the sharing schemes in the PLE paper's taxonomy.

Paper: H. Tang, J. Liu, M. Zhao, X. Gong, "Progressive Layered Extraction (PLE): A Novel
Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020, Fig. 1(c) and
(d). Asymmetric sharing: every task has its own bottom, and a task's tower also reads the
bottoms of the tasks chosen to feed it (so those bottoms get its gradient too). Customized
sharing: a shared bottom plus task-specific bottoms; a task's tower reads both.
All bottoms of a model run as one :class:`~mtlrec.nn.mlp.ParallelMLP`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelOutput, MultiTaskModel, params_of
from mtlrec.models.options import ChainParams, heads_kwargs
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mlp import ParallelMLP
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class AsymmetricParams(ChainParams):
    bottom_hidden: tuple[int, ...] = Field(default=(256, 128), min_length=1)
    feeds: dict[str, list[str]] | None = Field(
        default=None,
        description="task -> the other tasks whose bottoms its tower also reads; "
        "default: every task reads the bottoms of the tasks before it",
    )


class CustomizedParams(ChainParams):
    shared_hidden: tuple[int, ...] = Field(default=(256, 128), min_length=1)
    specific_hidden: tuple[int, ...] = Field(default=(256, 128), min_length=1)


@MODELS.register("asymmetric_sharing", params=AsymmetricParams, paper="Tang et al. RecSys 2020")
class AsymmetricSharing(MultiTaskModel):
    """Asymmetric sharing: task bottoms whose outputs also feed chosen other tasks' towers.

    PLE paper, Fig. 1(c). Task t's tower reads ``[h_t, h_s for s in feeds[t]]`` (zero-padded
    to one width).

    The bottoms are one stacked network (shared parameters); towers are task parameters.
    """

    Params = AsymmetricParams
    paper = "Tang et al., RecSys 2020 (asymmetric sharing)"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: AsymmetricParams
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        names = self.task_names
        feeds = (
            p.feeds if p.feeds is not None else {t: list(names[:i]) for i, t in enumerate(names)}
        )
        for dst, srcs in feeds.items():
            bad = [s for s in [dst, *srcs] if s not in names]
            if bad or dst in srcs:
                what = f"unknown tasks {bad}" if bad else "a task cannot feed itself"
                raise ConfigError(f"model.params.feeds: {dst!r} <- {srcs}: {what}")
        self.feeds = {t: [names.index(s) for s in feeds.get(t, [])] for t in names}
        self.embedding = self.make_embedding()
        self.bottoms = ParallelMLP(
            len(names), self.embedding.out_dim, p.bottom_hidden, activation=p.activation,
            dropout=p.dropout,
        )  # fmt: skip
        self.width = p.bottom_hidden[-1] * (1 + max(len(v) for v in self.feeds.values()))
        self.heads = TaskHeads(self.tasks, self.width, p.tower_hidden, **heads_kwargs(p))

    def forward(self, features: Features) -> ModelOutput:
        h = self.bottoms(self.embedding(features).flat)  # [T, B, H]
        reps = {}
        for i, t in enumerate(self.task_names):
            x = torch.cat([h[i], *(h[j] for j in self.feeds[t])], dim=-1)  # [B, H * (1 + n)]
            reps[t] = nn.functional.pad(x, (0, self.width - x.shape[-1]))  # [B, width]
        logits, read = self.heads.run(reps)
        return ModelOutput(logits, tower_inputs=read)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return params_of(self.heads.towers[task])

    def last_shared_layer(self) -> nn.Parameter:
        return self.bottoms.weights[-1]  # the bottoms' last layer, [T, in, out]


@MODELS.register("customized_sharing", params=CustomizedParams, paper="Tang et al. RecSys 2020")
class CustomizedSharing(MultiTaskModel):
    """Customized sharing: a shared bottom plus one specific bottom per task.

    Task t's tower reads ``[h_shared, h_t]`` (PLE paper, Fig. 1(d)).

    Shared and specific bottoms run as one stacked network of ``T + 1`` members when their
    widths agree, else as two; the stacked weights count as shared parameters.
    """

    Params = CustomizedParams
    paper = "Tang et al., RecSys 2020 (customized sharing)"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: CustomizedParams
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        self.embedding = self.make_embedding()
        d_in, t = self.embedding.out_dim, len(self.tasks)
        kw = {"activation": p.activation, "dropout": p.dropout}
        self.fused = p.shared_hidden == p.specific_hidden
        if self.fused:  # member 0 is the shared bottom, member 1 + i task i's
            self.bottoms = ParallelMLP(t + 1, d_in, p.shared_hidden, **kw)
        else:
            self.shared = ParallelMLP(1, d_in, p.shared_hidden, **kw)
            self.bottoms = ParallelMLP(t, d_in, p.specific_hidden, **kw)
        width = p.shared_hidden[-1] + p.specific_hidden[-1]
        self.heads = TaskHeads(self.tasks, width, p.tower_hidden, **heads_kwargs(p))

    def forward(self, features: Features) -> ModelOutput:
        x = self.embedding(features).flat  # [B, D]
        h = self.bottoms(x)  # [T(+1), B, H]
        shared, specific = (h[0], h[1:]) if self.fused else (self.shared(x)[0], h)
        reps = {t: torch.cat([shared, specific[i]], -1) for i, t in enumerate(self.task_names)}
        logits, read = self.heads.run(reps)
        return ModelOutput(logits, tower_inputs=read)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return params_of(self.heads.towers[task])

    def last_shared_layer(self) -> nn.Parameter:
        # the shared bottom's last layer (member 0 of the fused stack when widths agree)
        return self.bottoms.weights[-1] if self.fused else self.shared.weights[-1]
