"""Adaptive information transfer between sequential tasks (AITM's AIT module)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class AdaptiveTransfer(nn.Module):
    """Mix a task's own representation with information transferred from the previous step.

    Paper: D. Xi, Z. Chen, P. Yan, Y. Zhang, Y. Zhu, F. Zhuang, Y. Chen, "Modeling the
    Sequential Dependence among Audience Multi-step Conversions with Multi-task Learning in
    Targeted Display Advertising", KDD 2021, Eqs. (2)-(4): ``p = h1(z_prev)``, then self
    attention over ``u in {p, q}``: ``w_u = softmax_u(<h2(u), h3(u)> / sqrt(k))`` and
    ``z = sum_u w_u h4(u)``.

    Shapes:
        ``z_prev [B, k], q [B, k] -> z [B, k]`` (and the weights ``[B, 2]`` over (p, q)).

    Example:
        >>> import torch
        >>> z, w = AdaptiveTransfer(4)(torch.randn(3, 4), torch.randn(3, 4))
        >>> tuple(z.shape), bool(torch.allclose(w.sum(-1), torch.ones(3)))
        ((3, 4), True)
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.transfer = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())  # h1
        self.query = nn.Linear(dim, dim)  # h2
        self.key = nn.Linear(dim, dim)  # h3
        self.value = nn.Linear(dim, dim)  # h4
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, z_prev: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        u = torch.stack([self.transfer(z_prev), q], dim=1)  # [B, 2, k]
        scores = (self.query(u) * self.key(u)).sum(-1) * self.scale  # [B, 2]
        w = torch.softmax(scores, dim=-1)  # over (p, q)
        return (w.unsqueeze(-1) * self.value(u)).sum(1), w  # [B, k], [B, 2]
