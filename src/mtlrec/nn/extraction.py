"""Multi-level expert blocks: a CGC / PLE extraction level and a stacked-MMoE level.

Each level runs all of its experts as one :class:`~mtlrec.nn.experts.ExpertBank` (one fused
GEMM when the experts share their input, one batched matmul otherwise), its task gates as one
:class:`~mtlrec.nn.gates.GateBank`, and mixes every gate's experts with one einsum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlrec.nn.experts import ExpertBank
from mtlrec.nn.gates import Gate, GateBank, GateOutput
from mtlrec.nn.mixture import mix


class ExtractionLevel(nn.Module):
    """One extraction network of PLE (a CGC layer when it is the only one).

    Experts are ordered task by task (``experts_per_task`` each), then the ``shared_experts``.
    Task k's gate weighs task k's experts and the shared ones; the optional shared gate weighs
    every expert of the level and feeds the next level's shared experts.

    Args:
        num_tasks: T.
        experts_per_task: m, task-specific experts of each task.
        shared_experts: s.
        in_dim: input width.
        expert_dims: layer widths of every expert.
        shared_gate: whether the level has a shared gate (every PLE level but the last).
        first: the level reads one ``[B, in_dim]`` input (the embedding); otherwise it reads
            ``[T + 1, B, in_dim]``: each task's stream of the previous level, then the shared one.
        gate_options: keyword arguments of the gates (:class:`Gate`).
        activation, dropout: of the experts.

    Shapes:
        input ``[B, in]`` or ``[T + 1, B, in]`` -> ``[T (+1), B, expert_dims[-1]]`` (task
        streams, then the shared stream when ``shared_gate``).

    Example:
        >>> import torch
        >>> lvl = ExtractionLevel(3, 2, 1, 8, [6], shared_gate=True, first=True)
        >>> out, gates = lvl(torch.randn(5, 8))
        >>> out.shape, gates[0].weights.shape, gates[1].weights.shape
        (torch.Size([4, 5, 6]), torch.Size([3, 5, 3]), torch.Size([5, 7]))
    """

    def __init__(
        self,
        num_tasks: int,
        experts_per_task: int,
        shared_experts: int,
        in_dim: int,
        expert_dims: Sequence[int],
        *,
        shared_gate: bool,
        first: bool,
        gate_options: dict[str, Any] | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if experts_per_task < 1 or shared_experts < 1:
            raise ValueError("an extraction level needs >= 1 task-specific and shared expert")
        t, m, s = num_tasks, experts_per_task, shared_experts
        self.num_tasks, self.experts_per_task, self.shared_experts = t, m, s
        self.num_experts = t * m + s
        self.first = first
        opts = dict(gate_options or {})
        self.experts = ExpertBank(
            self.num_experts,
            in_dim,
            expert_dims,
            activation=activation,
            dropout=dropout,
            shared_input=first,
        )
        self.task_gates = GateBank(t, in_dim, m + s, shared_input=first, **opts)
        self.shared_gate = Gate(in_dim, self.num_experts, **opts) if shared_gate else None
        # stream each expert reads: its task's (0..T-1) or the shared one (T)
        group = torch.cat([torch.arange(t).repeat_interleave(m), torch.full((s,), t)])
        self.register_buffer("expert_stream", group, persistent=False)
        # experts task k's gate weighs: its own, then the shared ones  [T, m + s]
        own = torch.arange(t * m).view(t, m)
        shared = torch.arange(t * m, t * m + s).expand(t, s)
        self.register_buffer("task_experts", torch.cat([own, shared], 1), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, list[GateOutput]]:
        t = self.num_tasks
        expert_in = x if self.first else x.index_select(0, self.expert_stream)  # [E, B, in]
        experts = self.experts(expert_in)  # [E, B, H]
        tg = self.task_gates.route(x if self.first else x[:t])  # weights [T, B, m + s]
        bsz = tg.weights.shape[1]
        idx = self.task_experts.unsqueeze(1).expand(t, bsz, -1)  # [T, B, m + s]
        full = tg.weights.new_zeros(t, bsz, self.num_experts).scatter(2, idx, tg.weights)
        routed = [tg]
        if self.shared_gate is not None:
            sg = self.shared_gate.route(x if self.first else x[t])  # [B, E]
            full = torch.cat([full, sg.weights.unsqueeze(0)])  # [T + 1, B, E]
            routed.append(sg)
        return mix(full, experts), routed  # [T (+1), B, H]


class StackedMoELevel(nn.Module):
    """One level of a multi-level MMoE: shared experts, one gate per task stream.

    At the first level every task reads the same input (the level is an MMoE layer); at deeper
    levels the experts, still shared, read each task's stream of the previous level (the task
    streams are folded into the batch, so the first layer stays one GEMM) and task k's gate
    reads task k's stream.

    Shapes:
        ``[B, in]`` (first) or ``[T, B, in]`` -> ``[T, B, expert_dims[-1]]``.

    Example:
        >>> import torch
        >>> lvl = StackedMoELevel(2, 3, 8, [6], first=False)
        >>> out, g = lvl(torch.randn(2, 5, 8))
        >>> out.shape, g.weights.shape
        (torch.Size([2, 5, 6]), torch.Size([2, 5, 3]))
    """

    def __init__(
        self,
        num_tasks: int,
        num_experts: int,
        in_dim: int,
        expert_dims: Sequence[int],
        *,
        first: bool,
        gate_options: dict[str, Any] | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.num_experts = num_experts
        self.first = first
        self.experts = ExpertBank(
            num_experts, in_dim, expert_dims, activation=activation, dropout=dropout
        )
        self.gates = GateBank(
            num_tasks, in_dim, num_experts, shared_input=first, **(gate_options or {})
        )

    def forward(self, x: Tensor) -> tuple[Tensor, GateOutput]:
        g = self.gates.route(x)  # weights [T, B, E]
        if self.first:
            return mix(g.weights, self.experts(x)), g  # [T, B, H]
        t, bsz = x.shape[0], x.shape[1]
        e = self.experts(x.reshape(t * bsz, -1)).unflatten(1, (t, bsz))  # [E, T, B, H]
        return torch.einsum("tbe,etbh->tbh", g.weights, e), g  # [T, B, H]
