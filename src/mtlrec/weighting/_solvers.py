"""Small solvers on task Gram matrices ``G = J J^T [T, T]`` shared by the gradient strategies.

Everything here works on ``T x T`` matrices (T = number of tasks), never on ``[T, P]``; the
iterative solvers run in numpy float64 (on such tiny arrays a torch op costs more in dispatch
than in arithmetic).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def project_simplex_np(v: np.ndarray, total: float = 1.0) -> np.ndarray:
    """:func:`project_simplex` on a float64 numpy vector."""
    if total <= 0:
        return np.zeros_like(v)
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - total
    k = np.arange(1, v.size + 1)
    rho = int(np.nonzero(u - css / k > 0)[0].max())
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def project_simplex(v: Tensor, total: float = 1.0) -> Tensor:
    """Euclidean projection of ``v [T]`` onto ``{w >= 0, sum w = total}`` (sort-based)."""
    out = project_simplex_np(v.detach().cpu().double().numpy(), total)
    return torch.from_numpy(out).to(v.dtype)


def min_norm_two(g11: Tensor, g12: Tensor, g22: Tensor) -> Tensor:
    """Weight ``gamma`` of the first vector in ``min_gamma ||gamma g1 + (1-gamma) g2||``
    (Sener & Koltun 2018, Algorithm 1): ``clip((g2-g1).g2 / ||g1-g2||^2, 0, 1)``."""
    den = g11 + g22 - 2 * g12
    if float(den) <= 1e-20:
        return torch.tensor(0.5, dtype=g11.dtype, device=g11.device)
    return ((g22 - g12) / den).clamp(0.0, 1.0)


def min_norm_weights(gram: Tensor, max_iter: int = 250, tol: float = 1e-7) -> Tensor:
    """Min-norm point of the convex hull of the task gradients: ``argmin_{w in simplex}
    w^T G w``: the closed form for two tasks; otherwise Frank-Wolfe with exact line search
    (Sener & Koltun, NeurIPS 2018, Algorithm 2), whose sublinear tail is then polished by
    projected gradient steps (step ``1 / lambda_max(G)``) on the same ``T x T`` problem."""
    t = gram.shape[0]
    if t == 1:
        return torch.ones(1, dtype=gram.dtype, device=gram.device)
    if t == 2:
        gamma = min_norm_two(gram[0, 0], gram[0, 1], gram[1, 1])
        return torch.stack([gamma, 1 - gamma])
    g = gram.detach().cpu().double().numpy()
    w = np.full(t, 1.0 / t)
    for _ in range(max_iter):
        gw = g @ w  # [T]
        s = int(np.argmin(gw))
        # line search between a = sum w g and b = g_s: weight of b
        aa, ab, bb = float(w @ gw), float(gw[s]), float(g[s, s])
        den = aa + bb - 2 * ab
        gamma = 0.5 if den <= 1e-20 else min(max((aa - ab) / den, 0.0), 1.0)
        new = (1 - gamma) * w
        new[s] += gamma
        done = float(np.abs(new - w).sum()) < tol
        w = new
        if done:
            break
    lam = float(np.linalg.eigvalsh(g).max())
    if lam > 0:
        for _ in range(4 * max_iter):
            new = project_simplex_np(w - (g @ w) / lam, 1.0)
            done = float(np.abs(new - w).sum()) < tol
            w = new
            if done:
                break
    return torch.from_numpy(w).to(gram.dtype)
