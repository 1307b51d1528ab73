"""Towers conditioned on other towers: a Bayesian network of targets (DBMTL)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlrec.nn.mlp import MLP
from mtlrec.schema import TaskSpec


def parent_order(names: Sequence[str], parents: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """The tasks in an order where every task comes after its parents (schema order kept
    where the graph allows).

    Raises:
        ValueError: an unknown task, a task its own parent, or a cycle.
    """
    known = set(names)
    for t, ps in parents.items():
        bad = [n for n in [t, *ps] if n not in known]
        if bad:
            raise ValueError(f"parents of {t!r}: unknown tasks {bad} (tasks: {list(names)})")
        if t in ps:
            raise ValueError(f"parents of {t!r}: a task cannot be its own parent")
    order: list[str] = []
    while len(order) < len(names):
        ready = [t for t in names if t not in order and all(p in order for p in parents.get(t, ()))]
        if not ready:
            left = [t for t in names if t not in order]
            raise ValueError(f"the parents of tasks {left} form a cycle")
        order.append(ready[0])
    return tuple(order)


class ConditionedTowers(nn.Module):
    """One tower per task; task k's tower reads the shared representation and the last hidden
    layer of each of its parents' towers.

    Paper: Q. Wang, Z. Ji, H. Liu, B. Zhao, "Deep Bayesian Multi-Target Learning for Recommender
    Systems", arXiv:1902.09154, 2019: targets form a Bayesian network,
    ``P(t_1, ..., t_T | x) = prod_k P(t_k | parents(t_k), x)``, whose links are parameterised by
    hidden layers. Here ``h_k = f_k([s; h_j for j in parents(k)])`` (``f_k`` an MLP of widths
    ``hidden``) and ``z_k = w_k h_k + b_k``; the towers run in an order where parents come first.

    Args:
        tasks: the tasks (output width ``output_dim``).
        in_dim: width of the shared representation ``s``.
        hidden: hidden widths of every tower (at least one: its last layer is ``h_k``).
        parents: task -> parent tasks (default: none).
        activation, dropout: of the hidden layers.
        detach_parents: stop a task's gradient at its parents' hidden layers.

    Shapes:
        ``s [B, in_dim] -> (logits task -> [B] or [B, C], inputs task -> [B, in_k])``.

    Example:
        >>> import torch
        >>> from mtlrec.schema import TaskSpec
        >>> ts = [TaskSpec(name=n, kind="binary") for n in ("a", "b")]
        >>> towers = ConditionedTowers(ts, 5, [4], parents={"b": ["a"]})
        >>> logits, read = towers(torch.randn(3, 5))
        >>> tuple(logits["b"].shape), tuple(read["b"].shape)
        ((3,), (3, 9))
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        in_dim: int,
        hidden: Sequence[int],
        *,
        parents: Mapping[str, Sequence[str]] | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        detach_parents: bool = False,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("conditioned towers need at least one hidden layer")
        self.task_names = tuple(t.name for t in tasks)
        self.parents = {t: tuple((parents or {}).get(t, ())) for t in self.task_names}
        self.order = parent_order(self.task_names, self.parents)
        self.detach_parents = detach_parents
        h = hidden[-1]
        self.bodies = nn.ModuleDict(
            {
                t.name: MLP(
                    in_dim + h * len(self.parents[t.name]), hidden, activation=activation,
                    dropout=dropout,
                )
                for t in tasks
            }
        )  # fmt: skip
        self.outputs = nn.ModuleDict({t.name: nn.Linear(h, t.output_dim) for t in tasks})

    def children_of(self, task: str) -> tuple[str, ...]:
        """Tasks that have ``task`` as a parent."""
        return tuple(t for t, ps in self.parents.items() if task in ps)

    def forward(self, s: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        hid: dict[str, Tensor] = {}
        logits: dict[str, Tensor] = {}
        read: dict[str, Tensor] = {}
        for t in self.order:  # parents before children
            ph = [hid[p].detach() if self.detach_parents else hid[p] for p in self.parents[t]]
            x = torch.cat([s, *ph], dim=-1) if ph else s  # [B, in + H * |parents|]
            read[t] = x
            hid[t] = self.bodies[t](x)  # [B, H]
            y = self.outputs[t](hid[t])  # [B, out]
            logits[t] = y.squeeze(-1) if y.shape[-1] == 1 else y
        return {t: logits[t] for t in self.task_names}, read
