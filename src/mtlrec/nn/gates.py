"""Gates: per-row weights over experts.

A gate maps its input to one weight per expert; the weights of a row are non-negative and sum
to one. Two kinds:

* ``softmax`` (MMoE, Ma et al. KDD 2018): a softmax over the expert axis (the last one) of
  linear (or MLP) logits; ``temperature`` divides the logits (``t > 1`` flattens, ``t < 1``
  sharpens).
* ``dselect`` (DSelect-k, Hazimeh et al., NeurIPS 2021): ``k`` single-expert selectors, each a
  binary code of ``m = ceil(log2 n)`` smooth-step bits, combined by a softmax over the
  selectors. Once the smooth-step saturates (every bit 0 or 1) each selector picks exactly one
  expert, so a row has at most ``k`` non-zero weights, and the gate stays differentiable.

Options common to both: hidden layers before the logits, *expert dropout* (in training, each
expert's weight in a row is dropped with probability ``dropout`` and the row renormalised) and
regularisers (:func:`gate_penalty`): the load-balancing CV^2 of expert importance (Shazeer et
al., ICLR 2017), the mean row entropy, and DSelect-k's selector entropy.

:class:`Gate` is one gate; :class:`GateBank` is G gates of the same shape computed together
(one GEMM or one batched matmul), e.g. the task gates of one PLE extraction level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtlrec.nn.experts import GroupedParallelMLP
from mtlrec.nn.mlp import MLP

GATE_KINDS = ("softmax", "dselect")
PENALTIES = ("none", "load_balance", "entropy")


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """The cubic smooth-step of DSelect-k (Hazimeh et al. 2021, eq. 3).

    ``0`` for ``t <= -gamma/2``, ``1`` for ``t >= gamma/2`` and
    ``-2/gamma^3 t^3 + 3/(2 gamma) t + 1/2`` in between: continuously differentiable, and exactly
    0 or 1 (with zero gradient) outside ``[-gamma/2, gamma/2]``.
    """
    inner = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return torch.where(t <= -gamma / 2, 0.0, torch.where(t >= gamma / 2, 1.0, inner))


def code_matrices(num_experts: int) -> tuple[Tensor, Tensor]:
    """Bits of every code and the code -> expert fold of a DSelect-k selector.

    Returns:
        ``bits [2^m, m]`` (bit j of code l) and ``fold [2^m, n]`` (one-hot: code l selects
        expert ``l mod n``; for ``n`` a power of two this is the identity, otherwise the codes
        past ``n - 1`` wrap around, so every code names a valid expert and rows sum to 1).
    """
    m = max(1, math.ceil(math.log2(num_experts)))
    codes = torch.arange(2**m)
    bits = ((codes.unsqueeze(1) >> torch.arange(m)) & 1).float()  # [2^m, m]
    fold = torch.nn.functional.one_hot(codes % num_experts, num_experts).float()  # [2^m, n]
    return bits, fold


@dataclass
class GateOutput:
    """Weights of a gate (or a bank of gates) and what its regularisers need.

    Shapes:
        weights: ``[..., B, n]`` rows summing to 1.
        codes: ``[..., B, k, 2^m]`` the selectors' code distributions (DSelect-k only).
    """

    weights: Tensor
    codes: Tensor | None = None


class _GateHead(nn.Module):
    """Logits -> weights, for either kind (shared by :class:`Gate` and :class:`GateBank`)."""

    def __init__(
        self, num_experts: int, kind: str, temperature: float, k: int, gamma: float, dropout: float
    ) -> None:
        super().__init__()
        if kind not in GATE_KINDS:
            raise ValueError(f"unknown gate kind {kind!r}; choose from {GATE_KINDS}")
        if temperature <= 0:
            raise ValueError("gate temperature must be > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError("gate dropout must be in [0, 1)")
        if kind == "dselect" and k < 1:
            raise ValueError("DSelect-k needs k >= 1")
        if gamma <= 0:
            raise ValueError("DSelect-k gamma must be > 0")
        self.num_experts = num_experts
        self.kind = kind
        self.temperature = temperature
        self.k = k
        self.gamma = gamma
        self.dropout = dropout
        if kind == "dselect":
            bits, fold = code_matrices(num_experts)
            self.register_buffer("bits", bits, persistent=False)
            self.register_buffer("fold", fold, persistent=False)
            self.num_bits = bits.shape[1]
            self.width = k * self.num_bits + k  # selector bits, then selector weights
        else:
            self.width = num_experts

    def forward(self, z: Tensor) -> GateOutput:
        if self.kind == "softmax":
            if self.temperature != 1.0:
                z = z / self.temperature
            out = GateOutput(torch.softmax(z, dim=-1))  # over experts
        else:
            k, m = self.k, self.num_bits
            sel = z[..., : k * m].unflatten(-1, (k, m))  # [..., B, k, m]
            s = smooth_step(sel, self.gamma).unsqueeze(-2)  # [..., B, k, 1, m]
            # r_l = prod_j (s_j if bit j of l else 1 - s_j): [..., B, k, 2^m], sums to 1
            codes = torch.where(self.bits.bool(), s, 1.0 - s).prod(-1)
            alpha = torch.softmax(z[..., k * m :] / self.temperature, dim=-1)  # [..., B, k]
            per_sel = codes @ self.fold  # [..., B, k, n]
            w = (alpha.unsqueeze(-1) * per_sel).sum(-2)  # [..., B, n]
            out = GateOutput(w, codes)
        if self.training and self.dropout > 0:
            keep = torch.rand_like(out.weights) >= self.dropout
            kept = out.weights * keep
            total = kept.sum(-1, keepdim=True)
            # a row whose every expert was dropped keeps its weights
            out.weights = torch.where(total > 0, kept / total.clamp_min(1e-30), out.weights)
        return out


class Gate(nn.Module):
    """One gate over ``num_experts`` experts.

    Args:
        in_dim: input width.
        num_experts: number of experts it weighs.
        hidden: widths of hidden layers before the logits (empty: one linear layer, as in the
            MMoE paper).
        temperature: softmax temperature (of the selector weights for DSelect-k).
        activation: activation of the hidden layers.
        kind: ``"softmax"`` or ``"dselect"``.
        k: DSelect-k: number of selectors (at most k experts per row once saturated).
        gamma: DSelect-k: width of the smooth-step's transition.
        dropout: expert dropout in training (rows are renormalised).

    Shapes:
        ``[B, in_dim] -> [B, num_experts]``, rows summing to 1.

    Example:
        >>> import torch
        >>> g = Gate(6, 4)(torch.randn(3, 6))
        >>> bool(torch.allclose(g.sum(-1), torch.ones(3)))
        True
        >>> d = Gate(6, 5, kind="dselect", k=2)(torch.randn(3, 6))
        >>> bool(torch.allclose(d.sum(-1), torch.ones(3)))
        True
    """

    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        *,
        hidden: Sequence[int] = (),
        temperature: float = 1.0,
        activation: str = "relu",
        kind: str = "softmax",
        k: int = 2,
        gamma: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.head = _GateHead(num_experts, kind, temperature, k, gamma, dropout)
        self.num_experts = num_experts
        self.temperature = temperature
        self.kind = kind
        self.net = MLP(
            in_dim, [*hidden, self.head.width], activation=activation, last_activation=False
        )

    def logits(self, x: Tensor) -> Tensor:
        """Raw gate outputs, ``[B, width]`` (the expert logits for a softmax gate)."""
        return self.net(x)

    def route(self, x: Tensor) -> GateOutput:
        """Weights and the selectors' codes (DSelect-k)."""
        return self.head(self.net(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.route(x).weights

    def _check_permutable(self) -> None:
        if self.kind != "softmax":
            raise ValueError("only a softmax gate has one logit per expert to permute")

    @torch.no_grad()
    def permute_experts_(self, perm: Tensor) -> None:
        """Reorder the gate's experts in place: new weight column j := old column ``perm[j]``
        (softmax gates: the rows of the logit layer), for experts permuted the same way."""
        self._check_permutable()
        perm = torch.as_tensor(perm, dtype=torch.long)
        if not torch.equal(perm.sort().values, torch.arange(self.num_experts)):
            raise ValueError(f"not a permutation of {self.num_experts} experts: {perm.tolist()}")
        last = self.net.layers[-1]
        last.weight.copy_(last.weight[perm])  # [n, hidden]
        last.bias.copy_(last.bias[perm])  # [n]


class GateBank(Gate):
    """``num`` gates of the same shape computed together.

    Args:
        num: number of gates.
        in_dim: input width of every gate.
        num_experts: experts each gate weighs.
        shared_input: all gates read one ``[B, in_dim]`` input (their first layers are one
            GEMM); otherwise gate g reads slice g of ``[num, B, in_dim]`` (one batched matmul).
        separate: each gate's parameters are tensors of their own (concatenated at forward
            time, still one GEMM / batched matmul per layer), so that they can belong to their
            task (``gate_parameters``); otherwise one stacked tensor per layer.
        hidden, temperature, activation, kind, k, gamma, dropout: as in :class:`Gate`.

    Shapes:
        ``[B, in_dim]`` or ``[num, B, in_dim]`` -> ``[num, B, num_experts]``.

    Example:
        >>> import torch
        >>> GateBank(3, 6, 4)(torch.randn(5, 6)).shape
        torch.Size([3, 5, 4])
    """

    def __init__(
        self,
        num: int,
        in_dim: int,
        num_experts: int,
        *,
        shared_input: bool = True,
        separate: bool = False,
        hidden: Sequence[int] = (),
        temperature: float = 1.0,
        activation: str = "relu",
        kind: str = "softmax",
        k: int = 2,
        gamma: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        nn.Module.__init__(self)  # a Gate, with a (grouped) ParallelMLP for ``net``
        self.head = _GateHead(num_experts, kind, temperature, k, gamma, dropout)
        self.num = num
        self.temperature = temperature
        self.num_experts = num_experts
        self.kind = kind
        self.net = GroupedParallelMLP(
            num,
            in_dim,
            [*hidden, self.head.width],
            groups=(1,) * num if separate else None,
            shared_input=shared_input,
            activation=activation,
            last_activation=False,
        )

    def route(self, x: Tensor) -> GateOutput:
        return self.head(self.net(x))  # [num, B, width] -> [num, B, n]

    def gate_parameters(self, gate: int) -> list[nn.Parameter]:
        """The parameters of gate ``gate`` alone (needs ``separate``)."""
        if not self.net.grouped:
            raise ValueError("the gates of this bank share stacked tensors (separate=False)")
        return self.net.group_parameters(gate)

    def permute_experts_(self, perm: Tensor) -> None:
        """As :meth:`Gate.permute_experts_`, per gate: ``perm`` is ``[num, n]`` (gate g's new
        column j := its old column ``perm[g, j]``) or ``[n]`` for every gate."""
        self._check_permutable()
        self.net.permute_outputs_(perm)  # type: ignore[operator]


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def gate_penalty(out: GateOutput, kind: str) -> Tensor | None:
    """A regulariser of one gate's (or bank's) output, averaged over rows and gates.

    Args:
        out: the gate's output.
        kind: ``"none"``; ``"load_balance"``: the squared coefficient of variation of the
            experts' importance (their summed weights over the batch; Shazeer et al., ICLR
            2017, eq. 6), 0 when every expert gets the same share; ``"entropy"``: the mean row
            entropy of the weights (low for confident gates) or, for DSelect-k, the mean
            entropy of the selectors' code distributions (Hazimeh et al. 2021, eq. 8), which
            pushes every selector to a single expert.

    Returns:
        A scalar, or None for ``"none"``.
    """
    if kind == "none":
        return None
    if kind == "load_balance":
        imp = out.weights.sum(-2)  # [..., n] importance over the batch
        cv2 = imp.var(-1, unbiased=False) / imp.mean(-1).pow(2).clamp_min(1e-12)
        return cv2.mean()
    if kind == "entropy":
        if out.codes is not None:
            return _entropy(out.codes).sum(-1).mean()  # sum over selectors, mean over rows
        return _entropy(out.weights).mean()
    raise ValueError(f"unknown gate penalty {kind!r}; choose from {PENALTIES}")
