"""Task towers: one MLP per task ending in a width-1 logit (or one per class).

Task chaining: a tower may also read another task's prediction (a probability for a binary
source, the value for a regression one) as one extra input column, detached or not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlrec.nn.mlp import MLP
from mtlrec.schema import TaskSpec


class TaskHeads(nn.Module):
    """One tower per task, keyed by task name.

    Args:
        tasks: the tasks (a tower's output width is the task's ``output_dim``: 1 for binary and
            regression, the number of classes for multiclass).
        in_dim: input width of every tower.
        hidden: hidden widths of every tower (empty: a single linear layer).
        activation, dropout: of the hidden layers.
        chain: task -> source task whose prediction the task's tower also reads (sources
            must be binary or regression tasks; no cycles).
        chain_detach: stop the chained task's gradient at the source's prediction.

    Shapes:
        input: one ``[B, in_dim]`` tensor for all towers, a ``[T, B, in_dim]`` stack in task
        order, or a mapping task -> ``[B, in_dim]``; output: task -> ``[B]`` (width 1) or
        ``[B, C]``.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        in_dim: int,
        hidden: Sequence[int] = (),
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        chain: Mapping[str, str] | None = None,
        chain_detach: bool = True,
    ) -> None:
        super().__init__()
        self.task_names = tuple(t.name for t in tasks)
        self.chain = dict(chain or {})
        self.chain_detach = chain_detach
        self.order = _chain_order(tasks, self.chain)
        self.kinds = {t.name: t.kind for t in tasks}
        self.towers = nn.ModuleDict(
            {
                t.name: MLP(
                    in_dim + (t.name in self.chain),
                    [*hidden, t.output_dim],
                    activation=activation,
                    dropout=dropout,
                    last_activation=False,
                )
                for t in tasks
            }
        )

    def tower_input(self, inputs: Tensor | Mapping[str, Tensor], i: int, name: str) -> Tensor:
        if isinstance(inputs, Mapping):
            return inputs[name]
        return inputs if inputs.dim() == 2 else inputs[i]

    def run(
        self, inputs: Tensor | Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Logits and the inputs every tower read (with the chained column, if any)."""
        out: dict[str, Tensor] = {}
        read: dict[str, Tensor] = {}
        index = {n: i for i, n in enumerate(self.task_names)}
        for name in self.order:
            x = self.tower_input(inputs, index[name], name)  # [B, in_dim]
            src = self.chain.get(name)
            if src is not None:
                z = out[src]
                pred = torch.sigmoid(z) if self.kinds[src] == "binary" else z  # [B]
                pred = pred.detach() if self.chain_detach else pred
                x = torch.cat([x, pred.unsqueeze(-1)], dim=-1)  # [B, in_dim + 1]
            read[name] = x
            y = self.towers[name](x)  # [B, out_dim]
            out[name] = y.squeeze(-1) if y.shape[-1] == 1 else y
        return {n: out[n] for n in self.task_names}, read

    def forward(self, inputs: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.run(inputs)[0]


def _chain_order(tasks: Sequence[TaskSpec], chain: Mapping[str, str]) -> tuple[str, ...]:
    """Task names with every chain source before the tasks reading it."""
    kinds = {t.name: t.kind for t in tasks}
    for dst, src in chain.items():
        if dst not in kinds or src not in kinds:
            raise ValueError(f"chain {dst!r} <- {src!r}: unknown task (tasks: {list(kinds)})")
        if kinds[src] == "multiclass":
            raise ValueError(f"chain {dst!r} <- {src!r}: a multiclass task cannot be a source")
    order: list[str] = []
    for name in kinds:
        path: list[str] = []
        n: str | None = name
        while n is not None and n not in order:
            if n in path:
                raise ValueError(f"task chain has a cycle through {n!r}")
            path.append(n)
            n = chain.get(n)
        order.extend(reversed(path))
    return tuple(order)
