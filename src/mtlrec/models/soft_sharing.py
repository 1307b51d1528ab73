"""Soft parameter sharing: one network per task, their corresponding layers tied by a penalty."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.models.base import ModelOutput, MultiTaskModel, params_of
from mtlrec.models.options import ChainParams, heads_kwargs
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mlp import ParallelMLP
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class SoftSharingParams(ChainParams):
    bottom_hidden: tuple[int, ...] = Field(default=(256, 128), min_length=1)
    l2_weight: float = Field(default=1e-3, ge=0.0, description="weight of the L2 tie")
    trace_norm_weight: float = Field(default=0.0, ge=0.0, description="weight of the trace norm")


def l2_tie(w: Tensor) -> Tensor:
    """``sum_{s<t} ||W_s - W_t||^2`` over the T stacked members of ``w`` ``[T, ...]``,
    as ``T * sum_t ||W_t - mean||^2`` (the same value, O(T) instead of O(T^2))."""
    flat = w.flatten(1)  # [T, P]
    return flat.shape[0] * (flat - flat.mean(0, keepdim=True)).square().sum()


def trace_norm(w: Tensor) -> Tensor:
    """Nuclear norm of the ``[T, P]`` matrix of the stacked, flattened members."""
    return torch.linalg.matrix_norm(w.flatten(1), ord="nuc")


@MODELS.register("soft_sharing", params=SoftSharingParams, paper="Duong et al. ACL 2015")
class SoftSharing(MultiTaskModel):
    """Soft parameter sharing: per-task networks tied by an L2 (or trace-norm) penalty.

    One bottom network per task (all run as one :class:`ParallelMLP`), one tower per task,
    and a penalty pulling the tasks' corresponding layers together.

    Paper: the "L2-Constrained" baseline of Ma et al., KDD 2018 (MMoE), after L. Duong, T. Cohn,
    S. Bird, P. Cook, "Low Resource Dependency Parsing: Cross-lingual Parameter Sharing in a
    Neural Network Parser", ACL 2015: ``lambda * sum_l sum_{s<t} ||W_s^l - W_t^l||_F^2``.
    Optional trace-norm tie (Y. Yang, T. Hospedales, "Trace Norm Regularised Deep Multi-Task
    Learning", ICLR workshop 2017): ``mu * sum_l ||[vec W_1^l; ...; vec W_T^l]||_*``.
    The penalties are returned in ``ModelOutput.aux_losses`` (``l2_tie``, ``trace_norm``).
    The embedding is shared; the stacked bottom weights count as shared parameters.
    """

    Params = SoftSharingParams
    paper = "Duong et al. ACL 2015; Ma et al. KDD 2018 (L2-Constrained); Yang & Hospedales 2017"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: SoftSharingParams
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        self.embedding = self.make_embedding()
        self.bottoms = ParallelMLP(
            len(self.tasks),
            self.embedding.out_dim,
            p.bottom_hidden,
            activation=p.activation,
            dropout=p.dropout,
        )
        self.heads = TaskHeads(self.tasks, p.bottom_hidden[-1], p.tower_hidden, **heads_kwargs(p))

    def penalties(self) -> dict[str, Tensor]:
        """The tie penalties (weighted), over the weights (not biases) of every bottom layer."""
        p: SoftSharingParams = self.params  # type: ignore[assignment]
        out: dict[str, Tensor] = {}
        ws = [self.bottoms.member_weights(i) for i in range(len(self.bottoms.weights))]
        if p.l2_weight > 0:
            out["l2_tie"] = p.l2_weight * sum(l2_tie(w) for w in ws)  # type: ignore[assignment]
        if p.trace_norm_weight > 0:
            out["trace_norm"] = p.trace_norm_weight * sum(trace_norm(w) for w in ws)  # type: ignore[assignment]
        return out

    def forward(self, features: Features) -> ModelOutput:
        reps = self.bottoms(self.embedding(features).flat)  # [T, B, H]
        logits, read = self.heads.run(reps)
        aux = self.penalties() if self.training else {}
        return ModelOutput(logits, tower_inputs=read, aux_losses=aux)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return params_of(self.heads.towers[task])

    def last_shared_layer(self) -> nn.Parameter:
        # the tied bottoms' last layer, [T, in, out] (the embedding is the only fully shared
        # layer; each task reaches its own member here)
        return self.bottoms.weights[-1]
