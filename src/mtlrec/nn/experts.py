"""Expert banks: all experts of a layer as one stacked network.

Shared-input experts (the usual MoE layer) run their first layer as one GEMM over the
concatenated weights of every expert and their deeper layers as one batched matmul; see
:class:`mtlrec.nn.mlp.ParallelMLP`. No model loops over experts in Python.

When the experts of one bank belong to different owners (PLE's task-specific experts of each
task, then the shared experts; one gate per task in a gate bank), the bank keeps one set of
parameter tensors per owner (:class:`GroupedParallelMLP`) and concatenates them at forward
time: still one GEMM / batched matmul per layer, and each owner's experts are parameters of
their own, which an optimiser group (a task's learning rate) can hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlrec.nn.mlp import ParallelMLP


class _Members(nn.Module):
    """The parameters of one group of members: per layer a weight and a bias."""

    def __init__(self, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(w.detach().clone()) for w in weights)
        self.biases = nn.ParameterList(nn.Parameter(b.detach().clone()) for b in biases)


class GroupedParallelMLP(ParallelMLP):
    """A :class:`ParallelMLP` whose members are stored in consecutive groups (one set of
    parameter tensors per group), concatenated along the member axis at forward time.

    Args:
        num, in_dim, dims, shared_input, activation, dropout, layer_norm, last_activation: as
            in :class:`ParallelMLP` (initialisation included: every member independent).
        groups: members per group, in member order (summing to ``num``); None: one group, the
            plain stacked parameters ``weights`` / ``biases`` of :class:`ParallelMLP`.

    With groups, group g's parameters are ``groups[g].weights[layer]`` (``[in, k_g * d]`` for a
    shared-input first layer, ``[k_g, in, out]`` otherwise) and ``groups[g].biases[layer]``;
    :meth:`group_parameters` lists them. Checkpoints of the stacked form load (split on load).

    Example:
        >>> import torch
        >>> net = GroupedParallelMLP(5, 4, [6, 3], groups=[2, 2, 1])
        >>> net(torch.randn(7, 4)).shape, tuple(net.group_layer_weight(2, -1).shape)
        (torch.Size([5, 7, 3]), (1, 6, 3))
    """

    def __init__(
        self,
        num: int,
        in_dim: int,
        dims: Sequence[int],
        *,
        groups: Sequence[int] | None = None,
        shared_input: bool = True,
        activation: str = "relu",
        dropout: float = 0.0,
        layer_norm: bool = False,
        last_activation: bool = True,
    ) -> None:
        super().__init__(
            num,
            in_dim,
            dims,
            shared_input=shared_input,
            activation=activation,
            dropout=dropout,
            layer_norm=layer_norm,
            last_activation=last_activation,
        )
        self.group_sizes: tuple[int, ...] = (num,) if groups is None else tuple(groups)
        if sum(self.group_sizes) != num or min(self.group_sizes) < 1:
            raise ValueError(f"groups {self.group_sizes} must be >= 1 and sum to {num}")
        self.grouped = groups is not None
        if not self.grouped:
            return
        stacked_w, stacked_b = list(self.weights), list(self.biases)
        del self.weights, self.biases  # the groups hold the parameters from here on
        self.groups = nn.ModuleList(
            _Members(
                [self._piece(i, w, g) for i, w in enumerate(stacked_w)],
                [self._piece(i, b, g) for i, b in enumerate(stacked_b)],
            )
            for g in range(len(self.group_sizes))
        )
        self._register_load_state_dict_pre_hook(self._split_stacked)

    def _member_axis(self, layer: int) -> int:
        """Axis of the members in layer ``layer``'s weight and bias (the columns of a fused
        shared-input first layer, ``[in, num * d]`` / ``[num * d]``, else the leading axis)."""
        return 1 if layer == 0 and self.shared_input else 0

    def _piece(self, layer: int, t: Tensor, group: int) -> Tensor:
        """Group ``group``'s slice of a stacked weight or bias of layer ``layer``."""
        lo = sum(self.group_sizes[:group])
        k = self.group_sizes[group]
        if layer == 0 and self.shared_input:
            d = self.dims[0]
            axis = t.dim() - 1  # weight [in, num * d] or bias [num * d]: columns of member
            return t.narrow(axis, lo * d, k * d)
        return t.narrow(0, lo, k)

    def layer_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        if not self.grouped:
            return super().layer_tensors()
        ws, bs = [], []
        for i in range(len(self.dims)):
            gw = [m.weights[i] for m in self.groups]  # type: ignore[union-attr]
            gb = [m.biases[i] for m in self.groups]  # type: ignore[union-attr]
            wax = self._member_axis(i)
            ws.append(torch.cat(gw, dim=wax))  # [in, num * d] or [num, in, out]
            bs.append(torch.cat(gb, dim=0))  # [num * d] or [num, 1, out]
        return ws, bs

    def group_parameters(self, group: int) -> list[nn.Parameter]:
        """The parameters of the members of group ``group`` (all of them without groups)."""
        if not self.grouped:
            return list(self.parameters())
        return list(self.groups[group].parameters())

    def group_layer_weight(self, group: int, layer: int) -> nn.Parameter:
        """The weight of group ``group`` in layer ``layer`` (a parameter)."""
        if not self.grouped:
            return self.weights[layer]
        return self.groups[group].weights[layer]  # type: ignore[index,return-value]

    def _per_member(self, layer: int, t: Tensor) -> Tensor:
        """A stacked weight or bias of ``layer`` viewed per member: ``[num, in, out]`` /
        ``[num, 1, out]`` (the fused first layer's ``[in, num * d]`` / ``[num * d]`` too)."""
        if layer == 0 and self.shared_input:
            d = self.dims[0]
            if t.dim() == 1:
                return t.view(self.num, 1, d)  # bias [num * d] -> [num, 1, d]
            return t.view(t.shape[0], self.num, d).transpose(0, 1)  # [in, num*d] -> [num, in, d]
        return t

    def _write_layer_(self, layer: int, w: Tensor, b: Tensor) -> None:
        """Copy per-member ``w [num, in, out]`` and ``b [num, 1, out]`` into layer ``layer``'s
        storage (the fused layout and the groups' pieces included)."""
        if layer == 0 and self.shared_input:
            w = w.transpose(0, 1).reshape(w.shape[1], -1)  # [in, num * d]
            b = b.reshape(-1)  # [num * d]
        for g in range(len(self.group_sizes)):
            store = self.groups[g] if self.grouped else self
            store.weights[layer].copy_(self._piece(layer, w, g))  # type: ignore[index,union-attr,operator]
            store.biases[layer].copy_(self._piece(layer, b, g))  # type: ignore[index,union-attr,operator]

    @torch.no_grad()
    def permute_members_(self, perm: Tensor) -> None:
        """Reorder the members in place: new member j := old member ``perm[j]``, every layer.

        A member may move to another group (its parameters are copied there); keeping a
        member with its owner is the caller's concern (see ``ExtractionLevel``). With
        ``shared_input=False`` member j reads input slice j: permute the input too.
        """
        perm = torch.as_tensor(perm, dtype=torch.long)
        if not torch.equal(perm.sort().values, torch.arange(self.num)):
            raise ValueError(f"not a permutation of {self.num} members: {perm.tolist()}")
        ws, bs = self.layer_tensors()
        for i in range(len(self.dims)):
            w = self._per_member(i, ws[i]).index_select(0, perm)  # [num, in, out]
            b = self._per_member(i, bs[i]).index_select(0, perm)  # [num, 1, out]
            self._write_layer_(i, w, b)

    @torch.no_grad()
    def permute_outputs_(self, perm: Tensor) -> None:
        """Reorder the output units of the last layer in place: member g's new output c :=
        its old output ``perm[g, c]`` (``perm`` is ``[num, out]``, or ``[out]`` for all).

        For a gate bank these are the gates' expert columns (their logits).
        """
        last, out = len(self.dims) - 1, self.dims[-1]
        perm = torch.as_tensor(perm, dtype=torch.long).expand(self.num, out)  # [num, out]
        if not torch.equal(perm.sort(-1).values, torch.arange(out).expand(self.num, out)):
            raise ValueError(f"not a permutation of {out} outputs per member: {perm.tolist()}")
        ws, bs = self.layer_tensors()
        w, b = self._per_member(last, ws[last]), self._per_member(last, bs[last])
        w = w.gather(2, perm.unsqueeze(1).expand(-1, w.shape[1], -1))  # [num, in, out]
        b = b.gather(2, perm.unsqueeze(1))  # [num, 1, out]
        self._write_layer_(last, w, b)

    def _split_stacked(self, state_dict: dict, prefix: str, *args: object) -> None:
        """Load a checkpoint of the stacked form (``weights.i`` / ``biases.i``) by splitting."""
        for kind in ("weights", "biases"):
            for i in range(len(self.dims)):
                key = f"{prefix}{kind}.{i}"
                if key in state_dict:
                    t = state_dict.pop(key)
                    for g in range(len(self.group_sizes)):
                        piece = self._piece(i, t, g).clone()
                        state_dict[f"{prefix}groups.{g}.{kind}.{i}"] = piece


class ExpertBank(GroupedParallelMLP):
    """``num_experts`` MLP experts of widths ``dims`` reading one input.

    Args:
        num_experts: number of experts.
        in_dim: input width.
        dims: layer widths of each expert (the last one is the expert's output width).
        activation, dropout, layer_norm: as in :class:`ParallelMLP`.
        shared_input: False when each expert reads its own input slice ``[E, B, in]``.
        groups: experts per owner, in expert order (e.g. each task's experts, then the shared
            ones), each group stored as parameters of its own; None: one stacked set.

    Shapes:
        ``[B, in_dim] -> [E, B, dims[-1]]``.

    Example:
        >>> import torch
        >>> ExpertBank(4, 10, [32, 8])(torch.randn(3, 10)).shape
        torch.Size([4, 3, 8])
    """

    def __init__(
        self,
        num_experts: int,
        in_dim: int,
        dims: Sequence[int],
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        layer_norm: bool = False,
        shared_input: bool = True,
        groups: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            num_experts,
            in_dim,
            dims,
            groups=groups,
            shared_input=shared_input,
            activation=activation,
            dropout=dropout,
            layer_norm=layer_norm,
            last_activation=True,
        )

    @property
    def num_experts(self) -> int:
        return self.num
