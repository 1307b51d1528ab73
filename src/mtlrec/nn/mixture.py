"""Mixing expert outputs with gate weights."""

from __future__ import annotations

import torch
from torch import Tensor


def mix(gates: Tensor, experts: Tensor) -> Tensor:
    """Weighted sums of expert outputs, one per gate.

    Args:
        gates: ``[G, B, E]`` gate weights (G gates, rows summing to 1).
        experts: ``[E, B, D]`` expert outputs.

    Returns:
        ``[G, B, D]`` with ``out[g, b] = sum_e gates[g, b, e] * experts[e, b]``.

    Example:
        >>> import torch
        >>> e = torch.randn(3, 2, 5)
        >>> g = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])  # one gate, two rows
        >>> out = mix(g, e)
        >>> bool(torch.equal(out[0, 0], e[0, 0])) and bool(torch.equal(out[0, 1], e[1, 1]))
        True
    """
    if gates.shape[-1] != experts.shape[0]:
        raise ValueError(f"gates weigh {gates.shape[-1]} experts but {experts.shape[0]} given")
    return torch.einsum("gbe,ebd->gbd", gates, experts)  # [G, B, D]
