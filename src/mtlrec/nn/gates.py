"""Gates: a softmax over experts per row.

A gate maps its input to one weight per expert; the weights of a row are non-negative and sum
to one (softmax over the expert axis, the last one). Options: hidden layers before the
expert logits, and a softmax temperature (``t > 1`` flattens, ``t < 1`` sharpens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlrec.nn.mlp import MLP


class Gate(nn.Module):
    """Softmax gate over ``num_experts`` experts.

    Args:
        in_dim: input width.
        num_experts: number of experts it weighs.
        hidden: widths of hidden layers before the expert logits (empty: one linear layer,
            as in the MMoE paper).
        temperature: softmax temperature.
        activation: activation of the hidden layers.

    Shapes:
        ``[B, in_dim] -> [B, num_experts]``, rows summing to 1.

    Example:
        >>> import torch
        >>> g = Gate(6, 4)(torch.randn(3, 6))
        >>> bool(torch.allclose(g.sum(-1), torch.ones(3)))
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
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("gate temperature must be > 0")
        self.num_experts = num_experts
        self.temperature = temperature
        self.net = MLP(in_dim, [*hidden, num_experts], activation=activation, last_activation=False)

    def logits(self, x: Tensor) -> Tensor:
        """Expert logits before the softmax, ``[B, num_experts]``."""
        return self.net(x)

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(x)
        if self.temperature != 1.0:
            z = z / self.temperature
        return torch.softmax(z, dim=-1)  # over experts
