"""Multi-level expert blocks: a CGC / PLE extraction level and a stacked-MMoE level.

Each level runs all of its experts as one :class:`~mtlrec.nn.experts.ExpertBank` (one fused
GEMM when the experts share their input, one batched matmul otherwise), its task gates as one
:class:`~mtlrec.nn.gates.GateBank`, and mixes every gate's experts with one einsum. A task's own
experts and its gate are parameters of their own (the banks store them per owner and
concatenate them at forward time), so :meth:`ExtractionLevel.task_parameters` can hand them to
the task's optimiser group.
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
    every expert of the level and feeds the next level's shared experts. The expert bank keeps
    one parameter group per task and one for the shared experts, the gate bank one per task
    (:meth:`task_parameters`, :meth:`shared_expert_parameters`).

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
            groups=(m,) * t + (s,),  # group k < T: task k's experts; group T: the shared ones
        )
        self.task_gates = GateBank(t, in_dim, m + s, shared_input=first, separate=True, **opts)
        self.shared_gate = Gate(in_dim, self.num_experts, **opts) if shared_gate else None
        # stream each expert reads: its task's (0..T-1) or the shared one (T)
        group = torch.cat([torch.arange(t).repeat_interleave(m), torch.full((s,), t)])
        self.register_buffer("expert_stream", group, persistent=False)
        # experts task k's gate weighs: its own, then the shared ones  [T, m + s]
        own = torch.arange(t * m).view(t, m)
        shared = torch.arange(t * m, t * m + s).expand(t, s)
        self.register_buffer("task_experts", torch.cat([own, shared], 1), persistent=False)

    def task_experts_parameters(self, task: int) -> list[nn.Parameter]:
        """The parameters of task ``task``'s own experts."""
        return self.experts.group_parameters(task)

    def task_gate_parameters(self, task: int) -> list[nn.Parameter]:
        """The parameters of task ``task``'s gate."""
        return self.task_gates.gate_parameters(task)

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """Task ``task``'s own experts and its gate."""
        return [*self.task_experts_parameters(task), *self.task_gate_parameters(task)]

    def shared_expert_parameters(self) -> list[nn.Parameter]:
        """The parameters of the shared experts."""
        return self.experts.group_parameters(self.num_tasks)

    @torch.no_grad()
    def permute_experts_(self, perm: Tensor) -> None:
        """Reorder the experts in place (new expert j := old expert ``perm[j]``) and every
        gate's columns with them: the level computes the same function.

        ``perm`` must keep each expert in its group (a task's experts, the shared ones): task
        k's gate weighs only its own and the shared experts, and expert j reads its group's
        stream.
        """
        perm = torch.as_tensor(perm, dtype=torch.long)
        group = self.expert_stream
        if perm.shape != group.shape or not torch.equal(group[perm], group):
            raise ValueError(f"not a permutation within the expert groups: {perm.tolist()}")
        self.experts.permute_members_(perm)
        own = self.task_experts  # [T, m + s]: expert of gate k's column c
        col = torch.zeros(self.num_tasks, self.num_experts, dtype=torch.long)
        col.scatter_(1, own, torch.arange(own.shape[1]).expand_as(own))  # column of expert e
        self.task_gates.permute_experts_(col.gather(1, perm[own]))  # [T, m + s]
        if self.shared_gate is not None:
            self.shared_gate.permute_experts_(perm)

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
    reads task k's stream. Task k's gate is a parameter group of its own
    (:meth:`task_gate_parameters`).

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
            num_tasks,
            in_dim,
            num_experts,
            shared_input=first,
            separate=True,  # task k's gate: parameters of its own
            **(gate_options or {}),
        )

    def task_gate_parameters(self, task: int) -> list[nn.Parameter]:
        """The parameters of task ``task``'s gate."""
        return self.gates.gate_parameters(task)

    @torch.no_grad()
    def permute_experts_(self, perm: Tensor) -> None:
        """Reorder the experts in place (new expert j := old expert ``perm[j]``) and the gates'
        columns with them: the level computes the same function."""
        self.experts.permute_members_(perm)
        self.gates.permute_experts_(perm)

    def forward(self, x: Tensor) -> tuple[Tensor, GateOutput]:
        g = self.gates.route(x)  # weights [T, B, E]
        if self.first:
            return mix(g.weights, self.experts(x)), g  # [T, B, H]
        t, bsz = x.shape[0], x.shape[1]
        e = self.experts(x.reshape(t * bsz, -1)).unflatten(1, (t, bsz))  # [E, T, B, H]
        return torch.einsum("tbe,etbh->tbh", g.weights, e), g  # [T, B, H]
