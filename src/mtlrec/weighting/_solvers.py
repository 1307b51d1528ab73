"""Small solvers on task Gram matrices ``G = J J^T [T, T]`` shared by the gradient strategies.

Everything here works on ``T x T`` matrices (T = number of tasks), never on ``[T, P]``; the
iterative solvers run in numpy float64 (on such tiny arrays a torch op costs more in dispatch
than in arithmetic).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

GRAM_CHUNK = 1 << 18  # columns converted to float64 at a time (2 MB per task)


def gram64(j: Tensor, chunk: int = GRAM_CHUNK) -> Tensor:
    """The Gram matrix ``j @ j.T`` of the task gradients (the rows of ``j``), in float64.

    Products and sums are taken in float64 over column blocks of ``chunk`` (memory: ``T x
    chunk`` doubles, not a float64 copy of the Jacobian). A float32 product converted after
    the fact keeps float32's rounding, and the methods that take differences of its entries
    (IMTL's ``(g_1 - g_a).(u_1 - u_b)``, the min-norm and KKT solves) amplify it: for nearly
    parallel gradients IMTL's weights were off by up to 14% against float64.
    """
    t, p = j.shape
    out = torch.zeros(t, t, dtype=torch.float64, device=j.device)
    for lo in range(0, p, chunk):
        block = j[:, lo : lo + chunk].to(torch.float64)
        out.addmm_(block, block.T)
    return out


def project_simplex_np(v: np.ndarray, total: float = 1.0) -> np.ndarray:
    """:func:`project_simplex` on a float64 numpy vector."""
    if total <= 0:
        return np.zeros_like(v)
    # the projection commutes with adding a constant to every entry: subtracting the largest
    # keeps the cumulative sums on the scale of ``total`` (with entries near 1e17 they
    # swallowed it and no index passed the test below)
    v = v - v.max()
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - total
    k = np.arange(1, v.size + 1)
    passing = np.flatnonzero(u - css / k > 0)
    rho = int(passing[-1]) if passing.size else 0  # the largest entry always passes exactly
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def project_simplex(v: Tensor, total: float = 1.0) -> Tensor:
    """Euclidean projection of ``v [T]`` onto ``{w >= 0, sum w = total}`` (sort-based)."""
    out = project_simplex_np(v.detach().cpu().double().numpy(), total)
    return torch.from_numpy(out).to(device=v.device, dtype=v.dtype)


def min_norm_two(g11: Tensor, g12: Tensor, g22: Tensor) -> Tensor:
    """Weight ``gamma`` of the first vector in ``min_gamma ||gamma g1 + (1-gamma) g2||``
    (Sener & Koltun 2018, Algorithm 1): ``clip((g2-g1).g2 / ||g1-g2||^2, 0, 1)``."""
    den = g11 + g22 - 2 * g12
    if float(den) <= 1e-20:
        return torch.tensor(0.5, dtype=g11.dtype, device=g11.device)
    return ((g22 - g12) / den).clamp(0.0, 1.0)


def frank_wolfe_min_norm(
    gram: np.ndarray, max_iter: int = 250, tol: float = 1e-7, start: np.ndarray | None = None
) -> np.ndarray:
    """Frank-Wolfe with exact line search for ``argmin_{w in simplex} w^T G w`` (Sener & Koltun,
    NeurIPS 2018, Algorithm 2), on a float64 ``[T, T]`` Gram matrix.

    Each iteration moves from ``w`` towards the vertex ``e_s`` with ``s = argmin_t (G w)_t``
    (the task gradient most opposed to the current combination ``sum_t w_t g_t``), by the
    exact minimiser ``gamma`` of ``||(1 - gamma) g_w + gamma g_s||^2`` on the segment. Starts
    at the uniform weights (or ``start``); stops when an iteration changes ``w`` by less than
    ``tol`` (L1) or after ``max_iter`` iterations.
    """
    t = gram.shape[0]
    w = np.full(t, 1.0 / t) if start is None else np.asarray(start, dtype=np.float64).copy()
    for _ in range(max_iter):
        gw = gram @ w  # [T]: g_t . g_w
        s = int(np.argmin(gw))
        # line search between a = sum w g and b = g_s: weight of b
        aa, ab, bb = float(w @ gw), float(gw[s]), float(gram[s, s])
        den = aa + bb - 2 * ab
        gamma = 0.5 if den <= 1e-20 else min(max((aa - ab) / den, 0.0), 1.0)
        new = (1 - gamma) * w
        new[s] += gamma
        done = float(np.abs(new - w).sum()) < tol
        w = new
        if done:
            break
    return w


def min_norm_weights(
    gram: Tensor, max_iter: int = 250, tol: float = 1e-7, polish: bool = True
) -> Tensor:
    """Min-norm point of the convex hull of the task gradients: ``argmin_{w in simplex}
    w^T G w``: the closed form for two tasks; otherwise Frank-Wolfe with exact line search
    (:func:`frank_wolfe_min_norm`), whose sublinear tail is then polished (``polish``) by
    projected gradient steps (step ``1 / lambda_max(G)``) on the same ``T x T`` problem."""
    t = gram.shape[0]
    if t == 1:
        return torch.ones(1, dtype=gram.dtype, device=gram.device)
    if t == 2:
        gamma = min_norm_two(gram[0, 0], gram[0, 1], gram[1, 1])
        return torch.stack([gamma, 1 - gamma])
    g = gram.detach().cpu().double().numpy()
    w = frank_wolfe_min_norm(g, max_iter, tol)
    lam = float(np.linalg.eigvalsh(g).max())
    if polish and lam > 0:
        for _ in range(4 * max_iter):
            new = project_simplex_np(w - (g @ w) / lam, 1.0)
            done = float(np.abs(new - w).sum()) < tol
            w = new
            if done:
                break
        w = _exact_on_support(g, w)
    return torch.from_numpy(w).to(gram.dtype)


def _exact_on_support(g: np.ndarray, w: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """The exact min-norm point on the face of the simplex that ``w`` lies on, when it meets
    the optimality conditions: on face S the affine minimiser is ``G_S^{-1} 1 / 1^T G_S^{-1} 1``
    and it is the minimiser over the simplex iff it is non-negative and no task has
    ``(G w)_t < w^T G w`` (no vertex is a descent direction). Otherwise ``w`` is returned: the
    projected-gradient tail converges only linearly when the Gram matrix is ill-conditioned,
    and this step finishes it exactly once it has found the right face. A face block that
    rounding made indefinite (opposite gradients: ``1^T G_S^-1 1 < 0``) still gives the
    stationary point, kept under the same checks and only when it is no worse than ``w``."""
    s = np.flatnonzero(w > eps)
    try:
        x = np.linalg.solve(g[np.ix_(s, s)], np.ones(s.size))
    except np.linalg.LinAlgError:
        return w
    total = float(x.sum())  # 1^T G_S^-1 1: > 0 on a positive definite face
    if total == 0 or not np.isfinite(total):  # the face has no affine minimiser
        return w
    exact = np.zeros_like(w)
    exact[s] = x / total
    value = float(exact @ g @ exact)
    scale = max(value, 1e-12 * float(np.diag(g).max()))
    if exact.min() < 0 or (g @ exact).min() < value - 1e-9 * scale:
        return w
    return exact if value <= float(w @ g @ w) else w


#: above this many tasks the CAGrad dual is solved iteratively (2^T faces otherwise)
EXACT_MAX_TASKS = 8


def cagrad_dual(gram: np.ndarray, c: float, max_iter: int = 5000) -> np.ndarray:
    """The minimiser over the simplex of CAGrad's dual ``F(w) = w . b + r sqrt(w^T G w)``,
    ``b = G 1 / T`` (``b_t = g_t . g0``), ``r = c ||g0||`` (Liu et al., NeurIPS 2021, eq. 5),
    solved exactly for up to :data:`EXACT_MAX_TASKS` tasks.

    ``F`` is convex, so its minimiser is the stationary point of ``F`` restricted to the face
    of the simplex whose relative interior holds it. On a face ``S`` with ``||g_w|| > 0`` the
    stationarity ``b_S + r G_S w_S / ||g_w|| = lambda 1`` gives, with ``v = w_S / ||g_w||``,
    ``v = G_S^{-1} (lambda 1 - b_S) / r`` and ``v^T G_S v = 1``, a quadratic in ``lambda`` whose
    root with ``sum v > 0`` yields ``w_S = v / sum v``. Every face's feasible stationary point
    is a candidate, as is every vertex; the minimiser is the candidate of least ``F``, and of
    candidates whose ``F`` is equal to the last bit the one on the smallest face (the best
    vertex first, then faces by size): exact zeros rather than a weight of the ridge's size. The
    problem is first scaled by ``max_t ||g_t||^2`` (``F`` scales with it, the minimiser does
    not) and a ``1e-10`` ridge keeps every face's matrix invertible when gradients are
    dependent. More tasks: projected gradient with backtracking to a tolerance (or its
    iteration cap), finished by an active-set pass from its support (exact face solves, tasks
    dropped while their weight is negative and added while the optimality condition asks for
    them; a face point is kept only when it lowers ``F``): the iterate only nears the
    minimiser, and ill-conditioned gradients can stop it short at the cap.
    """
    g = np.asarray(gram, dtype=np.float64)
    t = g.shape[0]
    scale = float(np.max(np.diag(g)))
    if t == 1 or scale <= 0:
        return np.full(t, 1.0 / t)
    g = g / scale + 1e-10 * np.eye(t)
    b = g.mean(axis=1)
    r = c * float(np.sqrt(max(float(b.mean()), 0.0)))
    if r <= 0:  # F is linear: the best vertex
        w = np.zeros(t)
        w[int(np.argmin(b))] = 1.0
        return w
    if t > EXACT_MAX_TASKS:
        return _active_set_polish(g, b, r, _cagrad_dual_iterative(g, b, r, max_iter))
    best = np.zeros(t)
    best[int(np.argmin(b + r * np.sqrt(np.diag(g))))] = 1.0  # the best vertex
    best_f = _dual_value(best, b, g, r)
    for size in range(2, t + 1):
        for face in itertools.combinations(range(t), size):
            w = _face_point(g, b, r, list(face))
            if w is not None and (fw := _dual_value(w, b, g, r)) < best_f:
                best, best_f = w, fw
    return best


def _dual_value(w: np.ndarray, b: np.ndarray, g: np.ndarray, r: float) -> float:
    return float(w @ b) + r * float(np.sqrt(max(float(w @ g @ w), 0.0)))


def _face_point(
    g: np.ndarray, b: np.ndarray, r: float, s: list[int], shrink: bool = False
) -> np.ndarray | None:
    """The stationary point of the dual on the face ``s`` of the simplex (see
    :func:`cagrad_dual`), or None when it does not lie in that face. With ``shrink``, while it
    lies outside, the task of its most negative weight leaves the face and the smaller face is
    solved (an active-set step from a support that holds the minimiser's)."""
    t = g.shape[0]
    s = list(s)
    while s:
        if len(s) == 1:  # a vertex is its own face's only point
            w = np.zeros(t)
            w[s[0]] = 1.0
            return w
        gs, bs = g[np.ix_(s, s)], b[s]
        try:
            p = np.linalg.solve(gs, np.ones(len(s)))  # G_S^{-1} 1
            q = np.linalg.solve(gs, bs)  # G_S^{-1} b_S
        except np.linalg.LinAlgError:
            return None
        alpha, beta, gamma = float(p.sum()), float(q.sum()), float(bs @ q)
        disc = beta * beta - alpha * (gamma - r * r)
        if alpha <= 0 or disc < 0:
            return None
        lam = (beta + np.sqrt(disc)) / alpha
        v = (lam * p - q) / r
        total = float(v.sum())
        if total <= 0:
            return None
        ws = v / total
        if float(ws.min()) >= -1e-9:
            w = np.zeros(t)
            w[s] = np.maximum(ws, 0.0)
            return w / w.sum()
        if not shrink:
            return None  # the stationary point lies outside this face
        del s[int(np.argmin(ws))]
    return None


def _active_set_polish(g: np.ndarray, b: np.ndarray, r: float, w: np.ndarray) -> np.ndarray:
    """Finish the projected gradient's iterate ``w`` exactly: solve the face of its support
    (tasks of negative weight dropped), then, while a task outside the face would lower ``F``
    (its gradient component below the face's common value), add the most violating one and
    solve again. A face point replaces ``w`` only when it lowers ``F``."""
    t = g.shape[0]
    best, best_f = w, _dual_value(w, b, g, r)
    face = list(np.flatnonzero(w > 1e-12))
    for _ in range(2 * t):
        point = _face_point(g, b, r, face, shrink=True)
        if point is None:
            break
        if (fp := _dual_value(point, b, g, r)) < best_f:
            best, best_f = point, fp
        norm = float(np.sqrt(max(float(point @ g @ point), 1e-300)))
        grad = b + r * (g @ point) / norm
        on = point > 0
        level = float(grad[on].mean())
        outside = np.flatnonzero(~on)
        if outside.size == 0:
            break
        k = int(outside[np.argmin(grad[outside])])
        if grad[k] >= level - 1e-12 * max(1.0, abs(level)):
            break  # no task outside would lower F: a KKT point of the simplex
        face = [*np.flatnonzero(on).tolist(), k]
    return best


def _cagrad_dual_iterative(
    g: np.ndarray, b: np.ndarray, r: float, max_iter: int = 5000, tol: float = 1e-12
) -> np.ndarray:
    """Projected gradient with backtracking (Armijo) on the scaled dual, to a tolerance."""
    t = g.shape[0]

    def f(w: np.ndarray) -> float:
        return float(w @ b) + r * float(np.sqrt(max(float(w @ g @ w), 1e-300)))

    w = np.full(t, 1.0 / t)
    fw, step = f(w), 1.0
    for _ in range(max_iter):
        n = float(np.sqrt(max(float(w @ g @ w), 1e-300)))
        grad = b + r * (g @ w) / n
        while True:
            new = project_simplex_np(w - step * grad, 1.0)
            fn = f(new)
            if fn <= fw - 1e-4 * float(grad @ (w - new)) or step < 1e-16:
                break
            step *= 0.5
        moved = float(np.abs(new - w).sum())
        w, fw, step = new, fn, step * 2.0
        if moved < tol:
            break
    return w
