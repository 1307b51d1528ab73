"""Every gradient strategy with 3 and 4 tasks against an independent float64 computation
(issue 17.3), and CAGrad's dual on ill-conditioned cases (issue 12.2).

The references below are written from the papers, in numpy, and share no code with
``mtlrec.weighting``: PCGrad's sequential projections (Yu et al. 2020, Algorithm 1), MGDA's
min-norm point by enumerating the faces of the simplex, IMTL-G's equal-projection condition as
a linear system on the raw gradients, PE-LTR's two steps (closed-form affine min-norm point,
then a projection found by bisection), CAGrad's primal problem solved by enumerating its active
sets in the span of the gradients, and GradNorm's weight gradient by central differences.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from mtlrec.autograd import multitask_backward
from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting import build_weighting

Array = np.ndarray


def names(t: int) -> tuple[str, ...]:
    return tuple(f"t{i}" for i in range(t))


def conflicting(t: int, p: int, seed: int, norms: list[float] | None = None) -> Array:
    """``[t, p]`` float64 gradients with conflicts (negatively correlated pairs)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=p)
    j = rng.normal(size=(t, p)) - 0.6 * np.outer(rng.choice([-1.0, 1.0], size=t), base)
    if norms is not None:
        j = j / np.linalg.norm(j, axis=1, keepdims=True) * np.asarray(norms)[:, None]
    return j


# -- references --------------------------------------------------------------------------------
def ref_pcgrad(j: Array, orders: list[list[int]]) -> Array:
    """Each task's gradient, projected in turn (in the given order) against every other task's
    gradient it conflicts with, the running (already projected) vector being the one tested and
    projected; then summed."""
    total = np.zeros(j.shape[1])
    for i, order in enumerate(orders):
        g = j[i].copy()
        for k in order:
            dot = g @ j[k]
            if dot < 0:
                g = g - dot / (j[k] @ j[k]) * j[k]
        total += g
    return total


def ref_min_norm(gram: Array) -> Array:
    """``argmin_{w in simplex} w^T G w`` by enumerating the faces: on face S the minimiser of
    the affine problem is ``G_S^{-1} 1 / (1^T G_S^{-1} 1)``; keep the feasible ones, take the
    best (vertices included)."""
    t = gram.shape[0]
    best, best_v = None, np.inf
    for size in range(1, t + 1):
        for face in itertools.combinations(range(t), size):
            s = list(face)
            x = np.linalg.solve(gram[np.ix_(s, s)], np.ones(size))
            w = np.zeros(t)
            w[s] = x / x.sum()
            if w.min() < -1e-12:
                continue
            v = w @ gram @ w
            if v < best_v:
                best, best_v = w, v
    assert best is not None
    return best


def ref_imtl(j: Array) -> Array:
    """IMTL-G: alpha with sum 1 such that ``g = sum alpha_t g_t`` has the same projection on
    every unit gradient ``u_t``; returned times T."""
    t = j.shape[0]
    u = j / np.linalg.norm(j, axis=1, keepdims=True)
    proj = j @ u.T  # [s, t]: g_s . u_t
    rows = [proj[:, 0] - proj[:, k] for k in range(1, t)] + [np.ones(t)]
    rhs = np.zeros(t)
    rhs[-1] = 1.0
    return t * np.linalg.solve(np.array(rows), rhs)


def ref_pe_ltr(j: Array, bounds: Array) -> Array:
    """PE-LTR's PE-Solver: the min of ``||sum w g||^2`` over ``sum w = 1`` (bounds dropped) is
    ``G^{-1} 1 / 1^T G^{-1} 1``; ``v = w - c`` is then projected onto
    ``{v >= 0, sum v = 1 - sum c}`` (threshold found by bisection) and ``w = c + v``."""
    gram = j @ j.T
    x = np.linalg.solve(gram, np.ones(len(bounds)))
    v = x / x.sum() - bounds
    free = 1.0 - bounds.sum()
    lo, hi = v.min() - free - 1.0, v.max()
    for _ in range(200):
        tau = 0.5 * (lo + hi)
        if np.maximum(v - tau, 0.0).sum() > free:
            lo = tau
        else:
            hi = tau
    return bounds + np.maximum(v - 0.5 * (lo + hi), 0.0)


def ref_cagrad_direction(j: Array, c: float) -> Array:
    """CAGrad's primal (Liu et al. 2021, eq. 3): ``max_d min_i g_i . d`` subject to
    ``||d - g0|| <= c ||g0||``. With ``d = g0 + R u``, ``||u|| <= 1``, and ``u`` in the span of
    the gradients (coordinates ``a_i`` from a QR factorisation), the maximiser makes some set
    S of tasks tie; for each S, the best ``u`` on the unit sphere with the tasks of S tied is
    found in closed form, and the best of all sets (each evaluated on every task) is exact."""
    t = j.shape[0]
    g0 = j.mean(axis=0)
    big_r = c * np.linalg.norm(g0)
    q, r = np.linalg.qr(j.T)  # j.T = q r: g_i = q a_i with a_i = r[:, i]
    a, b = r.T, j @ g0  # [t, k], [t]
    best_u, best = None, -np.inf
    for size in range(1, t + 1):
        for face in itertools.combinations(range(t), size):
            i0, rest = face[0], list(face[1:])
            k = a.shape[1]
            if rest:
                d = a[rest] - a[i0]
                rhs = (b[i0] - b[rest]) / big_r
                up, *_ = np.linalg.lstsq(d, rhs, rcond=None)
                if np.linalg.norm(d @ up - rhs) > 1e-9 or up @ up > 1.0:
                    continue
                _, sv, vt = np.linalg.svd(d)
                rank = int((sv > 1e-12 * sv.max()).sum())
                null = vt[rank:].T  # [k, k - rank]
            else:
                up, null = np.zeros(k), np.eye(k)
            v = null.T @ a[i0]
            room = np.sqrt(max(1.0 - up @ up, 0.0))
            u = up + (null @ (room * v / np.linalg.norm(v)) if np.linalg.norm(v) > 0 else 0)
            value = np.min(b + big_r * (a @ u))
            if value > best:
                best_u, best = u, value
    assert best_u is not None
    return g0 + big_r * (q @ best_u)


def cosine(x: Array, y: Array) -> float:
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


# -- the strategies on a Jacobian, 3 and 4 tasks --------------------------------------------------
CASES = [(t, seed) for t in (3, 4) for seed in range(6)]


@pytest.mark.parametrize(("t", "seed"), CASES)
def test_pcgrad_projects_the_running_gradient(t: int, seed: int) -> None:
    j = conflicting(t, 7, seed)
    s = build_weighting("pcgrad", names(t), {"seed": seed})
    orders = s.orders()
    for i, order in enumerate(orders):  # each task visits every other task once
        assert sorted(order) == [k for k in range(t) if k != i]
    jt = torch.from_numpy(j)
    got = s.aggregate(jt, s.weights(torch.ones(t, dtype=torch.float64), jt)).numpy()
    np.testing.assert_allclose(got, ref_pcgrad(j, orders), rtol=1e-10, atol=1e-12)


def test_pcgrad_cases_tell_the_running_gradient_from_the_original() -> None:
    """The cases above have teeth: projecting the original gradient instead of the running
    one (a plausible bug, the same with 2 tasks) gives a different update on most of them."""

    def original(j: Array, orders: list[list[int]]) -> Array:
        total = np.zeros(j.shape[1])
        for i, order in enumerate(orders):
            g = j[i].copy()
            for k in order:
                dot = j[i] @ j[k]
                if dot < 0:
                    g = g - dot / (j[k] @ j[k]) * j[k]
            total += g
        return total

    differ = 0
    for t, seed in CASES:
        j = conflicting(t, 7, seed)
        orders = build_weighting("pcgrad", names(t), {"seed": seed}).orders()
        differ += not np.allclose(original(j, orders), ref_pcgrad(j, orders), atol=1e-6)
    assert differ >= len(CASES) // 2


@pytest.mark.parametrize(("t", "seed"), CASES)
def test_mgda_weights_are_the_exact_min_norm_point(t: int, seed: int) -> None:
    j = conflicting(t, 9, seed)
    s = build_weighting("mgda", names(t))
    got = s.shared_weights(torch.ones(t), torch.from_numpy(j)).numpy()
    want = ref_min_norm(j @ j.T)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(("t", "seed"), CASES)
def test_imtl_weights_solve_the_equal_projection_system(t: int, seed: int) -> None:
    j = conflicting(t, 9, seed)
    got = build_weighting("imtl", names(t)).shared_weights(torch.ones(t), torch.from_numpy(j))
    np.testing.assert_allclose(got.numpy(), ref_imtl(j), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("t", "seed"), CASES)
def test_pe_ltr_weights_follow_the_pe_solver(t: int, seed: int) -> None:
    j = conflicting(t, 9, seed)
    c = np.array([0.3, 0.05, 0.2, 0.1][:t])
    s = build_weighting("pe_ltr", names(t), {"bounds": dict(zip(names(t), c, strict=True))})
    got = s.shared_weights(torch.ones(t), torch.from_numpy(j)).numpy()
    np.testing.assert_allclose(got, ref_pe_ltr(j, c), atol=1e-9)


@pytest.mark.parametrize(("t", "seed"), CASES)
@pytest.mark.parametrize("c", [0.4, 0.9])
def test_cagrad_direction_is_the_exact_primal_solution(t: int, seed: int, c: float) -> None:
    j = conflicting(t, 9, seed)
    s = build_weighting("cagrad", names(t), {"c": c})
    jt = torch.from_numpy(j)
    got = s.aggregate(jt, s.weights(torch.ones(t), jt)).numpy()
    want = t * ref_cagrad_direction(j, c) / (1 + c**2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# the case (norms 0.01 / 1 / 10, c = 0.4), then spreads up to 1000x, T = 2..5
ILL = [([0.01, 1.0, 10.0], s) for s in range(4)] + [
    ([1.0, 1000.0], 0),
    ([1000.0, 1.0], 1),
    ([0.001, 0.001, 1.0], 2),
    ([1.0, 30.0, 1000.0], 3),
    ([0.01, 0.1, 1.0, 10.0], 4),
    ([5.0, 0.005, 1.0, 0.5], 5),
    ([0.01, 1.0, 10.0, 0.1, 3.0], 6),
    ([1000.0, 1.0, 1.0, 1.0, 1.0], 7),
    ([1.0, 1.0, 1.0, 1.0, 0.001], 8),
]


@pytest.mark.parametrize(("norms", "seed"), ILL)
@pytest.mark.parametrize("c", [0.4, 0.5])
def test_cagrad_is_exact_when_gradient_sizes_differ_by_1000x(
    norms: list[float], seed: int, c: float
) -> None:
    t = len(norms)
    j = conflicting(t, 12, seed, norms)
    s = build_weighting("cagrad", names(t), {"c": c})
    jt = torch.from_numpy(j)
    got = s.aggregate(jt, s.weights(torch.ones(t), jt)).numpy()
    want = ref_cagrad_direction(j, c)
    assert cosine(got, want) >= 0.999
    # and the dual weights close the duality gap with the exact primal value
    w = s.dual_weights(torch.from_numpy(j @ j.T)).numpy()
    g0, gw = j.mean(0), w @ j
    dual = gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw)
    primal = np.min(j @ want)
    assert dual - primal <= 1e-6 * max(abs(primal), np.linalg.norm(g0) ** 2)


@pytest.mark.parametrize("t", [3, 4])
def test_gradnorm_weight_gradient_matches_central_differences(t: int) -> None:
    rng = np.random.default_rng(t)
    j = conflicting(t, 6, t, list(rng.uniform(0.2, 3.0, t)))
    first, now = rng.uniform(0.5, 2.0, t), rng.uniform(0.2, 2.0, t)
    alpha = 1.5
    s = build_weighting("gradnorm", names(t), {"alpha": alpha})
    jt = torch.from_numpy(j).float()
    s.weights(torch.tensor(first, dtype=torch.float32), jt)  # records L(0)
    s.regularizer(torch.zeros(t))
    logits = rng.normal(size=t) * 0.5
    with torch.no_grad():
        s.logits.copy_(torch.from_numpy(logits))
    w = s.weights(torch.tensor(now, dtype=torch.float32), jt)
    s.regularizer(torch.zeros(t)).backward()  # type: ignore[union-attr]
    norms = np.linalg.norm(j, axis=1)
    soft = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(w.numpy(), t * soft, rtol=1e-6)
    ratio = now / first
    rate = ratio / ratio.mean()
    target = np.mean(t * soft * norms) * rate**alpha  # the bracket: held constant

    def l_grad(x: Array) -> float:
        z = np.exp(x) / np.exp(x).sum()
        return float(np.abs(t * z * norms - target).sum())

    h = 1e-6
    num = np.array([(l_grad(logits + h * e) - l_grad(logits - h * e)) / (2 * h) for e in np.eye(t)])
    np.testing.assert_allclose(s.logits.grad.numpy(), num, rtol=1e-3, atol=1e-5)


# -- the whole backward: per-task gradients by separate passes, then the reference ---------------
Losses = Callable[[], dict[str, torch.Tensor]]


def toy(t: int, seed: int, device: str = "cpu") -> tuple[nn.Module, nn.ModuleList, Losses]:
    torch.manual_seed(seed)
    shared = nn.Sequential(nn.Linear(5, 6), nn.Tanh()).double().to(device)
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(t)).double().to(device)
    x = torch.randn(16, 5, dtype=torch.float64).to(device)
    ys = (torch.randn(t, 16, dtype=torch.float64) * torch.arange(1, t + 1)[:, None]).to(device)

    def losses() -> dict[str, torch.Tensor]:
        h = shared(x)
        out = [heads[i](h).squeeze(-1) for i in range(t)]
        return {n: (out[i] - ys[i]).square().mean() for i, n in enumerate(names(t))}

    return shared, heads, losses


def reference_update(name: str, j: Array, strategy_orders: list[list[int]] | None) -> Array:
    t = j.shape[0]
    if name == "pcgrad":
        assert strategy_orders is not None
        return ref_pcgrad(j, strategy_orders)
    if name == "mgda":
        return ref_min_norm(j @ j.T) @ j
    if name == "imtl":
        return ref_imtl(j) @ j
    if name == "pe_ltr":
        return ref_pe_ltr(j, np.zeros(t)) @ j
    if name == "cagrad":
        return t * ref_cagrad_direction(j, 0.4) / (1 + 0.4**2)
    if name == "gradnorm":  # first step: weights T softmax(0) = 1
        return j.sum(axis=0)
    raise KeyError(name)


GRADIENT_STRATEGIES = ["cagrad", "gradnorm", "imtl", "mgda", "pcgrad", "pe_ltr"]


def test_every_gradient_strategy_has_a_reference() -> None:
    registered = {n for n in WEIGHTINGS.names() if WEIGHTINGS.get(n).cls.needs_grads}
    assert registered == set(GRADIENT_STRATEGIES)


@pytest.mark.parametrize("t", [3, 4])
@pytest.mark.parametrize("name", GRADIENT_STRATEGIES)
def test_multitask_backward_gives_the_reference_update(name: str, t: int) -> None:
    shared, heads, losses = toy(t, seed=t)
    params = list(shared.parameters())
    rows = []
    for n in names(t):  # one backward per task: the per-task gradients, independently
        grads = torch.autograd.grad(losses()[n], params)
        rows.append(torch.cat([g.flatten() for g in grads]).numpy())
    j = np.stack(rows)
    s = build_weighting(name, names(t))
    orders = s.orders() if name == "pcgrad" else None  # type: ignore[operator]
    head_ref = [
        torch.autograd.grad(losses()[n], heads[i].parameters()) for i, n in enumerate(names(t))
    ]
    multitask_backward(losses(), s, shared_parameters=params)
    got = torch.cat([p.grad.flatten() for p in params]).numpy()
    np.testing.assert_allclose(got, reference_update(name, j, orders), rtol=1e-6, atol=1e-9)
    for i in range(t):  # task-specific parameters: the task's own gradient, weight 1
        for p, r in zip(heads[i].parameters(), head_ref[i], strict=True):
            torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", GRADIENT_STRATEGIES)
def test_multitask_backward_on_cuda_matches_the_cpu(name: str) -> None:
    """Every gradient strategy runs on a GPU and gives the CPU's update: helpers that go
    through numpy (the simplex projection, the QP solvers) must hand back tensors on their
    input's device (PE-LTR once added a CPU projection to its CUDA bounds)."""
    got = {}
    for device in ("cpu", "cuda"):
        shared, _, losses = toy(3, seed=3, device=device)
        s = build_weighting(name, names(3)).to(device)
        multitask_backward(losses(), s, shared_parameters=list(shared.parameters()))
        got[device] = torch.cat([p.grad.flatten().cpu() for p in shared.parameters()])
    torch.testing.assert_close(got["cuda"], got["cpu"], rtol=1e-6, atol=1e-9)
