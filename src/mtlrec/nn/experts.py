"""Expert banks: all experts of a layer as one stacked network.

Shared-input experts (the usual MoE layer) run their first layer as one GEMM over the
concatenated weights of every expert and their deeper layers as one batched matmul; see
:class:`mtlrec.nn.mlp.ParallelMLP`. No model loops over experts in Python.
"""

from __future__ import annotations

from collections.abc import Sequence

from mtlrec.nn.mlp import ParallelMLP


class ExpertBank(ParallelMLP):
    """``num_experts`` MLP experts of widths ``dims`` reading one input.

    Args:
        num_experts: number of experts.
        in_dim: input width.
        dims: layer widths of each expert (the last one is the expert's output width).
        activation, dropout, layer_norm: as in :class:`ParallelMLP`.
        shared_input: False when each expert reads its own input slice ``[E, B, in]``.

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
    ) -> None:
        super().__init__(
            num_experts,
            in_dim,
            dims,
            shared_input=shared_input,
            activation=activation,
            dropout=dropout,
            layer_norm=layer_norm,
            last_activation=True,
        )

    @property
    def num_experts(self) -> int:
        return self.num
