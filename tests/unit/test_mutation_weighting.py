"""Tests that kill the mutants of ``mtlrec.weighting`` the rest of the suite let live
(``python benchmarks/mutation.py weighting``), each against an analytic value or an independent
computation: configuration errors, the kinds DTP infers and its KPIs, the dual of CAGrad (the
iterative solver above ``EXACT_MAX_TASKS`` tasks against the exact one, the scale-free and
degenerate cases), the closed forms of PE-LTR and IMTL and their fallbacks, the windows of DWA
(uneven, absent tasks, float64 sums, counters past 2^24 restored from a checkpoint, legacy
checkpoints), the schedules of alternating training and PCGrad, and GradNorm's layer choice."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import mtlrec.weighting._solvers as solvers
from mtlrec.batch import Batch, Features
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelOutput
from mtlrec.weighting import build_weighting
from mtlrec.weighting._solvers import cagrad_dual, project_simplex

F64 = torch.float64
BIG = 2**24  # float32 holds every integer up to here, and not 2^24 + 1


def _batch(labels: dict, masks: dict | None = None) -> Batch:
    n = len(next(iter(labels.values())))
    masks = masks or {k: torch.ones(n, dtype=torch.bool) for k in labels}
    feats = Features(torch.zeros(n, 0, dtype=torch.int32), torch.zeros(n, 0))
    return Batch(feats, labels, masks, {k: torch.ones(n) for k in labels})


# -- CAGrad's dual: reference values from the Jacobian ---------------------------------------
def _cagrad_f(j: np.ndarray, w: np.ndarray, c: float) -> float:
    """CAGrad's dual objective from the gradients themselves (Liu et al. 2021, eq. 5):
    ``g_w . g0 + c ||g0|| ||g_w||``."""
    g0, gw = j.mean(axis=0), w @ j
    return float(gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw))


def _cagrad_d(j: np.ndarray, w: np.ndarray, c: float) -> np.ndarray:
    """The update direction ``g0 + c ||g0|| / ||g_w|| g_w`` of the dual weights ``w``."""
    g0, gw = j.mean(axis=0), w @ j
    return g0 + c * np.linalg.norm(g0) / np.linalg.norm(gw) * gw


def _kkt_residual(j: np.ndarray, w: np.ndarray, c: float) -> float:
    """How far ``w`` is from the minimiser of the (convex) dual over the simplex: with
    ``grad_t = g_t . g0 + c ||g0|| g_t . g_w / ||g_w||`` and ``lam = w . grad``, the minimiser
    has ``grad_t = lam`` where ``w_t > 0`` and ``grad_t >= lam`` elsewhere; relative to the
    scale of the gradient."""
    g0, gw = j.mean(axis=0), w @ j
    grad = j @ g0 + c * np.linalg.norm(g0) * (j @ gw) / np.linalg.norm(gw)
    lam = float(w @ grad)
    on = w > 1e-9
    worst = max(np.abs(grad[on] - lam).max(initial=0.0), (lam - grad[~on]).max(initial=0.0))
    return worst / float(np.abs(grad).max())


def _jacobian(t: int, seed: int, spread: float = 0.0, conflict: bool = False) -> np.ndarray:
    """``t`` task gradients of 30 parameters, norms spread over ``10^spread``; with
    ``conflict`` a third of them point against the rest."""
    rng = np.random.default_rng(seed)
    j = rng.normal(size=(t, 30))
    if conflict:
        j[: t // 3] *= -1
        j[:, :3] += 2.0
    return j * (10.0 ** rng.uniform(0, spread, size=t))[:, None]


def _exact_dual(gram: np.ndarray, c: float, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(solvers, "EXACT_MAX_TASKS", 64)  # face enumeration at any size
        return cagrad_dual(gram, c)


def _on_simplex(w: np.ndarray) -> None:
    assert w.min() >= 0
    assert w.sum() == pytest.approx(1.0, abs=1e-12)


# -- the iterative dual solver (more than EXACT_MAX_TASKS tasks) ------------------------------
CASES = [
    (t, conflict, c) for t in (9, 10, 11, 12) for conflict in (False, True) for c in (0.4, 1.0)
]


@pytest.mark.parametrize(("t", "conflict", "c"), CASES)
def test_cagrad_iterative_dual_matches_the_exact_solver(
    t: int, conflict: bool, c: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above 8 tasks the dual is solved by projected gradient to a tolerance: its minimum, and
    the update direction, are those of the exact face enumeration."""
    assert t > solvers.EXACT_MAX_TASKS
    j = _jacobian(t, seed=7 * t, conflict=conflict)
    gram = j @ j.T
    w = cagrad_dual(gram, c)
    exact = _exact_dual(gram, c, monkeypatch)
    _on_simplex(w)
    _on_simplex(exact)
    assert _kkt_residual(j, exact, c) < 1e-9  # the reference is the minimiser
    f, f_exact = _cagrad_f(j, w, c), _cagrad_f(j, exact, c)
    assert f == pytest.approx(f_exact, rel=1e-9)
    d, d_exact = _cagrad_d(j, w, c), _cagrad_d(j, exact, c)
    assert d @ d_exact / (np.linalg.norm(d) * np.linalg.norm(d_exact)) >= 0.999


@pytest.mark.parametrize(
    ("t", "seed", "conflict"), [(9, 62, True), (10, 63, False), (11, 68, False), (12, 61, False)]
)
def test_cagrad_iterative_dual_with_gradient_norms_1000x_apart(
    t: int, seed: int, conflict: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ill-conditioned Gram matrices (norms spread up to 1000x)."""
    j = _jacobian(t, seed=seed, spread=3.0, conflict=conflict)
    gram = j @ j.T
    for c in (0.4, 1.0):
        w, exact = cagrad_dual(gram, c), _exact_dual(gram, c, monkeypatch)
        assert _kkt_residual(j, exact, c) < 1e-6  # the 1e-10 ridge, relative to 1000x norms
        assert _cagrad_f(j, w, c) == pytest.approx(_cagrad_f(j, exact, c), rel=1e-9)
        d, d_exact = _cagrad_d(j, w, c), _cagrad_d(j, exact, c)
        assert d @ d_exact / (np.linalg.norm(d) * np.linalg.norm(d_exact)) >= 0.999


def test_cagrad_iterative_dual_ill_conditioned_case_stopped_by_its_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The projected gradient alone stops at its cap here (objective 6e-3 too high, direction
    cosine 0.9945); the active-set finish from its support reaches the exact minimiser."""
    j = _jacobian(11, seed=80, spread=3.0)
    gram = j @ j.T
    w, exact = cagrad_dual(gram, 1.0), _exact_dual(gram, 1.0, monkeypatch)
    assert _cagrad_f(j, w, 1.0) == pytest.approx(_cagrad_f(j, exact, 1.0), rel=1e-9)
    d, d_exact = _cagrad_d(j, w, 1.0), _cagrad_d(j, exact, 1.0)
    assert d @ d_exact / (np.linalg.norm(d) * np.linalg.norm(d_exact)) >= 0.999


def test_cagrad_dual_is_exact_up_to_eight_tasks() -> None:
    """Up to EXACT_MAX_TASKS tasks the dual is solved exactly, ill-conditioned or not: the
    optimality conditions hold up to the 1e-10 ridge (the iterative solver stops short of them
    in these cases, by 1e-4 and more)."""
    t = solvers.EXACT_MAX_TASKS
    for seed, c in ((145, 0.4), (145, 1.0), (108, 1.0)):
        j = _jacobian(t, seed=seed, spread=3.0)
        w = cagrad_dual(j @ j.T, c)
        _on_simplex(w)
        assert _kkt_residual(j, w, c) < 1e-5


def test_cagrad_dual_is_scale_free() -> None:
    """``F`` scales with the Gram matrix and the minimiser does not: tiny or huge gradients get
    the weights of unit ones."""
    j = _jacobian(4, seed=3, conflict=True)
    gram = j @ j.T
    w = cagrad_dual(gram, 0.5)
    for s in (1e-12, 1e-6, 1e6, 1e12):
        np.testing.assert_allclose(cagrad_dual(gram * s, 0.5), w, rtol=0, atol=1e-8)


def test_cagrad_dual_degenerate_inputs() -> None:
    """One task: weight 1. All gradients zero: ``F = 0`` everywhere, any point of the simplex
    (and no division by the zero scale: numpy warnings from mtlrec are errors here). ``c = 0``:
    ``F`` is linear, its minimiser the vertex of the task most opposed to the mean gradient."""
    np.testing.assert_array_equal(cagrad_dual(np.array([[4.0]]), 0.4), [1.0])
    _on_simplex(cagrad_dual(np.zeros((3, 3)), 0.4))
    for t in (3, 10):
        j = _jacobian(t, seed=t, conflict=True)
        w = cagrad_dual(j @ j.T, 0.0)
        vertex = np.zeros(t)
        vertex[int(np.argmin(j @ j.mean(axis=0)))] = 1.0
        np.testing.assert_array_equal(w, vertex)


def test_cagrad_dual_with_dependent_gradients() -> None:
    """Singular Gram matrices (more tasks than parameters, a duplicated task, opposite tasks):
    the dual is still minimised, no point of a dense sample of the simplex has a smaller F."""
    rng = np.random.default_rng(4)
    g, h = np.array([1.0, 0.3]), np.array([-0.2, 0.8])
    cases = [rng.normal(size=(4, 2)), np.stack([g, g, h]), np.stack([g, -0.5 * g, h])]
    for j in cases:
        t = j.shape[0]
        sample = np.vstack([rng.dirichlet(np.ones(t), 20000), np.eye(t)])
        g0 = j.mean(axis=0)
        for c in (0.4, 1.0):
            f_sample = sample @ j @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(sample @ j, axis=1)
            w = cagrad_dual(j @ j.T, c)
            _on_simplex(w)
            tol = 1e-9 * np.linalg.norm(g0) * np.abs(j).max()
            assert _cagrad_f(j, w, c) <= f_sample.min() + tol


def test_cagrad_update_is_the_best_direction_in_the_ball() -> None:
    """CAGrad's direction (before ``1 / (1 + c^2)`` and the factor T) maximises the worst task
    improvement ``min_t g_t . d`` over the ball ``||d - g0|| <= c ||g0||`` (c = 1 here)."""
    j = torch.tensor([[1.0, 0.2, 0.0], [-0.6, 1.0, 0.3], [0.1, -0.9, 1.0]], dtype=F64)
    s = build_weighting("cagrad", ("a", "b", "c"), {"c": 1.0})
    out = s.aggregate(j, s.weights(torch.ones(3, dtype=F64), j)).numpy()
    d = out / 3 * (1 + 1.0**2)
    jn = j.numpy()
    g0 = jn.mean(axis=0)
    assert np.linalg.norm(d - g0) == pytest.approx(np.linalg.norm(g0), rel=1e-9)  # on the sphere
    rng = np.random.default_rng(0)
    u = rng.normal(size=(20000, 3))
    ball = g0 + np.linalg.norm(g0) * u / np.linalg.norm(u, axis=1, keepdims=True)
    best_sampled = (ball @ jn.T).min(axis=1).max()
    assert (jn @ d).min() >= best_sampled - 1e-9
    assert (jn @ d).min() > (jn @ g0).min() + 0.05  # better than the plain mean here


def test_cagrad_iteration_cap_is_the_configured_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """``iterations`` caps the iterative dual solver (above 8 tasks): one iteration stops short
    of the minimum, the default reaches the exact solver's."""
    t = 10
    j = _jacobian(t, seed=5, conflict=True)
    names = [f"t{i}" for i in range(t)]
    gram = torch.from_numpy(j @ j.T)
    exact = _exact_dual(j @ j.T, 0.4, monkeypatch)
    one = build_weighting("cagrad", names, {"iterations": 1}).dual_weights(gram).numpy()
    full = build_weighting("cagrad", names, {}).dual_weights(gram).numpy()
    assert _cagrad_f(j, full, 0.4) == pytest.approx(_cagrad_f(j, exact, 0.4), rel=1e-9)
    f_exact = _cagrad_f(j, exact, 0.4)
    assert _cagrad_f(j, one, 0.4) > f_exact + 1e-6 * abs(f_exact)


# -- small solvers ------------------------------------------------------------------------------
def test_project_simplex_default_total_and_dtype() -> None:
    """Euclidean projection onto the probability simplex by default (``total = 1``), in the
    dtype of the input: (0.2, 0.9, -0.3) -> (0.15, 0.85, 0), by the KKT shift tau = 0.05."""
    v = torch.tensor([0.2, 0.9, -0.3], dtype=torch.float32)
    w = project_simplex(v)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([0.15, 0.85, 0.0]))
    w2 = project_simplex(torch.tensor([0.2, 0.9, -0.3], dtype=F64), 2.0)  # tau = -0.4
    torch.testing.assert_close(w2, torch.tensor([0.6, 1.3, 0.1], dtype=F64))


# -- DTP ----------------------------------------------------------------------------------------
def test_dtp_rejects_kinds_of_unknown_tasks() -> None:
    with pytest.raises(ConfigError, match=r"dtp kinds name unknown tasks \['zz'\]"):
        build_weighting("dtp", ("a", "b"), {"kinds": {"zz": "binary", "a": "binary"}})


def _dtp_weight(k: float, gamma: float) -> float:
    return -((1 - k) ** gamma) * math.log(k)  # Guo et al. 2018, eq. 7


def test_dtp_before_any_kpi_every_task_has_the_weight_of_kpi_one_half() -> None:
    """Until a KPI is observed each task has kappa = 0.5 (chance level of AUC or accuracy):
    equal, non-negligible weights."""
    s = build_weighting("dtp", ("a", "b", "c"), {"gamma": 2.0})
    want = _dtp_weight(0.5, 2.0)
    np.testing.assert_allclose(s.weights(torch.ones(3, dtype=F64)).numpy(), [want] * 3, rtol=1e-12)


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUC by counting pairs (ties 1/2)."""
    pos, neg = score[y > 0.5], score[y <= 0.5]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def test_dtp_infers_each_tasks_kind_and_its_kpi() -> None:
    """Without ``kinds``: ``[B, C]`` logits are multiclass (accuracy), 0/1 labels binary (AUC,
    also for a task scored by log-probabilities, ESMM's pCTCVR), other labels regression (R^2).
    The first KPI of a task is taken as is; the weights follow eq. 7 in float64."""
    ya = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    za = np.array([2.0, 0.5, -0.3, -1.0, 0.7, 1.2])
    yb = np.array([1.0, 2.5, 0.5, 3.0, 2.0, 4.0])
    zb = np.array([1.2, 2.0, 0.9, 2.5, 2.6, 3.5])
    yc = np.array([0.0, 2.0, 1.0, 1.0, 2.0, 0.0])
    zc = np.array([[2.0, 0, 0], [0, 0, 1], [0, 3, 0], [1, 0, 0], [0, 0, 2], [0, 1, 0]])
    yd = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    ld = np.log(np.array([0.1, 0.3, 0.05, 0.2, 0.4, 0.01]))
    t = torch.from_numpy
    out = ModelOutput({"a": t(za), "b": t(zb), "c": t(zc)}, log_probs={"d": t(ld)})
    labels = {"a": t(ya), "b": t(yb), "c": t(yc), "d": t(yd)}
    s = build_weighting("dtp", ("a", "b", "c", "d"), {"gamma": 1.5})
    s.observe(out, _batch(labels))
    r2 = 1 - ((zb - yb) ** 2).mean() / yb.var()
    acc = float((zc.argmax(axis=1) == yc).mean())  # 4 of 6
    kpi = [_auc(za, ya), r2, acc, _auc(ld, yd)]
    assert 0 < r2 < 1
    assert kpi[0] == pytest.approx(7 / 9) and kpi[3] == pytest.approx(7 / 9)
    np.testing.assert_allclose(s.kpi.numpy(), kpi, rtol=1e-12)
    got = s.weights(torch.ones(4, dtype=F64)).numpy()
    np.testing.assert_allclose(got, [_dtp_weight(k, 1.5) for k in kpi], rtol=1e-12)
    # the second batch is smoothed in: alpha k + (1 - alpha) kbar (alpha = 0.1)
    s.observe(
        ModelOutput({"a": -t(za), "b": t(zb), "c": t(zc)}, log_probs={"d": t(ld)}), _batch(labels)
    )
    kpi[0] = 0.1 * (1 - 7 / 9) + 0.9 * kpi[0]
    np.testing.assert_allclose(s.kpi.numpy(), kpi, rtol=1e-12)


# -- static weights -------------------------------------------------------------------------------
def test_static_weights_checks_and_defaults() -> None:
    with pytest.raises(
        ConfigError, match=r"static weights name unknown tasks \['zz'\]; tasks are \['a', 'b'\]"
    ):
        build_weighting("static", ("a", "b"), {"weights": {"zz": 1.0}})
    with pytest.raises(ConfigError, match=r"static weights must be >= 0, got \{'b': -0.5\}"):
        build_weighting("static", ("a", "b"), {"weights": {"a": 1.0, "b": -0.5}})
    s = build_weighting("static", ("a", "b", "c"), {"weights": {"a": 0.0, "c": 3.0}})
    torch.testing.assert_close(s.weights(torch.ones(3)), torch.tensor([0.0, 1.0, 3.0]))


# -- PE-LTR ---------------------------------------------------------------------------------------
def test_pe_ltr_two_tasks_match_the_closed_form_in_float64() -> None:
    """Two tasks: ``min ||w g1 + (1 - w) g2||^2`` has ``w* = (g2 - g1).g2 / ||g1 - g2||^2``,
    then ``w1 = clip(w*, c1, 1 - c2)``; exact to rounding with float64 gradients."""
    g1 = torch.tensor([1.0, 0.3, -0.2], dtype=F64)
    g2 = torch.tensor([-0.4, 0.9, 0.5], dtype=F64)
    star = float((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)))
    for bounds in ({"a": 0.1, "b": 0.2}, {"a": 0.45}, {"b": 0.75}):
        c1, c2 = bounds.get("a", 0.0), bounds.get("b", 0.0)
        s = build_weighting("pe_ltr", ("a", "b"), {"bounds": bounds})
        w = s.shared_weights(torch.ones(2, dtype=F64), torch.stack([g1, g2]))
        w1 = min(max(star, c1), 1 - c2)
        np.testing.assert_allclose(w.numpy(), [w1, 1 - w1], rtol=0, atol=1e-12)
    assert 0.45 < star < 0.8  # inside the first two bounds' intervals


def test_pe_ltr_falls_back_to_an_equal_share_when_the_solve_fails() -> None:
    """Gradients whose Gram matrix overflows: the weights are the bounds plus an equal share of
    the free mass, still finite, meeting the bounds and summing to 1."""
    s = build_weighting("pe_ltr", ("a", "b", "c"), {"bounds": {"a": 0.1}})
    j = torch.tensor([[1e200, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    w = s.shared_weights(torch.ones(3, dtype=F64), j)
    np.testing.assert_allclose(w.numpy(), [0.4, 0.3, 0.3], rtol=0, atol=1e-15)


# -- IMTL -----------------------------------------------------------------------------------------
def test_imtl_single_present_task_gets_its_own_gradient() -> None:
    s = build_weighting("imtl", ("a", "b", "c"))
    j = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    s.begin_step(torch.tensor([False, True, False]))
    torch.testing.assert_close(s.aggregate(j, s.weights(torch.ones(3), j)), j[1])


# -- DWA ------------------------------------------------------------------------------------------
def _dwa_weights(prev: np.ndarray, last: np.ndarray, temp: float) -> np.ndarray:
    r = last / prev  # Liu et al. 2019, eq. 4
    e = np.exp(r / temp)
    return r.size * e / e.sum()


def test_dwa_windows_of_different_lengths_and_an_absent_task() -> None:
    """Each window's average is over its own steps (1 step, then 3); a window in which a task
    never had a row leaves that task's last two averages as they were."""
    s = build_weighting("dwa", ("a", "b"), {"temperature": 2.0})
    s.on_step_end(torch.tensor([1.0, 4.0], dtype=F64))
    s.on_epoch_end(0)
    for loss in ([0.5, 2.0], [0.7, 3.0], [0.9, 1.0]):
        s.on_step_end(torch.tensor(loss, dtype=F64))
    s.on_epoch_end(1)
    want = _dwa_weights(np.array([1.0, 4.0]), np.array([0.7, 2.0]), 2.0)
    np.testing.assert_allclose(s.weights(torch.ones(2, dtype=F64)).numpy(), want, rtol=1e-12)
    s.begin_step(torch.tensor([True, False]))  # b has no row in the whole epoch
    s.on_step_end(torch.tensor([0.42, 0.0], dtype=F64))
    s.on_step_end(torch.tensor([0.42, 0.0], dtype=F64))
    s.on_epoch_end(2)
    s.begin_step(None)
    want = _dwa_weights(np.array([0.7, 4.0]), np.array([0.42, 2.0]), 2.0)
    np.testing.assert_allclose(s.weights(torch.ones(2, dtype=F64)).numpy(), want, rtol=1e-12)


def test_dwa_sums_many_small_losses_in_float64() -> None:
    """Windows of 2000 steps: the averages are exact float64 means of the logged losses, so
    the weights match a float64 computation (float32 sums drift by ~1e-6 here)."""
    rng = np.random.default_rng(0)
    n = 2000
    losses = (0.1 + 0.05 * rng.random((3 * n, 2))).astype(np.float32)
    s = build_weighting("dwa", ("a", "b"), {"unit": "steps", "window": n, "temperature": 0.5})
    for row in torch.from_numpy(losses):
        s.on_step_end(row)
    means = losses.astype(np.float64).reshape(3, n, 2).mean(axis=1)
    want = _dwa_weights(means[1], means[2], 0.5)
    np.testing.assert_allclose(s.weights(torch.ones(2, dtype=F64)).numpy(), want, rtol=1e-12)


def _dwa_state(**kw: object) -> dict:
    state = {
        "loss_sum": torch.zeros(2, dtype=F64),
        "count": torch.zeros(2, dtype=torch.int64),
        "units": torch.zeros((), dtype=torch.int64),
        "history": torch.zeros(2, 2, dtype=F64),
        "windows": torch.zeros((), dtype=torch.int64),
        "recorded": torch.zeros(2, dtype=torch.int64),
    }
    state.update(kw)  # type: ignore[arg-type]
    return state


def test_dwa_step_counter_past_2_pow_24_restored_from_a_checkpoint() -> None:
    """A streaming run resumed after 2^24 - 1 steps (windows of 3 steps) keeps closing its
    windows every 3 steps."""
    s = build_weighting("dwa", ("a", "b"), {"unit": "steps", "window": 3})
    s.load_state_dict(_dwa_state(units=torch.tensor(BIG - 1)))  # a multiple of 3
    for loss in ([1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [0.5, 1.8], [0.5, 1.8], [0.5, 1.8]):
        s.on_step_end(torch.tensor(loss, dtype=F64))
    want = _dwa_weights(np.array([1.0, 2.0]), np.array([0.5, 1.8]), 2.0)
    np.testing.assert_allclose(s.weights(torch.ones(2, dtype=F64)).numpy(), want, rtol=1e-6)


def test_dwa_window_longer_than_2_pow_24_steps_restored_from_a_checkpoint() -> None:
    """A window (an epoch) resumed after 2^24 steps still averages over all its steps; task b
    has no row in the steps after the restart."""
    s = build_weighting("dwa", ("a", "b"))
    state = _dwa_state(
        loss_sum=torch.tensor([0.5 * BIG, 0.4 * BIG], dtype=F64),
        count=torch.tensor([BIG, BIG]),
        history=torch.tensor([[0.0, 0.0], [1.0, 0.5]], dtype=F64),
        windows=torch.tensor(1),
        recorded=torch.tensor([1, 1]),
    )
    s.load_state_dict(state)
    s.begin_step(torch.tensor([True, False]))
    for _ in range(500):
        s.on_step_end(torch.tensor([0.5, 0.0], dtype=F64))
    s.on_epoch_end(0)
    s.begin_step(None)
    want = _dwa_weights(np.array([1.0, 0.5]), np.array([0.5, 0.4]), 2.0)
    np.testing.assert_allclose(s.weights(torch.ones(2, dtype=F64)).numpy(), want, rtol=1e-12)


def test_dwa_legacy_checkpoint_after_one_window() -> None:
    """A checkpoint of the version with one step count for all tasks and no per-task window
    counts, written after one window: the next window gives the DWA weights (two windows)."""
    s = build_weighting("dwa", ("a", "b"))
    legacy = _dwa_state(
        count=torch.tensor(0),
        units=torch.tensor(1),
        history=torch.tensor([[0.0, 0.0], [2.0, 1.0]], dtype=F64),
        windows=torch.tensor(1),
    )
    del legacy["recorded"]
    s.load_state_dict(legacy)
    s.on_step_end(torch.tensor([1.0, 0.9], dtype=F64))
    s.on_epoch_end(1)
    want = _dwa_weights(np.array([2.0, 1.0]), np.array([1.0, 0.9]), 2.0)
    np.testing.assert_allclose(s.weights(torch.ones(2, dtype=F64)).numpy(), want, rtol=1e-12)


def test_a_checkpoint_missing_a_buffer_is_reported_by_name() -> None:
    """The legacy-state hook leaves missing keys to ``load_state_dict``'s own report."""
    s = build_weighting("dwa", ("a", "b"))
    state = _dwa_state()
    del state["count"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "count"'):
        s.load_state_dict(state)


# -- log-loss, FAMO -------------------------------------------------------------------------------
def test_log_loss_adds_eps() -> None:
    s = build_weighting("log_loss", ("a", "b"), {"eps": 0.5})
    torch.testing.assert_close(s.weights(torch.tensor([0.5, 1.5])), torch.tensor([1.0, 0.5]))


def test_famo_weights_add_eps_to_the_losses() -> None:
    """Equal logits: ``w_t = T (1 / (L_t + eps)) / sum_j 1 / (L_j + eps)``."""
    s = build_weighting("famo", ("a", "b"), {"eps": 0.5})
    torch.testing.assert_close(s.weights(torch.tensor([1.0, 3.0])), torch.tensor([1.4, 0.6]))


# -- alternating training -------------------------------------------------------------------------
def _schedule(s: nn.Module, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        out.append(s.active())  # type: ignore[operator]
        s.on_step_end(torch.zeros(s.num_tasks))  # type: ignore[operator]
    return out


def test_alternating_random_order_is_seeded_not_global() -> None:
    """The random order depends on the seed only (not on torch's global generator), so a
    resumed run draws the same tasks."""
    names = ("a", "b", "c", "d")
    torch.manual_seed(1)
    first = _schedule(build_weighting("alternating", names, {"order": "random", "seed": 5}), 40)
    torch.manual_seed(2)
    again = _schedule(build_weighting("alternating", names, {"order": "random", "seed": 5}), 40)
    assert first == again
    assert set(first) == {0, 1, 2, 3}
    resumed = build_weighting("alternating", names, {"order": "random", "seed": 5})
    resumed.load_state_dict({"step": torch.tensor(25)})
    torch.manual_seed(3)
    assert _schedule(resumed, 15) == first[25:]


def test_alternating_step_without_any_present_task_still_names_a_task() -> None:
    """A step where no task has a row (the per-task optimisers still ask which one steps):
    the schedule over all tasks."""
    s = build_weighting("alternating", ("a", "b", "c"))
    s.begin_step(torch.zeros(3, dtype=torch.bool))
    assert _schedule(s, 4) == [0, 1, 2, 0]


def test_alternating_schedule_continues_past_2_pow_24_steps() -> None:
    s = build_weighting("alternating", ("a", "b"))
    s.load_state_dict({"step": torch.tensor(BIG)})
    assert _schedule(s, 4) == [0, 1, 0, 1]


# -- PCGrad ---------------------------------------------------------------------------------------
def test_pcgrad_single_task_is_its_gradient() -> None:
    s = build_weighting("pcgrad", ("a",))
    j = torch.tensor([[1.0, -2.0, 0.5]])
    torch.testing.assert_close(s.aggregate(j, torch.ones(1)), j[0])


def test_pcgrad_skips_an_absent_first_task() -> None:
    """Task a absent: the update is PCGrad over b and c alone (each projected off the other
    where they conflict)."""
    s = build_weighting("pcgrad", ("a", "b", "c"))
    gb, gc = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    j = torch.stack([torch.tensor([5.0, 5.0]), gb, gc])
    s.begin_step(torch.tensor([False, True, True]))
    pb = gb - (gb @ gc) / (gc @ gc) * gc
    pc = gc - (gc @ gb) / (gb @ gb) * gb
    torch.testing.assert_close(s.aggregate(j, torch.tensor([0.0, 1.0, 1.0])), pb + pc)


def test_pcgrad_orders_keep_changing_past_2_pow_24_steps() -> None:
    """The visiting orders are drawn anew every step, also in a run resumed after 2^24."""
    s = build_weighting("pcgrad", tuple("abcde"))
    s.load_state_dict({"step": torch.tensor(BIG)})
    seen = []
    for _ in range(4):
        seen.append(s.orders())
        s.on_step_end(torch.zeros(5))
    assert all(a != b for a, b in itertools.pairwise(seen))


# -- GradNorm's shared layer -----------------------------------------------------------------------
class _TwoTowers(nn.Module):
    """A minimal model: an embedding table and two shared dense layers, one tower per task."""

    def __init__(self, last: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(4, 2)
        self.experts = nn.Linear(2, 3)
        self.mix = nn.Linear(3, 3)
        self.towers = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 1)])
        self.last = last

    def embedding_parameters(self) -> list[nn.Parameter]:
        return list(self.emb.parameters())

    def shared_parameters(self) -> list[nn.Parameter]:
        own = {id(p) for p in self.towers.parameters()}
        return [p for p in self.parameters() if id(p) not in own]

    def last_shared_layer(self) -> nn.Parameter | None:
        return self.mix.weight if self.last else None


def test_gradnorm_layer_choices() -> None:
    model = _TwoTowers(last=True)
    dense = [model.experts.weight, model.experts.bias, model.mix.weight, model.mix.bias]

    def chosen(params: dict) -> list[int]:
        s = build_weighting("gradnorm", ("a", "b"), params)
        return [id(p) for p in s.grad_parameters(model)]  # type: ignore[arg-type]

    assert chosen({"layer": "all"}) == [id(p) for p in dense]
    with_emb = [model.emb.weight, *dense]
    assert chosen({"layer": "all", "include_embeddings": True}) == [id(p) for p in with_emb]
    assert chosen({"layer": "experts."}) == [id(model.experts.weight), id(model.experts.bias)]
    assert chosen({}) == [id(model.mix.weight)]
    msg = (
        r"gradnorm: model _TwoTowers declares no shared layer that every task's loss reaches; "
        r"use layer: all, a parameter-name prefix, or a loss-based strategy"
    )
    with pytest.raises(ConfigError, match=msg):
        build_weighting("gradnorm", ("a", "b")).grad_parameters(_TwoTowers(last=False))  # type: ignore[arg-type]


def test_gradnorm_without_gradients_says_so() -> None:
    s = build_weighting("gradnorm", ("a", "b"))
    with pytest.raises(ValueError, match=r"^gradnorm needs the per-task gradients$"):
        s.weights(torch.ones(2))


# -- logs ------------------------------------------------------------------------------------------
def test_describe_names_each_weight() -> None:
    s = build_weighting("static", ("ctr", "cvr"))
    assert s.describe(torch.tensor([0.25, 2.0])) == {"ctr": 0.25, "cvr": 2.0}
    with pytest.raises(ValueError):  # a weight vector of another length is a caller's bug
        s.describe(torch.tensor([0.25, 2.0, 1.0]))


# -- MGDA and its min-norm solver -----------------------------------------------------------------
def _two_task_min_norm(u1: torch.Tensor, u2: torch.Tensor) -> float:
    """Sener & Koltun 2018, Algorithm 1: weight of u1 in the min-norm point of [u1, u2]."""
    return min(max(float((u2 - u1) @ u2 / ((u1 - u2) @ (u1 - u2))), 0.0), 1.0)


def test_mgda_normalisations_of_small_gradients_and_losses() -> None:
    """Gradient norms and losses below 1: 'l2' divides by ||g_t||, 'loss' by L_t (the weights
    solved on the normalised gradients multiply the raw ones)."""
    g1 = torch.tensor([0.06, 0.08, 0.0], dtype=F64)  # norm 0.1
    g2 = torch.tensor([0.0, 0.12, 0.16], dtype=F64)  # norm 0.2
    j, losses = torch.stack([g1, g2]), torch.tensor([0.2, 0.5], dtype=F64)
    l2 = build_weighting("mgda", ("a", "b"), {"normalization": "l2"})
    np.testing.assert_allclose(l2.shared_weights(losses, j).numpy(), [0.5, 0.5], atol=1e-12)
    loss = build_weighting("mgda", ("a", "b"), {"normalization": "loss"})
    a = _two_task_min_norm(g1 / 0.2, g2 / 0.5)
    np.testing.assert_allclose(loss.shared_weights(losses, j).numpy(), [a, 1 - a], atol=1e-12)
    both = build_weighting("mgda", ("a", "b"), {"normalization": "loss+"})
    a = _two_task_min_norm(g1 / (0.2 * 0.1), g2 / (0.5 * 0.2))
    np.testing.assert_allclose(both.shared_weights(losses, j).numpy(), [a, 1 - a], atol=1e-12)


def test_mgda_scale_num_tasks_sums_to_the_number_of_tasks() -> None:
    j = torch.tensor([[1.0, 0.0, 0.2, 0.1, 0.0], [0.0, 1.0, 0.0, 0.3, 0.1]], dtype=F64)
    s = build_weighting("mgda", ("a", "b"), {"scale": "num_tasks"})
    a = _two_task_min_norm(j[0], j[1])
    np.testing.assert_allclose(s.shared_weights(torch.ones(2), j).numpy(), [2 * a, 2 - 2 * a])


def test_min_norm_weights_degenerate_cases_in_the_gram_dtype() -> None:
    """One task: weight 1. Two equal gradients: every split is a min-norm point, the solver
    takes the middle. Three zero gradients: a point of the simplex (no division by the zero
    largest eigenvalue). The weights come in the Gram matrix's dtype."""
    from mtlrec.weighting._solvers import min_norm_weights

    for dtype in (torch.float32, F64):
        one = min_norm_weights(torch.tensor([[2.0]], dtype=dtype))
        assert one.dtype == dtype and one.tolist() == [1.0]
        g = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=dtype)
        two = min_norm_weights(g @ g.T)
        assert two.dtype == dtype and two.tolist() == [0.5, 0.5]
        zero = min_norm_weights(torch.zeros(3, 3, dtype=dtype))
        assert zero.dtype == dtype
        zero = zero.double().numpy()
        assert zero.min() >= 0 and zero.sum() == pytest.approx(1.0, abs=1e-6)
        j = torch.from_numpy(_jacobian(4, seed=1)).to(dtype)
        assert min_norm_weights(j @ j.T).dtype == dtype


def _min_norm_kkt(gram: np.ndarray, w: np.ndarray) -> float:
    """Optimality of ``w`` for ``min w^T G w`` on the simplex: ``(G w)_t = w^T G w`` on the
    support and ``>=`` elsewhere; relative to the largest diagonal entry."""
    gw, value = gram @ w, float(w @ gram @ w)
    on = w > 0
    worst = max(np.abs(gw[on] - value).max(), (value - gw[~on]).max(initial=0.0))
    return worst / float(np.diag(gram).max())


def test_min_norm_weights_are_exact_at_any_scale() -> None:
    """The min-norm point of 3-6 gradients, norms up to 1000x apart, tiny or large: on the
    simplex and exact (the optimality conditions hold to rounding)."""
    from mtlrec.weighting._solvers import min_norm_weights

    for seed in (0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11):  # 7: the polish stops 1.4e-6 short
        t = 3 + seed % 4
        j = _jacobian(t, seed=200 + seed, spread=3.0 * (seed % 2), conflict=seed % 3 == 0)
        for s in (1e-4, 1.0, 1e3):
            gram = (s * j) @ (s * j).T
            w = min_norm_weights(torch.from_numpy(gram)).numpy()
            _on_simplex(w)
            assert _min_norm_kkt(gram, w) < 1e-12


def test_frank_wolfe_stays_on_the_simplex() -> None:
    """Each Frank-Wolfe step moves along the segment to a vertex (gamma in [0, 1]), so every
    iterate, and the result without polishing, is a point of the simplex; equal gradients
    included."""
    from mtlrec.weighting._solvers import frank_wolfe_min_norm, min_norm_weights

    same = np.ones((3, 3))
    for it in (1, 2, 250):
        _on_simplex(frank_wolfe_min_norm(same, max_iter=it))
    _on_simplex(min_norm_weights(torch.from_numpy(same), polish=False).numpy())
    for seed in range(10):
        j = _jacobian(3 + seed % 3, seed=300 + seed, spread=1.0, conflict=True)
        for it in (1, 2, 3, 250):
            _on_simplex(frank_wolfe_min_norm(j @ j.T, max_iter=it))


def test_project_simplex_np_default_total_and_zero_total() -> None:
    from mtlrec.weighting._solvers import project_simplex_np

    v = np.array([0.2, 0.9, -0.3])
    np.testing.assert_allclose(project_simplex_np(v), [0.15, 0.85, 0.0], atol=1e-15)
    np.testing.assert_array_equal(project_simplex_np(v, 0.0), [0.0, 0.0, 0.0])


def test_pe_ltr_rejects_bounds_of_unknown_tasks() -> None:
    with pytest.raises(ConfigError, match=r"pe_ltr bounds name unknown tasks \['zz'\]"):
        build_weighting("pe_ltr", ("a", "b"), {"bounds": {"zz": 0.1, "a": 0.2}})


def test_pe_ltr_bounds_summing_to_one_are_the_weights() -> None:
    """Bounds that use the whole mass leave nothing free: the weights are the bounds."""
    s = build_weighting("pe_ltr", ("a", "b", "c"), {"bounds": {"a": 0.5, "b": 0.25, "c": 0.25}})
    j = torch.from_numpy(_jacobian(3, seed=2))
    w = s.shared_weights(torch.ones(3, dtype=F64), j)
    np.testing.assert_allclose(w.numpy(), [0.5, 0.25, 0.25], atol=1e-15)


# -- configuration, shared parameters, regularisers -----------------------------------------------
def test_uncertainty_rejects_forms_of_unknown_tasks() -> None:
    with pytest.raises(
        ConfigError, match=r"uncertainty forms name unknown tasks \['zz'\]; tasks are \['a', 'b'\]"
    ):
        build_weighting("uncertainty", ("a", "b"), {"forms": {"zz": "regression"}})


def test_gradient_strategies_take_the_shared_dense_parameters() -> None:
    """By default the per-task gradients are of the shared parameters without the embedding
    tables; ``include_embeddings`` adds them."""
    model = _TwoTowers(last=True)
    dense = [model.experts.weight, model.experts.bias, model.mix.weight, model.mix.bias]
    for name in ("imtl", "mgda", "pcgrad", "cagrad"):
        plain = build_weighting(name, ("a", "b")).grad_parameters(model)  # type: ignore[arg-type]
        assert [id(p) for p in plain] == [id(p) for p in dense]
        full = build_weighting(name, ("a", "b"), {"include_embeddings": True})
        got = full.grad_parameters(model)  # type: ignore[arg-type]
        assert [id(p) for p in got] == [id(p) for p in [model.emb.weight, *dense]]


def test_gradnorm_has_no_regulariser_before_its_first_weights() -> None:
    s = build_weighting("gradnorm", ("a", "b"))
    assert s.regularizer(torch.ones(2)) is None
    torch.testing.assert_close(s.objective(torch.ones(2), torch.ones(2)), torch.tensor(2.0))


def test_shared_update_without_any_present_task_is_zero() -> None:
    j = torch.from_numpy(_jacobian(3, seed=9))
    for name in ("imtl", "mgda", "pe_ltr"):
        s = build_weighting(name, ("a", "b", "c"))
        s.weights(torch.ones(3, dtype=F64), j)
        s.begin_step(torch.zeros(3, dtype=torch.bool))
        torch.testing.assert_close(s.aggregate(j, torch.ones(3)), torch.zeros(30, dtype=F64))


@pytest.mark.parametrize("seed", range(8))
def test_cagrad_iterative_dual_on_random_ill_conditioned_cases(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """9 to 11 tasks, norms spread up to 1000x, with and without conflict: the objective equals
    the exact solver's (relative 1e-9 of its magnitude) and so does the direction."""
    for conflict in (False, True):
        j = _jacobian(9 + seed % 3, seed=1000 + seed, spread=3.0, conflict=conflict)
        gram = j @ j.T
        for c in (0.4, 1.0):
            w, exact = cagrad_dual(gram, c), _exact_dual(gram, c, monkeypatch)
            f, f_exact = _cagrad_f(j, w, c), _cagrad_f(j, exact, c)
            assert f - f_exact <= 1e-9 * abs(f_exact)
            d, d_exact = _cagrad_d(j, w, c), _cagrad_d(j, exact, c)
            assert d @ d_exact / (np.linalg.norm(d) * np.linalg.norm(d_exact)) >= 0.999


@pytest.mark.parametrize("seed", [0, 2, 4, 5])  # minimisers on faces of 3 to 6 tasks
def test_cagrad_active_set_finish_adds_the_tasks_a_start_left_out(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a start whose support misses tasks of the minimiser's (a vertex of the minimiser's
    support), the active-set finish adds them back one by one and reaches the exact minimiser;
    a start that already is the minimiser is kept."""
    j = _jacobian(10, seed=2000 + seed, spread=1.0, conflict=bool(seed % 2))
    gram = j @ j.T
    exact = _exact_dual(gram, 0.5, monkeypatch)
    g = gram / float(np.max(np.diag(gram))) + 1e-10 * np.eye(10)
    b = g.mean(axis=1)
    r = 0.5 * float(np.sqrt(b.mean()))
    support = np.flatnonzero(exact > 1e-12)
    assert support.size >= 3  # a real face to grow back to
    start = np.zeros(10)
    start[support[np.argmax(exact[support])]] = 1.0
    got = solvers._active_set_polish(g, b, r, start)
    assert np.abs(got - exact).max() < 1e-9
    assert np.abs(solvers._active_set_polish(g, b, r, got) - got).max() < 1e-12
