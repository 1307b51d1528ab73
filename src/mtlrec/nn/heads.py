"""Task towers: one MLP per task ending in a width-1 logit (or one per class)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
    ) -> None:
        super().__init__()
        self.task_names = tuple(t.name for t in tasks)
        self.towers = nn.ModuleDict(
            {
                t.name: MLP(
                    in_dim,
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

    def forward(self, inputs: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i, name in enumerate(self.task_names):
            y = self.towers[name](self.tower_input(inputs, i, name))  # [B, out_dim]
            out[name] = y.squeeze(-1) if y.shape[-1] == 1 else y
        return out
