"""DBMTL: targets as a Bayesian network of towers over a shared bottom."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
from torch import nn

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelOutput, ModelParams, MultiTaskModel, params_of
from mtlrec.nn.conditional import ConditionedTowers
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.mlp import MLP
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class DBMTLParams(ModelParams):
    bottom_hidden: tuple[int, ...] = Field(default=(256, 128), min_length=1)
    tower_hidden: tuple[int, ...] = Field(
        default=(64,), min_length=1, description="hidden widths of every tower (the last: h_k)"
    )
    parents: dict[str, list[str]] | None = Field(
        default=None,
        description="task -> tasks it is conditioned on; default: every earlier task",
    )
    detach_parents: bool = Field(
        default=False, description="stop a task's gradient at its parents' hidden layers"
    )


@MODELS.register("dbmtl", params=DBMTLParams, paper="Wang et al. arXiv:1902.09154 (2019)")
class DBMTL(MultiTaskModel):
    """DBMTL: each target's tower also reads the hidden layers of the targets it depends on.

    Paper: Q. Wang, Z. Ji, H. Liu, B. Zhao, "Deep Bayesian Multi-Target Learning for
    Recommender Systems", arXiv:1902.09154, 2019. The targets form a Bayesian network,
    ``P(t_1, t_2, t_3 | x) = P(t_1 | x) P(t_2 | t_1, x) P(t_3 | t_1, t_2, x)`` by default
    (``parents``: every earlier task in schema order; any acyclic graph may be given), whose
    links are hidden layers: with ``s`` the shared bottom's output,
    ``h_k = f_k([s; h_j for j in parents(k)])`` and ``z_k = w_k h_k + b_k``
    (:class:`~mtlrec.nn.conditional.ConditionedTowers`). Each task keeps its own loss (the
    negative log-likelihood of the factorisation is their sum); a child's loss also trains its
    parents' towers unless ``detach_parents``.
    """

    Params = DBMTLParams
    paper = "Wang et al., arXiv:1902.09154 (2019)"

    def __init__(
        self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: DBMTLParams
    ) -> None:
        super().__init__(layout, tasks, params)
        p = params
        names = self.task_names
        parents = (
            p.parents
            if p.parents is not None
            else {t: list(names[:i]) for i, t in enumerate(names)}
        )
        self.embedding = self.make_embedding()
        self.bottom = MLP(
            self.embedding.out_dim, p.bottom_hidden, activation=p.activation, dropout=p.dropout
        )
        try:
            self.towers = ConditionedTowers(
                self.tasks, p.bottom_hidden[-1], p.tower_hidden, parents=parents,
                activation=p.activation, dropout=p.dropout, detach_parents=p.detach_parents,
            )  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"dbmtl: model.params.parents: {e}") from None

    def forward(self, features: Features) -> ModelOutput:
        s = self.bottom(self.embedding(features).flat)  # [B, H]
        logits, read = self.towers(s)
        return ModelOutput(logits, tower_inputs=read)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        # a task's output layer is its own; its hidden layers too unless a child reads them
        own = params_of(self.towers.outputs[task])
        if not self.towers.children_of(task) or self.towers.detach_parents:
            own = params_of(self.towers.bodies[task]) + own
        return own

    def task_group_parameters(self, task: str) -> list[nn.Parameter]:
        return params_of(self.towers.bodies[task], self.towers.outputs[task])

    def last_shared_layer(self) -> nn.Parameter:
        return self.bottom.layers[-1].weight  # [out, in]: every tower reads s
