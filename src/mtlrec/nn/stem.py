"""All Forward Task-specific Backward mixing (STEM-Net's gate)."""

from __future__ import annotations

import torch
from torch import Tensor


def aftb_mix(gates: Tensor, experts: Tensor, trainable: Tensor) -> Tensor:
    """Mix all experts forward, but let gate g's gradient reach only its trainable experts.

    Paper: L. Su, J. Pan, X. Wang, X. Xiao, S. Quan, X. Chen, J. Jiang, "STEM: Unleashing the
    Power of Embeddings for Multi-task Recommendation", AAAI 2024 (the All Forward
    Task-specific Backward gating network: other tasks' experts enter with stop-gradient).

    Args:
        gates: ``[G, B, E]`` weights (rows sum to 1).
        experts: ``[E, B, D]`` expert outputs.
        trainable: ``[G, E]`` bool; False entries are read through ``detach``.

    Returns:
        ``[G, B, D]``, equal in value to ``mix(gates, experts)``.

    Example:
        >>> import torch
        >>> e = torch.randn(2, 3, 4, requires_grad=True)
        >>> g = torch.full((1, 3, 2), 0.5)
        >>> out = aftb_mix(g, e, torch.tensor([[True, False]]))
        >>> out.sum().backward()
        >>> bool(e.grad[0].any()), bool(e.grad[1].any())
        (True, False)
    """
    frozen = experts.detach()
    sel = trainable[:, :, None, None]  # [G, E, 1, 1]
    per_gate = torch.where(sel, experts.unsqueeze(0), frozen.unsqueeze(0))  # [G, E, B, D]
    return torch.einsum("gbe,gebd->gbd", gates, per_gate)  # [G, B, D]
