"""Cross-stitch and sluice networks: per-task networks mixed by learned units between layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.models.base import ModelOutput, MultiTaskModel, params_of
from mtlrec.models.options import ChainParams, heads_kwargs
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mlp import ParallelMLP
from mtlrec.nn.stitch import CrossStitch, LayerMix, subspace_orthogonality
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class CrossStitchParams(ChainParams):
    bottom_hidden: tuple[int, ...] = Field(default=(128, 128), min_length=1)
    self_weight: float = Field(default=0.9, description="initial diagonal of every unit")


class SluiceParams(CrossStitchParams):
    subspaces: int = Field(default=2, ge=1)
    orthogonality_weight: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> SluiceParams:
        if any(d % self.subspaces for d in self.bottom_hidden):
            raise ValueError(f"every bottom_hidden width must divide into {self.subspaces}")
        if len(set(self.bottom_hidden)) != 1:
            raise ValueError("sluice layer mixing needs equal bottom_hidden widths")
        return self


class _Stitched(MultiTaskModel):
    """T per-task bottoms, layer by layer (each layer of all tasks one ParallelMLP), with a
    stitch unit after every layer."""

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: CrossStitchParams,
        subspaces: int,
    ) -> None:  # fmt: skip
        super().__init__(layout, tasks, params)
        p = params
        t = len(self.tasks)
        self.embedding = self.make_embedding()
        dims = [self.embedding.out_dim, *p.bottom_hidden]
        self.layers = nn.ModuleList(
            ParallelMLP(
                t, dims[i], [dims[i + 1]], shared_input=i == 0, activation=p.activation,
                dropout=p.dropout,
            )
            for i in range(len(p.bottom_hidden))
        )  # fmt: skip
        self.stitches = nn.ModuleList(
            CrossStitch(t, subspaces=subspaces, self_weight=p.self_weight) for _ in self.layers
        )
        self.heads = TaskHeads(self.tasks, dims[-1], p.tower_hidden, **heads_kwargs(p))

    def bottom(self, features: Features) -> list[Tensor]:
        """The stitched output of every layer, each ``[T, B, H_l]``."""
        x = self.embedding(features).flat  # [B, D]
        outs = []
        for layer, stitch in zip(self.layers, self.stitches, strict=True):
            x = stitch(layer(x))  # [T, B, H_l]
            outs.append(x)
        return outs

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return params_of(self.heads.towers[task])

    def last_shared_layer(self) -> nn.Parameter:
        # the last per-task layer, [T, in, out]: its stitch unit mixes every task's member
        # into every tower
        return self.layers[-1].weights[-1]


@MODELS.register("cross_stitch", params=CrossStitchParams, paper="Misra et al. CVPR 2016")
class CrossStitchNet(_Stitched):
    """Cross-stitch network: per-task networks mixed by a T x T unit after every layer.

    ``x~_t = sum_s alpha_ts x_s`` (initialised at ``self_weight`` on the diagonal).

    Paper: I. Misra, A. Shrivastava, A. Gupta, M. Hebert, "Cross-stitch Networks for Multi-task
    Learning", CVPR 2016. With every alpha the identity, the tasks' networks are independent.
    The embedding is shared (recommendation inputs), the per-task layers are stacked.
    """

    Params = CrossStitchParams
    paper = "Misra et al., CVPR 2016"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: CrossStitchParams
    ) -> None:
        super().__init__(layout, tasks, params, subspaces=1)

    def forward(self, features: Features) -> ModelOutput:
        h = self.bottom(features)[-1]  # [T, B, H]
        logits, read = self.heads.run(h)
        return ModelOutput(logits, tower_inputs=read)


@MODELS.register("sluice", params=SluiceParams, paper="Ruder et al. AAAI 2019")
class SluiceNet(_Stitched):
    """Sluice network: per-task layers mixed by subspace, towers read a mix of all layers.

    Per-task layers are cut into subspaces, all subspaces are mixed by an alpha unit after
    every layer, and a learned per-task mix (beta) of all layers' outputs feeds the towers
    (skip connections).

    Paper: S. Ruder, J. Bingel, I. Augenstein, A. Søgaard, "Latent Multi-task Architecture
    Learning", AAAI 2019. ``orthogonality_weight > 0`` adds their subspace orthogonality
    penalty ``sum ||G_1^T G_2||_F^2`` (per row of the batch) as ``aux_losses['orthogonality']``.
    """

    Params = SluiceParams
    paper = "Ruder et al., AAAI 2019"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: SluiceParams
    ) -> None:
        super().__init__(layout, tasks, params, subspaces=params.subspaces)
        self.mix = LayerMix(len(self.tasks), len(self.layers))

    def forward(self, features: Features) -> ModelOutput:
        p: SluiceParams = self.params  # type: ignore[assignment]
        outs = self.bottom(features)
        h = self.mix(torch.stack(outs))  # [L, T, B, H] -> [T, B, H]
        logits, read = self.heads.run(h)
        aux = {}
        if p.orthogonality_weight > 0 and p.subspaces > 1 and self.training:
            pen = sum(subspace_orthogonality(o, p.subspaces) for o in outs)
            aux["orthogonality"] = p.orthogonality_weight * pen
        return ModelOutput(logits, tower_inputs=read, aux_losses=aux)  # type: ignore[arg-type]
