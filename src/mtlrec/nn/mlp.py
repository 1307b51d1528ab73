"""Multi-layer perceptrons: one network (:class:`MLP`) and n independent ones run as one
(:class:`ParallelMLP`).

``ParallelMLP`` is the building block of expert banks, gates and sequence-free towers: the weights
of its n members are stacked, so a layer of all members is one matrix product. When the members
share their input (experts of one MMoE layer all read the same embedding), the first layer of all
members is a single GEMM ``[B, in] @ [in, n * h1]``; deeper layers (and members with their own
inputs) are one batched matmul ``[n, B, h] @ [n, h, h']``. Every member is initialised
independently, with the scheme of ``nn.Linear`` (uniform in ±1/sqrt(fan_in)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": F.leaky_relu,
}
_INPLACE = {"relu": torch.relu_}


def _is_batched(t: Tensor) -> bool:
    """Whether ``t`` is a vmap-batched tensor (as in ``autograd.grad(is_grads_batched=True)``)."""
    ft = torch._C._functorch
    return bool(ft.is_legacy_batchedtensor(t) or ft.is_batchedtensor(t))


class _ReluThenMemberLinear(torch.autograd.Function):
    """``relu(h)`` viewed per member, then each member's second layer, with a backward that
    writes the input gradient straight into ``h``'s ``[B, n * d]`` layout.

    Autograd's own chain (relu, view, transpose, baddbmm) gets the input gradient as
    ``[n, B, d]`` from the batched matmul, copies it into ``[B, n * d]`` for the view and
    allocates one more buffer for the relu's backward: two extra passes over the widest
    activation of the network. Here the batched matmul writes into a strided view of one buffer
    and the relu mask is applied in place. ``h`` (the fused first layer's pre-activation, used
    by nothing else) is activated in place.
    """

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Tensor, num: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        bsz = h.shape[0]
        h.relu_()
        ctx.mark_dirty(h)
        ctx.set_materialize_grads(False)
        x = h.view(bsz, num, -1).transpose(0, 1)  # [n, B, d], strided
        ctx.save_for_backward(h, w)
        ctx.num = num
        return torch.baddbmm(b, x, w), h

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_h: Tensor | None):  # type: ignore[override]
        h, w = ctx.saved_tensors
        if w.dtype != h.dtype:  # autocast ran the forward in h's dtype (bf16 / fp16)
            w = w.to(h.dtype)
        num = ctx.num
        bsz = h.shape[0]
        x = h.view(bsz, num, -1).transpose(0, 1)
        grad_in = grad_w = grad_b = None
        if grad_out is not None:
            if ctx.needs_input_grad[0] and _is_batched(grad_out):
                # per-task gradients (``is_grads_batched``): vmap-friendly ops only
                grad_in = torch.bmm(grad_out, w.transpose(1, 2)).transpose(0, 1).reshape(h.shape)
                if grad_h is not None:
                    grad_in = grad_in + grad_h
                grad_in = torch.ops.aten.threshold_backward(grad_in, h, 0)
            elif ctx.needs_input_grad[0]:
                grad_in = torch.empty_like(h)
                torch.bmm(
                    grad_out, w.transpose(1, 2), out=grad_in.view(bsz, num, -1).transpose(0, 1)
                )
                if grad_h is not None:
                    grad_in.add_(grad_h)
                torch.ops.aten.threshold_backward.grad_input(grad_in, h, 0, grad_input=grad_in)
            if ctx.needs_input_grad[1]:
                grad_w = torch.bmm(x.transpose(1, 2), grad_out)
            if ctx.needs_input_grad[2]:
                grad_b = grad_out.sum(1, keepdim=True)
        elif grad_h is not None and ctx.needs_input_grad[0]:
            grad_in = torch.ops.aten.threshold_backward(grad_h, h, 0)
        return grad_in, grad_w, grad_b, None


def activation_fn(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}"
        ) from None


def check_dropout(dropout: float) -> float:
    """``dropout`` if it is a rate in [0, 1); a ``ValueError`` otherwise (a negative rate would
    silently mean no dropout, a rate of 1 a layer that outputs only zeros)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return dropout


class MLP(nn.Module):
    """Linear layers with an activation (and optional dropout / layer norm) between them.

    Args:
        in_dim: input width.
        dims: widths of the layers, in order.
        activation: name of the activation.
        dropout: dropout after each activated layer.
        layer_norm: layer norm before each activation.
        last_activation: activate the last layer too (False for a layer producing logits).

    Shapes:
        ``[..., in_dim] -> [..., dims[-1]]``; the identity when ``dims`` is empty.
    """

    def __init__(
        self,
        in_dim: int,
        dims: Sequence[int],
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        layer_norm: bool = False,
        last_activation: bool = True,
    ) -> None:
        super().__init__()
        self.act = activation_fn(activation)
        self.dropout = check_dropout(dropout)
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        prev = in_dim
        for d in dims:
            self.layers.append(nn.Linear(prev, d))
            self.norms.append(nn.LayerNorm(d) if layer_norm else nn.Identity())
            prev = d
        self.last_activation = last_activation
        self.out_dim = prev

    def forward(self, x: Tensor) -> Tensor:
        n = len(self.layers)
        for i, (lin, norm) in enumerate(zip(self.layers, self.norms, strict=True)):
            x = lin(x)
            if i < n - 1 or self.last_activation:
                x = self.act(norm(x))
                if self.dropout > 0:
                    x = F.dropout(x, self.dropout, self.training)
        return x


class ParallelMLP(nn.Module):
    """n independent MLPs of the same shape, computed together.

    Args:
        num: number of members (experts, gates, towers).
        in_dim: input width of every member.
        dims: layer widths of every member.
        shared_input: all members read one ``[B, in_dim]`` input (fused first layer);
            otherwise each reads its own slice of ``[num, B, in_dim]``.
        activation, dropout, layer_norm, last_activation: as in :class:`MLP`.

    Shapes:
        ``[B, in_dim]`` (shared) or ``[num, B, in_dim]`` -> ``[num, B, dims[-1]]``.

    Example:
        >>> import torch
        >>> bank = ParallelMLP(8, 32, [64, 16])
        >>> bank(torch.randn(5, 32)).shape
        torch.Size([8, 5, 16])
    """

    def __init__(
        self,
        num: int,
        in_dim: int,
        dims: Sequence[int],
        *,
        shared_input: bool = True,
        activation: str = "relu",
        dropout: float = 0.0,
        layer_norm: bool = False,
        last_activation: bool = True,
    ) -> None:
        super().__init__()
        if not dims:
            raise ValueError("ParallelMLP needs at least one layer")
        self.num = num
        self.in_dim = in_dim
        self.dims = tuple(dims)
        self.shared_input = shared_input
        self.activation = activation
        self.act = activation_fn(activation)
        self.dropout = check_dropout(dropout)
        self.layer_norm = layer_norm
        self.last_activation = last_activation
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        prev = in_dim
        for i, d in enumerate(dims):
            if i == 0 and shared_input:
                # columns [k*d:(k+1)*d] belong to member k
                w = nn.Parameter(torch.empty(in_dim, num * d))
                b = nn.Parameter(torch.empty(num * d))
            else:
                w = nn.Parameter(torch.empty(num, prev, d))
                b = nn.Parameter(torch.empty(num, 1, d))
            bound = 1.0 / math.sqrt(prev)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
            self.weights.append(w)
            self.biases.append(b)
            prev = d
        self.out_dim = prev

    def layer_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        """Every layer's weight and bias with all members stacked (subclasses may store the
        members in pieces and assemble them here)."""
        return list(self.weights), list(self.biases)

    def member_weight(self, layer: int, member: int) -> Tensor:
        """The ``[in, out]`` weight of one member in one layer (a view)."""
        w = self.layer_tensors()[0][layer]
        if layer == 0 and self.shared_input:
            d = self.dims[0]
            return w[:, member * d : (member + 1) * d]
        return w[member]

    def member_weights(self, layer: int) -> Tensor:
        """The weights of all members in one layer, ``[num, in, out]`` (a view)."""
        w = self.layer_tensors()[0][layer]
        if layer == 0 and self.shared_input:
            return w.view(w.shape[0], self.num, self.dims[0]).transpose(0, 1)  # [num, in, d]
        return w

    def _activate(self, x: Tensor, last: bool) -> Tensor:
        if last and not self.last_activation:
            return x
        if self.layer_norm:
            x = F.layer_norm(x, x.shape[-1:])
        inplace = _INPLACE.get(self.activation)
        x = inplace(x) if inplace is not None else self.act(x)
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        return x

    def forward(self, x: Tensor) -> Tensor:
        weights, biases = self.layer_tensors()
        n_layers = len(weights)
        fuse = (
            self.shared_input
            and n_layers > 1
            and self.activation == "relu"
            and not self.layer_norm
            and self.dropout == 0
            and torch.is_grad_enabled()
            # the fused Function has no vmap rule: plain ops under torch.func transforms
            and not torch._C._are_functorch_transforms_active()
        )
        for i in range(n_layers):
            w, b = weights[i], biases[i]
            last = i == n_layers - 1
            if fuse and i == 0:
                x = torch.addmm(b, x, w)  # [B, num * d], activated by the next layer
            elif fuse and i == 1:
                x = _ReluThenMemberLinear.apply(x, w, b, self.num)[0]
                x = self._activate(x, last)
            elif i == 0 and self.shared_input:
                bsz = x.shape[0]
                # one GEMM for all members; activate the contiguous result, then view it per
                # member (an in-place op on the transposed view would cost copies in backward)
                h = torch.addmm(b, x, w)  # [B, num * d]
                if self.layer_norm:  # normalised per member: view first
                    h = self._activate(h.view(bsz, self.num, self.dims[0]), last)
                else:
                    h = self._activate(h, last)
                x = h.view(bsz, self.num, self.dims[0]).transpose(0, 1)  # [num, B, d] (strided)
            else:
                x = self._activate(torch.baddbmm(b, x, w), last)  # [num, B, d]
        return x
