"""Mixing units between per-task networks: cross-stitch and sluice units, layer mixing.

A stitch unit mixes the activations of T per-task networks (or of their subspaces) with a
learned square matrix, ``x~_t = sum_s alpha[t, s] x_s``; with ``alpha`` the identity the
networks stay independent. Layer mixing gives every task a learned convex-free weighted sum of
its layers' outputs (the sluice network's skip connections to the towers).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def near_identity(n: int, self_weight: float) -> Tensor:
    """``[n, n]`` with ``self_weight`` on the diagonal and ``(1 - self_weight) / (n - 1)``
    elsewhere (rows sum to 1); the identity when ``n == 1`` or ``self_weight == 1``."""
    if n == 1:
        return torch.ones(1, 1)
    off = (1.0 - self_weight) / (n - 1)
    return torch.full((n, n), off) + (self_weight - off) * torch.eye(n)


class CrossStitch(nn.Module):
    """A cross-stitch unit over ``units`` parallel activations (tasks, or task subspaces).

    Paper: I. Misra, A. Shrivastava, A. Gupta, M. Hebert, "Cross-stitch Networks for Multi-task
    Learning", CVPR 2016 (Eq. 1; initialised at (0.9, 0.1), their best setting). With
    ``subspaces > 1`` it is the sluice network's alpha unit (Ruder et al., AAAI 2019): each
    activation is cut into equal subspaces and all ``units * subspaces`` pieces are mixed.

    Args:
        units: number of networks mixed (T).
        subspaces: pieces per activation (1: plain cross-stitch).
        self_weight: initial diagonal weight of the mixing matrix.

    Shapes:
        ``[T, B, D] -> [T, B, D]`` (D divisible by ``subspaces``).

    Example:
        >>> import torch
        >>> u = CrossStitch(2, self_weight=1.0)
        >>> x = torch.randn(2, 3, 4)
        >>> bool(torch.equal(u(x), x))
        True
    """

    def __init__(self, units: int, *, subspaces: int = 1, self_weight: float = 0.9) -> None:
        super().__init__()
        self.units = units
        self.subspaces = subspaces
        self.alpha = nn.Parameter(near_identity(units * subspaces, self_weight))

    def split(self, x: Tensor) -> Tensor:
        """``[T, B, D] -> [T * S, B, D / S]``: the subspaces as separate units."""
        t, b, d = x.shape
        s = self.subspaces
        if d % s:
            raise ValueError(f"width {d} is not divisible into {s} subspaces")
        return x.view(t, b, s, d // s).permute(0, 2, 1, 3).reshape(t * s, b, d // s)

    def merge(self, x: Tensor) -> Tensor:
        """``[T * S, B, D / S] -> [T, B, D]`` (inverse of :meth:`split`)."""
        ts, b, e = x.shape
        s = self.subspaces
        return x.view(ts // s, s, b, e).permute(0, 2, 1, 3).reshape(ts // s, b, s * e)

    def forward(self, x: Tensor) -> Tensor:
        if self.subspaces == 1:
            return torch.einsum("ts,sbd->tbd", self.alpha, x)  # [T, B, D]
        pieces = self.split(x)  # [T*S, B, D/S]
        return self.merge(torch.einsum("uv,vbe->ube", self.alpha, pieces))  # [T, B, D]


def subspace_orthogonality(x: Tensor, subspaces: int) -> Tensor:
    """Sluice networks' subspace penalty: ``sum_t sum_{i<j} ||G_ti^T G_tj||_F^2 / B`` where
    ``G_ti`` is ``[B, D / S]``, the i-th subspace of task t's activation ``x[t]``."""
    t, b, d = x.shape
    g = x.view(t, b, subspaces, d // subspaces).permute(0, 2, 1, 3)  # [T, S, B, D/S]
    gram = torch.einsum("tibe,tjbf->tijef", g, g)  # [T, S, S, D/S, D/S]
    sq = gram.square().sum((-1, -2))  # [T, S, S]
    return torch.triu(sq, diagonal=1).sum() / b


class LayerMix(nn.Module):
    """Per-task weighted sum of the outputs of L layers (skip connections to the towers).

    Paper: the beta parameters of S. Ruder, J. Bingel, I. Augenstein, A. Søgaard, "Latent
    Multi-task Architecture Learning", AAAI 2019. Initialised to a uniform 1/L.

    Shapes:
        ``[L, T, B, D] -> [T, B, D]``.
    """

    def __init__(self, tasks: int, layers: int) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.full((tasks, layers), 1.0 / layers))

    def forward(self, layers: Tensor) -> Tensor:
        return torch.einsum("tl,ltbd->tbd", self.beta, layers)  # [T, B, D]
