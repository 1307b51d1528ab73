"""MGDA's Frank-Wolfe phase on its own (issue 17.5) and MGDA's two readings of gradient
normalisation (issue 12.12), against hand computations.

The Frank-Wolfe solver is followed by a projected-gradient polish that repairs a wrong first
phase, so these tests run the Frank-Wolfe phase alone (``frank_wolfe_min_norm``, or
``min_norm_weights(polish=False)``) and pin its iterates.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch

from mtlrec.weighting import build_weighting
from mtlrec.weighting._solvers import frank_wolfe_min_norm, min_norm_weights


def gram_of(*vectors: tuple[float, ...]) -> np.ndarray:
    j = np.array(vectors, dtype=np.float64)
    return j @ j.T


# -- Frank-Wolfe (Sener & Koltun 2018, Algorithm 2) ----------------------------------------------
def test_first_frank_wolfe_step_reaches_the_origin_of_a_triangle() -> None:
    # g = (1, 0), (0, 1), (-1/2, -1/2); from uniform weights g_w = (1/6, 1/6); the vertex with
    # the least g_t . g_w is g_3 (-1/6 against 1/6, 1/6); the exact line search between g_w and
    # g_3 gives gamma = (|g_w|^2 - g_w.g_3) / |g_w - g_3|^2 = (1/18 + 1/6) / (16/18) = 1/4,
    # so w_1 = 3/4 (1/3, 1/3, 1/3) + 1/4 e_3 = (1/4, 1/4, 1/2), and sum w_t g_t = 0.
    g = gram_of((1, 0), (0, 1), (-0.5, -0.5))
    w1 = frank_wolfe_min_norm(g, max_iter=1)
    np.testing.assert_allclose(w1, [0.25, 0.25, 0.5], rtol=0, atol=1e-15)
    assert float(w1 @ g @ w1) == pytest.approx(0.0, abs=1e-15)


def test_frank_wolfe_iterates_by_hand() -> None:
    # g = (1, 0), (0, 1), (-2, 0). From uniform weights g_w = (-1/3, 1/3); g_t . g_w =
    # (-1/3, 1/3, 2/3): vertex 1; gamma = (2/9 + 1/3) / (2/9 + 1 + 2/3) = 5/17, so
    # w_1 = (9/17, 4/17, 4/17) and g_w = (1/17, 4/17). Then g_t . g_w = (1/17, 4/17, -2/17):
    # vertex 3; gamma = (1/17 + 2/17) / (1/17 + 4 + 4/17) = 3/73, so w_2 = 70/73 w_1 + 3/73 e_3.
    g = gram_of((1, 0), (0, 1), (-2, 0))
    w1 = [Fraction(9, 17), Fraction(4, 17), Fraction(4, 17)]
    w2 = [Fraction(70, 73) * x for x in w1]
    w2[2] += Fraction(3, 73)
    np.testing.assert_allclose(frank_wolfe_min_norm(g, max_iter=1), [float(x) for x in w1])
    np.testing.assert_allclose(frank_wolfe_min_norm(g, max_iter=2), [float(x) for x in w2])
    # and from a given start (one step from w_1 is w_2)
    start = np.array([float(x) for x in w1])
    np.testing.assert_allclose(frank_wolfe_min_norm(g, 1, start=start), [float(x) for x in w2])


def exact_min_norm(gram: np.ndarray) -> float:
    """``min_{w in simplex} w^T G w`` by enumerating the faces (closed form on each)."""
    t = gram.shape[0]
    best = np.inf
    for size in range(1, t + 1):
        for face in itertools.combinations(range(t), size):
            s = list(face)
            x = np.linalg.solve(gram[np.ix_(s, s)], np.ones(size))
            if (x / x.sum()).min() >= -1e-12:
                best = min(best, 1.0 / x.sum())  # the affine minimum's value: 1 / 1^T G^-1 1
    return float(best)


@pytest.mark.parametrize(("t", "seed"), [(t, s) for t in (3, 4, 5) for s in range(6)])
def test_frank_wolfe_alone_converges_towards_the_min_norm_point(t: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    j = rng.normal(size=(t, 9)) - 0.6 * np.outer(rng.choice([-1.0, 1.0], t), rng.normal(size=9))
    g = j @ j.T
    best = exact_min_norm(g)
    values = []
    for k in (1, 5, 25, 1000):
        w = frank_wolfe_min_norm(g, max_iter=k, tol=0.0)
        assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
        values.append(float(w @ g @ w))
    assert values == sorted(values, reverse=True)  # exact line search never goes uphill
    assert values[0] < float(np.full(t, 1 / t) @ g @ np.full(t, 1 / t))  # the first step helps
    assert values[-1] <= best * 1.03 + 1e-12  # FW alone, no polish: within 3% here
    w = min_norm_weights(torch.from_numpy(g), polish=False)
    np.testing.assert_allclose(w.numpy(), frank_wolfe_min_norm(g), rtol=0, atol=0)


# -- MGDA's normalisation: the authors' code vs LibMTL ---------------------------------------------
# g1 = (1, 0), g2 = (0, 2), losses (2, 4). With normalisers s the min-norm point of the g_t / s_t
# is a; the authors' code (apply_to: raw) then weighs the raw losses by a; LibMTL's reading
# (apply_to: normalized) steps along sum a_t g_t / s_t, i.e. raw weights a_t / s_t (rescaled here
# to sum to 1).
J2 = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
L2 = torch.tensor([2.0, 4.0], dtype=torch.float64)
HAND_2 = {
    # no normalisation: min-norm of (1, 0), (0, 2): a ∝ 1 / |g|^2 = (1, 1/4) -> (4/5, 1/5)
    ("none", "raw"): [0.8, 0.2],
    ("none", "normalized"): [0.8, 0.2],
    # l2: s = (1, 2), unit vectors -> a = (1/2, 1/2); LibMTL: (1/2, 1/4) / (3/4)
    ("l2", "raw"): [0.5, 0.5],
    ("l2", "normalized"): [2 / 3, 1 / 3],
    # loss: s = (2, 4), g / s = (1/2, 0), (0, 1/2) -> a = (1/2, 1/2); LibMTL: (1/4, 1/8) / (3/8)
    ("loss", "raw"): [0.5, 0.5],
    ("loss", "normalized"): [2 / 3, 1 / 3],
    # loss+: s = (2 * 1, 4 * 2), g / s = (1/2, 0), (0, 1/4) -> a ∝ (4, 16) = (1/5, 4/5);
    # LibMTL: (1/10, 1/10) / (1/5)
    ("loss+", "raw"): [0.2, 0.8],
    ("loss+", "normalized"): [0.5, 0.5],
}


@pytest.mark.parametrize(("norm", "apply_to"), sorted(HAND_2))
def test_mgda_normalisation_readings_two_tasks(norm: str, apply_to: str) -> None:
    s = build_weighting("mgda", ("a", "b"), {"normalization": norm, "apply_to": apply_to})
    alpha = s.shared_weights(L2, J2)
    np.testing.assert_allclose(alpha.numpy(), HAND_2[(norm, apply_to)], rtol=1e-12, atol=1e-12)
    update = s.aggregate(J2, s.weights(L2, J2))
    np.testing.assert_allclose(update.numpy(), (alpha @ J2).numpy(), rtol=1e-12)


def test_mgda_normalisation_readings_three_orthogonal_tasks() -> None:
    # g_t = n_t e_t with n = (1, 2, 4): the min-norm weights of orthogonal vectors are
    # proportional to 1 / |v_t|^2. l2 makes them unit: a = 1/3 each; LibMTL then steps along
    # sum e_t / 3, raw weights a_t / n_t ∝ (1, 1/2, 1/4) = (4/7, 2/7, 1/7).
    n = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    j = torch.diag(n)
    losses = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    tasks = ("a", "b", "c")
    raw = build_weighting("mgda", tasks, {"normalization": "l2", "apply_to": "raw"})
    libmtl = build_weighting("mgda", tasks, {"normalization": "l2", "apply_to": "normalized"})
    np.testing.assert_allclose(raw.shared_weights(losses, j).numpy(), [1 / 3] * 3, atol=1e-9)
    np.testing.assert_allclose(
        libmtl.shared_weights(losses, j).numpy(), [4 / 7, 2 / 7, 1 / 7], atol=1e-9
    )
    # loss+: s = L n, g / s = e_t / L_t -> a ∝ L^2 = (1, 9, 1/4) / (41/4); LibMTL: a / s
    a = np.array([1.0, 9.0, 0.25]) / 10.25
    s = losses.numpy() * n.numpy()
    for apply_to, want in (("raw", a), ("normalized", (a / s) / (a / s).sum())):
        st = build_weighting("mgda", tasks, {"normalization": "loss+", "apply_to": apply_to})
        np.testing.assert_allclose(st.shared_weights(losses, j).numpy(), want, atol=1e-7)
    # scale: num_tasks multiplies by T
    st = build_weighting("mgda", tasks, {"normalization": "l2", "scale": "num_tasks"})
    np.testing.assert_allclose(st.shared_weights(losses, j).numpy(), [1.0] * 3, atol=1e-9)
