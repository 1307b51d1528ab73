"""Independent references shared by the model mutation tests."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def mlp_ref(mlp: nn.Module, x: Tensor, act: Callable[[Tensor], Tensor], last: bool) -> Tensor:
    """An :class:`~mtlrec.nn.mlp.MLP` (no dropout) with plain matmuls from its linear layers:
    ``act(x W^T + b)`` per layer, the last one activated only when ``last``."""
    n = len(mlp.layers)
    for i, lin in enumerate(mlp.layers):
        x = x @ lin.weight.T + lin.bias
        if i < n - 1 or last:
            x = act(x)
    return x
