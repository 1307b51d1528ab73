"""Tests that kill the mutants of ``mtlrec.weighting._solvers`` the rest of the suite let live
(``python benchmarks/mutation.py weighting``), each against an analytic value, an independent
computation or a documented property: the degenerate thresholds of the two-task closed form and
of Frank-Wolfe's line search, its L1 stopping rule, the device of the one- and two-task
results, the projected-gradient polish of the min-norm solver and its exact finish on a face
(:func:`_exact_on_support`: its support, its scale-free optimality test, never worse than its
input, a face block that rounding made indefinite, a zero or overflowing ``1^T G_S^-1 1``), the
CAGrad dual: its exact solver up to ``EXACT_MAX_TASKS`` tasks and its tie-break, the face solve
(:func:`_face_point`: vertices, points outside a face, the shrinking step, the clipping of
rounding-size negative weights), the active-set finish (:func:`_active_set_polish`: its
support, its KKT tolerance, ties, its bound) and the projected gradient with Armijo
backtracking (:func:`_cagrad_dual_iterative`) against a plain loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtlrec.weighting._solvers as solvers
from mtlrec.weighting._solvers import (
    _active_set_polish,
    _cagrad_dual_iterative,
    _exact_on_support,
    _face_point,
    cagrad_dual,
    frank_wolfe_min_norm,
    min_norm_two,
    min_norm_weights,
    project_simplex_np,
)

F64 = torch.float64


def _golden_min(f, lo: float = 0.0, hi: float = 1.0, iters: int = 200) -> float:
    """Minimiser of a convex function of one variable on ``[lo, hi]`` (golden-section search)."""
    k = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    for _ in range(iters):
        c, d = b - k * (b - a), a + k * (b - a)
        if f(c) <= f(d):
            b = d
        else:
            a = c
    return (a + b) / 2.0


def _dual(g: np.ndarray, b: np.ndarray, r: float, w: np.ndarray) -> float:
    """CAGrad's dual ``F(w) = w . b + r sqrt(w^T G w)`` (Liu et al. 2021, eq. 5), in float64."""
    return float(w @ b) + r * float(np.sqrt(max(float(w @ g @ w), 0.0)))


def _edge_minimiser(g: np.ndarray, b: np.ndarray, r: float, i: int, j: int) -> np.ndarray:
    """The minimiser of ``F`` on the edge ``[e_i, e_j]`` of the simplex (F is convex on it)."""
    t = g.shape[0]

    def point(a: float) -> np.ndarray:
        w = np.zeros(t)
        w[i], w[j] = 1.0 - a, a
        return w

    return point(_golden_min(lambda a: _dual(g, b, r, point(a))))


# -- two tasks: min_norm_two and the one-task case --------------------------------------------
def test_min_norm_two_segment_of_squared_length_1e_20_is_degenerate() -> None:
    """``||g1 - g2||^2 <= 1e-20`` counts as a degenerate segment (the middle, 0.5), the bound
    included: g1 = (1e-10, 0), g2 = 0 has ``||g1 - g2||^2 = 1e-20`` exactly (the clipped closed
    form would give 0 here)."""
    g11, g12, g22 = (torch.tensor(x, dtype=F64) for x in (1e-20, 0.0, 0.0))
    assert float(g11 + g22 - 2 * g12) == 1e-20
    assert float(min_norm_two(g11, g12, g22)) == 0.5
    # just above the bound the closed form applies: (g22 - g12) / den = 0
    g11 = torch.tensor(2e-20, dtype=F64)
    assert float(min_norm_two(g11, g12, g22)) == 0.0


def test_one_and_two_task_weights_are_on_the_gram_matrix_device() -> None:
    """The weights live on the Gram matrix's device, not on the default device (here the
    default device is 'meta', the Gram matrix on the CPU): the one-task weight and the
    degenerate two-task middle."""
    gram1 = torch.tensor([[2.0]], dtype=F64)
    same = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)  # two equal gradients
    with torch.device("meta"):
        one = min_norm_weights(gram1)
        gamma = min_norm_two(same[0, 0], same[0, 1], same[1, 1])
        two = min_norm_weights(same)
    assert one.device.type == "cpu" and one.tolist() == [1.0]
    assert gamma.device.type == "cpu" and float(gamma) == 0.5
    assert two.device.type == "cpu" and two.tolist() == [0.5, 0.5]


# -- Frank-Wolfe --------------------------------------------------------------------------------
def test_frank_wolfe_line_search_segment_at_the_degenerate_bound() -> None:
    """From e_1 with g1 = (1e-10, 0), g2 = 0 the step goes towards vertex 2 and the segment has
    ``den = |g_w - g_2|^2 = 1e-20``: at the bound the step is the middle (gamma = 0.5), as for
    a zero-length segment, not the exact line search's gamma = 1."""
    g = np.array([[1e-20, 0.0], [0.0, 0.0]])
    w = frank_wolfe_min_norm(g, max_iter=1, start=np.array([1.0, 0.0]))
    np.testing.assert_array_equal(w, [0.5, 0.5])


def test_frank_wolfe_stops_at_the_first_step_shorter_than_tol() -> None:
    """The stopping rule is strict (a step of L1 length < tol is the last): with ``tol`` equal
    to the first step's length the second step is still taken. g = (1, 0), (0, 1), (-2, 0): by
    hand w_1 = (9, 4, 4) / 17 and w_2 = 70/73 w_1 + 3/73 e_3 (|w_2 - w_1|_1 = 78/1241, shorter
    than |w_1 - u|_1 = 20/51, so the run stops there)."""
    j = np.array([[1.0, 0.0], [0.0, 1.0], [-2.0, 0.0]])
    g = j @ j.T
    w1 = np.array([9.0, 4.0, 4.0]) / 17
    w2 = 70 / 73 * w1 + np.array([0.0, 0.0, 3 / 73])
    first = frank_wolfe_min_norm(g, max_iter=1)
    np.testing.assert_allclose(first, w1, rtol=0, atol=1e-15)
    moved = float(np.abs(first - np.full(3, 1.0 / 3)).sum())  # the first step's length
    np.testing.assert_allclose(frank_wolfe_min_norm(g, 50, tol=moved), w2, rtol=0, atol=1e-15)
    # a tol just above the first step's length stops after it
    np.testing.assert_allclose(frank_wolfe_min_norm(g, 50, tol=moved * (1 + 1e-12)), w1, atol=0)


# -- the min-norm solver's projected-gradient polish --------------------------------------------
def _ill_conditioned_gram() -> np.ndarray:
    """Four gradients of norms 1 to 30 with two nearly parallel: the projected gradient's
    linear rate is slow here, so its iterates keep moving for many steps."""
    j = np.array(
        [
            [1.0, 0.0, 0.0, 0.2],
            [0.9, 0.1, 0.0, 0.25],
            [-3.0, 2.0, 1.0, 0.0],
            [0.0, -30.0, 4.0, 1.0],
        ]
    )
    return j @ j.T


def _polish_reference(g: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, list]:
    """Frank-Wolfe (``max_iter`` steps, tested on its own above), then at most ``4 max_iter``
    projected gradient steps of length ``1 / lambda_max(G)``, stopping after the first that
    moves less than ``tol`` (L1); also returns the L1 lengths of the steps."""
    w = frank_wolfe_min_norm(g, max_iter, tol)
    lam = float(np.linalg.eigvalsh(g).max())
    moves = []
    for _ in range(4 * max_iter):
        new = project_simplex_np(w - (g @ w) / lam, 1.0)
        moves.append(float(np.abs(new - w).sum()))
        w = new
        if moves[-1] < tol:
            break
    return w, moves


@pytest.fixture
def no_exact_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the polish without its exact finish on the face (tested on its own below)."""
    monkeypatch.setattr(solvers, "_exact_on_support", lambda g, w: w)


@pytest.mark.usefixtures("no_exact_finish")
@pytest.mark.parametrize("max_iter", [1, 2, 3])
def test_min_norm_polish_takes_four_projected_steps_per_iteration(max_iter: int) -> None:
    """Without a tolerance the polish takes exactly ``4 max_iter`` steps (the iterates are
    still moving, by more than 1e-6 per step, at the end here)."""
    g = _ill_conditioned_gram()
    want, moves = _polish_reference(g, max_iter, 0.0)
    assert len(moves) == 4 * max_iter and min(moves) > 1e-6
    got = min_norm_weights(torch.from_numpy(g), max_iter=max_iter, tol=0.0).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.usefixtures("no_exact_finish")
def test_min_norm_polish_stops_at_the_first_step_shorter_than_tol() -> None:
    """The polish stops after its first step of L1 length below ``tol`` (strictly below: a step
    of length exactly ``tol`` is not the last)."""
    g = _ill_conditioned_gram()
    _, moves = _polish_reference(g, 20, 0.0)
    for k in (1, 3, 6):  # stop after step k + 1
        tol = float(np.nextafter(moves[k], np.inf))
        want, taken = _polish_reference(g, 20, tol)
        assert len(taken) < 80
        got = min_norm_weights(torch.from_numpy(g), max_iter=20, tol=tol).numpy()
        np.testing.assert_array_equal(got, want)
    # tol equal to a step's length: that step is not the last one
    tol = moves[5]
    want, taken = _polish_reference(g, 20, tol)
    assert len(taken) > 6
    np.testing.assert_array_equal(min_norm_weights(torch.from_numpy(g), 20, tol).numpy(), want)


# -- the exact finish of the min-norm solver on a face ------------------------------------------
def test_exact_on_support_weights_up_to_eps_are_off_the_support() -> None:
    """Weights ``<= eps`` (1e-9) are not on the support: from w = (1 - 1e-9, 1e-9) the face is
    {1} and the exact minimiser e_1 is returned (g1 . g2 = 1.5 >= |g1|^2 = 1: no descent
    towards g2; on the face {1, 2} the affine minimiser has a negative weight)."""
    g = np.array([[1.0, 1.5], [1.5, 4.0]])
    w = np.array([1.0 - 1e-9, 1e-9])
    np.testing.assert_array_equal(_exact_on_support(g, w), [1.0, 0.0])


def _two_on_support_one_outside(excess: float, z: float) -> np.ndarray:
    """g1 = e1, g2 = e2 (min-norm point of the face {1, 2}: (1/2, 1/2), value 1/2, g_w =
    (1/2, 1/2, 0)) and g3 = (a, a, z) with ``g3 . g_w = a = 1/2 + excess``: the face's point is
    the minimiser over the simplex iff ``excess >= 0``."""
    a = 0.5 + excess
    j = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [a, a, z]])
    return j @ j.T


@pytest.mark.parametrize(("z", "s"), [(0.0, 1.0), (0.0, 1e-9), (0.0, 1e9), (1e3, 1.0)])
def test_exact_on_support_optimality_test_is_relative_to_the_value(z: float, s: float) -> None:
    """The face's affine minimiser is kept only when no task outside has ``(G x)_t`` below the
    value ``x^T G x`` by more than ``1e-9`` of the value: a violation of 1e-4 of the value is
    refused at any scale of the gradients (1e-9, 1e9) and whatever the largest gradient norm
    (g3 of norm 1000); without a violation the exact point is returned."""
    w = np.array([0.6, 0.4, 0.0])
    bad = s * _two_on_support_one_outside(-0.5e-4, z)
    np.testing.assert_array_equal(_exact_on_support(bad, w), w)
    good = s * _two_on_support_one_outside(0.5e-4, z)
    np.testing.assert_allclose(_exact_on_support(good, w), [0.5, 0.5, 0.0], rtol=0, atol=1e-15)


def test_exact_on_support_violation_of_exactly_the_tolerance_is_accepted() -> None:
    """Face {1} (value 1, the largest diagonal 1e6): task 2 has ``(G e_1)_2 = 1 - 1e-9 x 1``,
    exactly the tolerance below the value, which the test accepts, so e_1 is returned (w has
    weight 5e-10 < eps on task 2 and a larger ``w^T G w``)."""
    thr = 1.0 - 1e-9 * max(1.0, 1e-12 * 1e6)
    g = np.array([[1.0, thr], [thr, 1e6]])
    w = np.array([1.0 - 5e-10, 5e-10])
    assert float(w @ g @ w) > 1.0
    np.testing.assert_array_equal(_exact_on_support(g, w), [1.0, 0.0])


def test_exact_on_support_never_increases_the_objective() -> None:
    """The result's ``w^T G w`` is never above the input's (as evaluated): from points a few
    ulps off the exact minimiser on its face, some evaluate below the exact point's value by
    rounding, and those are returned unchanged."""
    j = np.array([[1.0, 0.2, 0.0], [-0.3, 1.0, 0.1], [0.2, 0.1, 1.0], [1.0, 1.0, 1.0]])
    g = j @ j.T
    exact = _exact_on_support(g, np.array([0.3, 0.3, 0.4, 0.0]))
    value = float(exact @ g @ exact)
    rng = np.random.default_rng(0)
    lower = 0
    for _ in range(200):
        d = rng.normal(size=4) * np.array([1.0, 1.0, 1.0, 0.0])
        w = exact + 1e-13 * (d - d[:3].mean() * np.array([1.0, 1.0, 1.0, 0.0]))
        lower += float(w @ g @ w) < value
        out = _exact_on_support(g, w)
        assert float(out @ g @ out) <= float(w @ g @ w)
    assert lower > 0  # the case that matters occurs in this sample


# -- CAGrad's dual: the face solve --------------------------------------------------------------
G3 = np.array([[2.0, 0.3, -0.4], [0.3, 1.5, 0.2], [-0.4, 0.2, 1.0]])  # positive definite


def _stationary_at(g: np.ndarray, w: np.ndarray, r: float = 1.0) -> np.ndarray:
    """The ``b`` that makes ``w`` the stationary point of ``F`` on the face of all tasks:
    ``b + r G w / ||g_w|| = 0`` (the stationarity of :func:`cagrad_dual`'s docstring with
    multiplier 0)."""
    return -r * (g @ w) / np.sqrt(w @ g @ w)


def test_face_point_of_a_vertex_is_the_vertex() -> None:
    b = np.array([0.1, -0.2, 0.3])
    for i in range(3):
        np.testing.assert_array_equal(_face_point(G3, b, 1.0, [i]), np.eye(3)[i])


def test_face_point_outside_its_face_is_none_unless_shrinking() -> None:
    """The stationary point of the face {1, 2, 3} is (0.6, 0.5, -0.1), outside it: None by
    default; with ``shrink`` task 3 (the most negative weight) leaves and the face {1, 2} is
    solved, whose point is the minimiser of F on that edge (golden-section reference)."""
    b = _stationary_at(G3, np.array([0.6, 0.5, -0.1]))
    assert _face_point(G3, b, 1.0, [0, 1, 2]) is None
    assert _face_point(G3, b, 1.0, [0, 1, 2], shrink=False) is None
    got = _face_point(G3, b, 1.0, [0, 1, 2], shrink=True)
    want = _edge_minimiser(G3, b, 1.0, 0, 1)
    assert 0.05 < want[1] < 0.95  # an interior point of the edge
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(_face_point(G3, b, 1.0, [0, 1]), want, rtol=0, atol=1e-7)


def test_face_point_clips_a_rounding_size_negative_weight_and_renormalises() -> None:
    """A stationary weight of -5e-10 (within the 1e-9 allowance) is set to 0 and the point is
    renormalised onto the simplex."""
    ws = np.array([0.6, 0.4 + 5e-10, -5e-10])
    got = _face_point(G3, _stationary_at(G3, ws), 1.0, [0, 1, 2])
    assert got is not None and got[2] == 0.0
    assert got.sum() == pytest.approx(1.0, abs=2e-16)
    want = np.array([0.6, 0.4 + 5e-10, 0.0]) / (1 + 5e-10)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)


def test_face_point_with_long_gradients_is_the_edge_minimiser() -> None:
    """Gradients of norm 3 (``||g_w|| > 1``, so ``sum v = 1 / ||g_w|| < 1``): the face point is
    still the minimiser of F on the edge."""
    g = 9.0 * np.array([[1.0, -0.5], [-0.5, 1.0]])
    b = np.array([0.3, -0.2])
    got = _face_point(g, b, 1.0, [0, 1])
    want = _edge_minimiser(g, b, 1.0, 0, 1)
    assert 0.05 < want[0] < 0.95 and float(np.sqrt(want @ g @ want)) > 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


def test_face_point_without_a_root_of_positive_sum_is_none() -> None:
    """G = 2 I, b = (1, -1), r = 1: the quadratic's double root gives ``sum v = 0``, no point of
    the face (F rises from the vertex e_2 along the edge); None, with or without shrinking."""
    g, b = 2.0 * np.eye(2), np.array([1.0, -1.0])
    assert _face_point(g, b, 1.0, [0, 1]) is None
    assert _face_point(g, b, 1.0, [0, 1], shrink=True) is None
    a = np.linspace(0.0, 1.0, 101)
    f = [_dual(g, b, 1.0, np.array([x, 1 - x])) for x in a]
    assert np.argmin(f) == 0  # the edge's minimiser is the vertex e_2


# -- CAGrad's dual: the active-set finish -------------------------------------------------------
def _pair(c: float) -> np.ndarray:
    """Two unit gradients with ``g1 . g2 = c``."""
    return np.array([[1.0, c], [c, 1.0]])


@pytest.mark.parametrize(
    ("r", "c", "moves"),
    [
        (1.0, 1.0 - 1e-12 * max(1.0, 1.0), False),  # below the level by exactly the tolerance
        (4.0, 1.0 - 0.5e-12, False),  # by 2e-12 < 1e-12 x |level| = 4e-12
        (1.0, 1.0 - 1.5e-12, True),  # by 1.5e-12 > 1e-12
    ],
)
def test_active_set_finish_kkt_tolerance(r: float, c: float, moves: bool) -> None:
    """From the vertex e_1 (b = 0: F = r ||g_w||) the gradient of F is ``r (1, c)``: task 2 is
    added when ``r c`` is below the face's level ``r`` by more than ``1e-12 max(1, |level|)``;
    then the minimiser of the edge, (1/2, 1/2) by symmetry, lowers F (by ``r (1 - c) / 4``)."""
    g, b = _pair(c), np.zeros(2)
    got = _active_set_polish(g, b, r, np.array([1.0, 0.0]))
    if moves:
        np.testing.assert_allclose(got, [0.5, 0.5], rtol=0, atol=1e-3)
        assert _dual(g, b, r, got) < r  # F(e_1) = r
    else:
        np.testing.assert_array_equal(got, [1.0, 0.0])


def test_active_set_finish_weights_up_to_1e_12_are_off_the_support() -> None:
    """From w = (1 - 1e-12, 1e-12) the face is {1}: its point e_1 lowers F and is the
    minimiser (g2 = 2 g1, b = 0: F = 1 + w_2). The face {1, 2} could not be solved (G
    singular)."""
    g = np.array([[1.0, 2.0], [2.0, 4.0]])
    got = _active_set_polish(g, np.zeros(2), 1.0, np.array([1.0 - 1e-12, 1e-12]))
    np.testing.assert_array_equal(got, [1.0, 0.0])


def test_active_set_finish_keeps_its_input_when_no_face_point_is_lower() -> None:
    """A face point replaces w only when it lowers F: g1 = g2 (tasks 1 and 2 the same), so
    w = (1 - 2^-41, 2^-41, 0) (face {1}) and e_1 have the same F exactly; w is returned."""
    g = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 4.0]])
    w = np.array([1.0 - 2.0**-41, 2.0**-41, 0.0])
    b = np.zeros(3)
    assert _dual(g, b, 1.0, w) == _dual(g, b, 1.0, np.eye(3)[0])
    np.testing.assert_array_equal(_active_set_polish(g, b, 1.0, w), w)


def test_active_set_finish_is_bounded_by_2t_face_solves(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guard against cycling: with a face solver that makes no progress (always the vertex
    e_1, where task 2 would lower F) the finish stops after 2 T face solves, F not raised."""
    calls = []

    def stuck(g: np.ndarray, b: np.ndarray, r: float, s: list, shrink: bool = False):
        calls.append(list(s))
        return np.array([1.0, 0.0])

    monkeypatch.setattr(solvers, "_face_point", stuck)
    g = _pair(0.5)
    got = _active_set_polish(g, np.zeros(2), 1.0, np.array([1.0, 0.0]))
    assert len(calls) == 2 * 2
    np.testing.assert_array_equal(got, [1.0, 0.0])


# -- CAGrad's dual: exact up to EXACT_MAX_TASKS tasks --------------------------------------------
def test_cagrad_dual_exact_for_eight_tasks_iterative_above(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to ``EXACT_MAX_TASKS`` (8) tasks the dual is solved by face enumeration, never by the
    projected gradient; 9 tasks use it."""
    used = []

    def spy(g: np.ndarray, b: np.ndarray, r: float, max_iter: int = 5000) -> np.ndarray:
        used.append(g.shape[0])
        return np.full(g.shape[0], 1.0 / g.shape[0])

    monkeypatch.setattr(solvers, "_cagrad_dual_iterative", spy)
    rng = np.random.default_rng(3)
    for t in (solvers.EXACT_MAX_TASKS, solvers.EXACT_MAX_TASKS + 1):
        j = rng.normal(size=(t, 12))
        w = cagrad_dual(j @ j.T, 0.5)
        assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    assert used == [solvers.EXACT_MAX_TASKS + 1]


# -- CAGrad's dual: the projected gradient above EXACT_MAX_TASKS tasks ---------------------------
def _scaled_dual(t: int, seed: int, c: float) -> tuple[np.ndarray, np.ndarray, float]:
    """``G``, ``b = G 1 / T`` and ``r = c ||g0||`` of :func:`cagrad_dual`, on gradients of norms
    up to 10x apart, a third of them against the rest."""
    rng = np.random.default_rng(seed)
    j = rng.normal(size=(t, 8))
    j[: t // 3] *= -1
    j[:, 0] += 1.5
    j *= 10.0 ** rng.uniform(0, 1, size=t)[:, None]
    g = j @ j.T
    g = g / np.diag(g).max()
    b = g.mean(axis=1)
    return g, b, c * float(np.sqrt(b.mean()))


def _armijo_reference(
    g: np.ndarray, b: np.ndarray, r: float, iters: int, tol: float
) -> tuple[np.ndarray, list]:
    """Projected gradient on F from the uniform weights: from step 1, halve the step until
    the Armijo condition ``F(new) <= F(w) - 1e-4 grad . (w - new)`` holds (or the step is below
    1e-16), then double it for the next iteration; stop after the first iteration that moves
    less than ``tol`` (L1). Also returns the L1 lengths of the moves."""
    t = g.shape[0]

    def f(w: np.ndarray) -> float:
        return float(w @ b) + r * float(np.sqrt(max(float(w @ g @ w), 1e-300)))

    w = np.full(t, 1.0 / t)
    fw, step, moves = f(w), 1.0, []
    for _ in range(iters):
        grad = b + r * (g @ w) / float(np.sqrt(max(float(w @ g @ w), 1e-300)))
        while True:
            new = project_simplex_np(w - step * grad, 1.0)
            fn = f(new)
            if fn <= fw - 1e-4 * float(grad @ (w - new)) or step < 1e-16:
                break
            step /= 2.0
        moves.append(float(np.abs(new - w).sum()))
        w, fw, step = new, fn, 2.0 * step
        if moves[-1] < tol:
            break
    return w, moves


CASES = [(t, seed, c) for t, seed in ((4, 0), (5, 1), (9, 2)) for c in (0.4, 1.0)]
# c = 2, 3: the step 1 fails the Armijo test and is halved (iterations 3 and 1)
CASES += [(4, 6, 2.0), (5, 7, 3.0)]


def _first_step_on_the_armijo_edge() -> tuple[np.ndarray, np.ndarray, float]:
    """Two tasks (g1 . g2 = -0.9), b = (0, -1.5528), r = 1: from the uniform weights the step 1
    lowers F by only ~1e-5 of ``grad . (w - new)`` (less than the 1e-4 Armijo asks), so it is
    halved."""
    return np.array([[1.0, -0.9], [-0.9, 1.0]]), np.array([0.0, -1.5528]), 1.0


@pytest.mark.parametrize("case", [*CASES, "edge"])
def test_cagrad_projected_gradient_iterates_are_the_armijo_ones(case: tuple | str) -> None:
    """The first iterates of the projected gradient are those of the plain loop, and F
    decreases along them."""
    g, b, r = _first_step_on_the_armijo_edge() if case == "edge" else _scaled_dual(*case)
    values = []
    for iters in (0, 1, 2, 3, 5, 8, 13):
        want, _ = _armijo_reference(g, b, r, iters, 1e-12)
        got = _cagrad_dual_iterative(g, b, r, max_iter=iters)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
        values.append(_dual(g, b, r, got))
    assert values == sorted(values, reverse=True)


def test_cagrad_projected_gradient_armijo_edge_case_halves_the_first_step() -> None:
    """The first step of the edge case: 1 is refused (F falls by less than 1e-4 of the
    projected gradient's inner product), 1/2 is taken."""
    g, b, r = _first_step_on_the_armijo_edge()
    w = np.full(2, 0.5)
    grad = b + r * (g @ w) / np.sqrt(w @ g @ w)
    full = project_simplex_np(w - grad, 1.0)
    drop = _dual(g, b, r, w) - _dual(g, b, r, full)
    assert 0 < drop < 1e-4 * float(grad @ (w - full))
    half = project_simplex_np(w - 0.5 * grad, 1.0)
    np.testing.assert_allclose(_cagrad_dual_iterative(g, b, r, max_iter=1), half, atol=1e-15)


@pytest.mark.parametrize(("t", "seed", "c"), CASES[2:5])
def test_cagrad_projected_gradient_stops_at_the_first_move_shorter_than_tol(
    t: int, seed: int, c: float
) -> None:
    """The run stops after the first iteration that moves less than ``tol`` (strictly: a move
    of exactly ``tol`` is not the last)."""
    g, b, r = _scaled_dual(t, seed, c)
    _, moves = _armijo_reference(g, b, r, 30, 0.0)
    k = int(np.argmin(moves[:10]))  # the shortest of the first ten moves (a positive length)
    assert moves[k] > 0
    for tol in (moves[k], float(np.nextafter(moves[k], np.inf))):
        want, taken = _armijo_reference(g, b, r, 30, tol)
        got = _cagrad_dual_iterative(g, b, r, max_iter=30, tol=tol)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    assert len(taken) == k + 1


def test_face_point_weight_of_exactly_minus_1e_9_is_clipped() -> None:
    """The allowance for negative weights includes its bound: G = I, r = 1 and b = -(0.6, 0.4,
    0) / ||(0.6, 0.4)|| + (0, 0, 1.39e-9), the stationary point of the face is about
    (0.6, 0.4, -1e-9); b_3 was picked among neighbouring floats so that the weight of task 3
    evaluates to -1e-9 exactly. It is clipped to 0, not refused."""
    b = np.array([float.fromhex(x) for x in ("-0x1.aa027f059dce1p-1", "-0x1.1c01aa03be896p-1")])
    b = np.append(b, float.fromhex("0x1.7d2fe29ca6010p-30"))
    got = _face_point(np.eye(3), b, 1.0, [0, 1, 2])
    assert got is not None and got[2] == 0.0
    assert got.sum() == pytest.approx(1.0, abs=2e-16)
    np.testing.assert_allclose(got, [0.6, 0.4, 0.0], rtol=0, atol=2e-9)


def _simplex_by_bisection(v: np.ndarray, total: float) -> np.ndarray:
    """The projection onto {w >= 0, sum w = total} is max(v - tau, 0) with the tau where the
    sum equals ``total`` (a decreasing function of tau): found by bisection."""
    lo, hi = v.min() - total, v.max()
    for _ in range(200):
        tau = 0.5 * (lo + hi)
        lo, hi = (tau, hi) if np.maximum(v - tau, 0.0).sum() > total else (lo, tau)
    return np.maximum(v - 0.5 * (lo + hi), 0.0)


@pytest.mark.parametrize("scale", [1.0, 1e8, 1e17, 1e250])
def test_project_simplex_at_any_scale(scale: float) -> None:
    # [s, 0, -s] with s >= total: all the mass on the largest entry. Entries near 1e17 used to
    # swallow ``total`` in the cumulative sums, and the search for the threshold found no
    # index (ValueError from an empty max)
    np.testing.assert_array_equal(project_simplex_np(np.array([scale, 0.0, -scale])), [1, 0, 0])
    # close entries far from 0: adding a constant to every entry leaves the projection as it
    # is; the differences of close floats are exact (Sterbenz), so the reference projects those
    v = np.array([0.3, 0.2, 0.9]) + scale
    w = project_simplex_np(v, 1.0)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(w, _simplex_by_bisection(v - v.max(), 1.0), atol=1e-12)


def test_exact_on_support_finishes_a_face_that_rounding_made_indefinite() -> None:
    """Opposite gradients g2 = -g1, with a Gram matrix that rounding made indefinite by 1e-12:
    ``g12 = -(1 + 2^-40)``. On the face {1, 2}, ``G_S^-1 1`` is all negative (its sum too),
    yet its normalisation (1/2, 1/2) is the face's stationary point, meets every check (no
    negative weight, no descent vertex) and is lower than the iterate: it is returned. Only a
    guard on the sign of ``1^T G_S^-1 1`` would keep the iterate."""
    d = 2.0**-40
    g = np.array([[1.0, -1.0 - d, 0.0], [-1.0 - d, 1.0, 0.0], [0.0, 0.0, 2.0]])
    w = np.array([0.5 + 1e-6, 0.5 - 1e-6, 0.0])
    x = np.linalg.solve(g[:2, :2], np.ones(2))
    assert x.sum() < 0  # the premise: the face's block is not positive definite
    np.testing.assert_array_equal(_exact_on_support(g, w), [0.5, 0.5, 0.0])


def test_exact_on_support_keeps_the_iterate_on_a_face_without_a_stationary_point() -> None:
    """``1^T G_S^-1 1 = 0`` (a face block diag(1, -1)): the affine minimiser on the face does
    not exist, and the iterate is returned without a division by zero (a RuntimeWarning is an
    error in this suite)."""
    g = np.diag([1.0, -1.0, 1.0])
    w = np.array([0.7, 0.3, 0.0])
    assert np.linalg.solve(g[:2, :2], np.ones(2)).sum() == 0.0  # the premise
    np.testing.assert_array_equal(_exact_on_support(g, w), w)


def test_exact_on_support_keeps_the_iterate_when_the_solve_overflows() -> None:
    """A support gradient of squared norm 5e-324 (the smallest double): ``G_S^-1 1`` is inf, so
    the face has no finite minimiser; the iterate is returned, with no inf / inf = NaN on the
    way (a RuntimeWarning is an error in this suite)."""
    g = np.diag([1.0, 5e-324, 1.0])
    w = np.array([0.0, 1.0, 0.0])
    assert not np.isfinite(np.linalg.solve(g[1:2, 1:2], np.ones(1))).all()  # the premise
    np.testing.assert_array_equal(_exact_on_support(g, w), w)


def test_cagrad_dual_ties_go_to_the_smallest_face() -> None:
    """g1 = (-1, 1), g2 = (0, -1), c = 1/2: F's slope from the vertex e2 into the edge is exactly
    0 (scaled: b = (1/4, 0), r = sqrt(1/8) / 2, F(s) = s / 4 + r sqrt(5/2 s^2 - 2 s + 1/2),
    F'(0) = 1/4 - r sqrt(2) = 0), so the 1e-10 ridge moves the edge's stationary point to
    w1 = 4e-10, where F equals F(e2) to the last bit. The documented tie-break keeps the
    smaller face: exactly e2, not a weight of the ridge's size on task 1."""
    j = np.array([[-1.0, 1.0], [0.0, -1.0]])
    g = j @ j.T
    scaled = g / 2.0 + 1e-10 * np.eye(2)  # as cagrad_dual scales and ridges it
    b = scaled.mean(axis=1)
    r = 0.5 * np.sqrt(b.mean())
    face = _face_point(scaled, b, r, [0, 1])
    assert face is not None and 0 < face[0] < 1e-9  # the edge's point, a ridge's size away
    vertex = np.array([0.0, 1.0])
    assert solvers._dual_value(face, b, scaled, r) == solvers._dual_value(vertex, b, scaled, r)
    np.testing.assert_array_equal(cagrad_dual(g, 0.5), vertex)
