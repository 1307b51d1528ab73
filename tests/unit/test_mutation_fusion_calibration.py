"""Tests that kill the mutants of ``mtlrec.fusion.calibration`` the rest of the suite let live
(``python benchmarks/mutation.py fusion``), each against an analytic value or an independent
computation: the down-sampling correction (He et al. 2014) in float64, Platt scaling (the
first-order optimality condition of the penalised cross-entropy to Platt's targets, the closed
form for a constant score, float64 logits, inputs where full Newton steps run away, the slope's
bound, against scipy's bounded L-BFGS-B; the Armijo line search, its failure, the first trial,
the Newton-decrement stop on constant scores of many rows, the step count on hard data, the
start at Platt's prior, the input checks), pool-adjacent-violators (hand-pooled
examples, empty and one-row inputs, float64 end points), and ``Calibration``: applying each
method by its formula, fitting after the correction, keeping the method and the rate, labels
given as strings, validation messages and the JSON round trip."""

from __future__ import annotations

import re

import numpy as np
import pytest
from pydantic import ValidationError

from mtlrec.errors import DataError
from mtlrec.fusion.calibration import (
    Calibration,
    downsample_correction,
    fit_isotonic,
    fit_platt,
)

L2 = 1e-6  # the ridge fit_platt adds to the cross-entropy: 0.5 * L2 * ||(a, b)||^2


def _platt_targets(y: np.ndarray) -> np.ndarray:
    """Platt (1999): (N+ + 1) / (N+ + 2) for a positive, 1 / (N- + 2) for a negative."""
    pos, neg = float((y == 1).sum()), float((y == 0).sum())
    return np.where(y == 1, (pos + 1) / (pos + 2), 1 / (neg + 2))


def _corrected(p: np.ndarray, r: float) -> np.ndarray:
    """He et al. 2014, Section 6.2: ``q = p / (p + (1 - p) / r)``, in float64."""
    p = np.asarray(p, dtype=np.float64)
    return p / (p + (1.0 - p) / r)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1.0 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# -- down-sampling correction ----------------------------------------------------------------
def test_downsample_correction_computes_in_float64() -> None:
    # float32 scores must not keep float32 rounding: 0.5 at r = 0.1 is exactly 1/11
    p = np.array([0.5, 0.2, 0.9], dtype=np.float32)
    out = downsample_correction(p, 0.1)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out[0], 1.0 / 11.0, rtol=1e-15)
    np.testing.assert_allclose(out, _corrected(p.astype(np.float64), 0.1), rtol=1e-15)


# -- Platt scaling ---------------------------------------------------------------------------
def _penalised_gradient(p: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Gradient of ``sum CE(t, sigmoid(a z + b)) + L2/2 (a^2 + b^2)``, ``z = logit p``, ``t``
    Platt's targets of ``y``."""
    z = _logit(p)
    r = _sigmoid(a * z + b) - _platt_targets(y)
    return np.array([r @ z + L2 * a, r.sum() + L2 * b])


def _platt_data(lo: float, hi: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = np.linspace(lo, hi, n)
    y = (rng.random(n) < p).astype(np.float64)
    return p, y


@pytest.mark.parametrize(
    ("lo", "hi", "seed"),
    [
        (0.55, 0.75, 0),  # narrow score range: nearly collinear columns, small curvature
        (0.9, 0.995, 1),  # confident scores: q (1 - q) small, a wrong Hessian slows Newton
        (0.05, 0.95, 2),
    ],
)
def test_fit_platt_solves_the_penalised_log_loss(lo: float, hi: float, seed: int) -> None:
    # Newton's method must stop at a stationary point of the documented objective (the
    # cross-entropy to Platt's targets plus the tiny ridge); a flipped ridge leaves 2e-6 * theta
    p, y = _platt_data(lo, hi, 24, seed)
    a, b = fit_platt(p, y)
    assert a > 1e-3  # inside the constraint a > 0, so the unconstrained condition holds
    grad = _penalised_gradient(p, y, a, b)
    assert np.abs(grad).max() < 1e-9 * max(1.0, abs(a), abs(b))


def test_fit_platt_closed_form_for_a_constant_score() -> None:
    # a constant score z0 only identifies a z0 + b = logit(mean t); the ridge picks the
    # shortest (a, b) on that line: (a, b) = L / (z0^2 + 1) * (z0, 1), L = logit(mean t).
    # 3 positives and 2 negatives: targets 4/5 and 1/4, mean t = (3 * 0.8 + 2 * 0.25) / 5
    p = np.full(5, 0.7)
    y = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    z0 = _logit(np.array(0.7))
    big_l = _logit(np.array(0.58))
    a, b = fit_platt(p, y)
    assert a == pytest.approx(big_l * z0 / (z0**2 + 1), rel=1e-4)
    assert b == pytest.approx(big_l / (z0**2 + 1), rel=1e-4)
    assert _sigmoid(a * z0 + b) == pytest.approx(0.58, rel=1e-5)


def test_fit_platt_uses_float64_logits_for_float32_scores() -> None:
    # the logits of float32 scores are taken in float64: the same fit as the widened scores
    p, y = _platt_data(0.05, 0.95, 24, 2)
    p32 = p.astype(np.float32)
    a32, b32 = fit_platt(p32, y)
    a64, b64 = fit_platt(p32.astype(np.float64), y)
    assert a32 == pytest.approx(a64, rel=1e-12)
    assert b32 == pytest.approx(b64, rel=1e-12, abs=1e-12)


def _scipy_platt(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The same objective minimised by scipy's L-BFGS-B with the bound a >= 1e-6."""
    from scipy.optimize import minimize

    z, t = _logit(np.clip(p, 1e-7, 1 - 1e-7)), _platt_targets(y)

    def objective(th: np.ndarray) -> float:
        s = th[0] * z + th[1]
        ce = t * np.logaddexp(0.0, -s) + (1 - t) * np.logaddexp(0.0, s)
        return float(ce.sum() + 0.5 * L2 * th @ th)

    options = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000}
    bounds = [(1e-6, None), (None, None)]
    return minimize(objective, [1.0, 0.0], method="L-BFGS-B", bounds=bounds, options=options).x


@pytest.mark.parametrize(
    ("p", "y"),
    [
        # not separable, and a full Newton step from (1, 0) lands where q (1 - q) is 0: plain
        # Newton returned a = 6.4e6, b = 1e6 here (the line search keeps it on the optimum)
        ([0.7027, 0.9438, 0.1268, 0.8648, 0.0595], [1, 1, 1, 0, 0]),
        ([0.0002, 0.0], [1, 0]),  # plain Newton: a = 1.5e7, b = -1e6
        ([0.2, 0.9, 0.9, 0.4, 0.99], [0, 1, 1, 0, 1]),  # separable: finite thanks to the targets
        ([0.5, 0.01], [0, 1]),  # ranked the wrong way round: a on its bound, b refitted
    ],
)
def test_fit_platt_converges_where_full_newton_steps_run_away(p: list, y: list) -> None:
    p_, y_ = np.array(p), np.array(y, dtype=np.float64)
    a, b = fit_platt(p_, y_)
    ref = _scipy_platt(p_, y_)
    assert a == pytest.approx(ref[0], rel=1e-4, abs=1e-9)
    assert b == pytest.approx(ref[1], rel=1e-4, abs=1e-6)


# -- isotonic regression ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("p", "y", "x_ref", "v_ref"),
    [
        # 0.2 -> 0.3 decreases (1 > 0): pooled to 1/2; 0.1 stays its own block
        ([0.1, 0.2, 0.3], [0, 1, 0], [0.1, 0.1, 0.2, 0.3], [0, 0, 0.5, 0.5]),
        # already non-decreasing (ties in the means are not violators): nothing is pooled
        ([0.1, 0.2, 0.3], [0, 0, 1], [0.1, 0.1, 0.2, 0.2, 0.3, 0.3], [0, 0, 0, 0, 1, 1]),
        # rows of one p are pooled first (means 1/2, 1, 0), then 0.4 -> 0.6 to 1/3, which
        # makes 0.2 -> [0.4, 0.6] a violator in turn: one block of mean 2/5
        ([0.2, 0.2, 0.4, 0.6, 0.6], [0, 1, 1, 0, 0], [0.2, 0.6], [0.4, 0.4]),
        # a single row: the constant fit equal to its label
        ([0.3], [1], [0.3, 0.3], [1, 1]),
    ],
)
def test_fit_isotonic_pools_by_hand(p: list, y: list, x_ref: list, v_ref: list) -> None:
    x, v = fit_isotonic(np.array(p), np.array(y, dtype=np.float64))
    np.testing.assert_allclose(x, x_ref, rtol=1e-15)
    np.testing.assert_allclose(v, v_ref, rtol=1e-15)


def test_fit_isotonic_without_rows_is_the_identity_map() -> None:
    # no data: calibration must leave every probability as it is (end points (0, 0), (1, 1))
    x, v = fit_isotonic(np.array([]), np.array([]))
    grid = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(np.interp(grid, x, v), grid, rtol=1e-15)
    assert x.shape == v.shape == (2,)
    cal = Calibration.fit(np.array([]), np.array([]), "isotonic")
    np.testing.assert_allclose(cal(grid), grid, rtol=1e-15)


def _pav_reference(p: np.ndarray, y: np.ndarray) -> dict[float, float]:
    """Sequential pool-adjacent-violators (Ayer et al. 1955) over the distinct ``p``, one
    stack of blocks ``[sum y, rows, distinct values]``: the fitted value at each distinct p."""
    blocks: list[list] = []
    for u in np.unique(p):
        blocks.append([float(y[p == u].sum()), float((p == u).sum()), [float(u)]])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n, us = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
            blocks[-1][2] += us
    return {u: s / n for s, n, us in blocks for u in us}


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_fit_isotonic_matches_a_sequential_pav(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = np.round(rng.random(40), 1)  # ties in p
    y = (rng.random(40) < 0.5).astype(np.float64)
    x, v = fit_isotonic(p, y)
    ref = _pav_reference(p, y)
    uniq = np.array(sorted(ref))
    np.testing.assert_allclose(np.interp(uniq, x, v), [ref[u] for u in uniq], rtol=1e-12)
    # below the smallest and above the largest score the end values are kept
    np.testing.assert_allclose(np.interp([-1.0, 2.0], x, v), [ref[uniq[0]], ref[uniq[-1]]])


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_fit_isotonic_returns_float64_end_points(dtype: type) -> None:
    p = np.array([0, 1, 1, 0, 1], dtype=dtype)
    y = np.array([0.0, 1.0, 0.0, 1.0, 1.0])
    x, v = fit_isotonic(p, y)
    assert x.dtype == np.float64
    assert v.dtype == np.float64
    np.testing.assert_allclose(x, [0, 0, 1, 1])
    np.testing.assert_allclose(v, [0.5, 0.5, 2 / 3, 2 / 3])


# -- Calibration -----------------------------------------------------------------------------
P = np.array([0.02, 0.2, 0.5, 0.7, 0.97])


@pytest.mark.parametrize("rate", [None, 0.25])
def test_platt_calibration_applies_its_formula(rate: float | None) -> None:
    cal = Calibration(downsample_rate=rate, method="platt", a=1.7, b=-0.4)
    q = P if rate is None else _corrected(P, rate)
    np.testing.assert_allclose(cal(P), _sigmoid(1.7 * _logit(q) - 0.4), rtol=1e-12)


@pytest.mark.parametrize("rate", [None, 0.5])
def test_isotonic_calibration_interpolates_its_points(rate: float | None) -> None:
    # linear interpolation between (0.2, 0.1), (0.4, 0.1), (0.6, 0.7); clipped outside
    cal = Calibration(downsample_rate=rate, method="isotonic", x=[0.2, 0.4, 0.6], y=[0.1, 0.1, 0.7])
    q = np.array([0.0, 0.3, 0.5, 0.9])
    p = q if rate is None else q / (q + (1 - q) * rate)  # so that the correction gives q back
    np.testing.assert_allclose(cal(p), [0.1, 0.1, 0.4, 0.7], rtol=1e-12)


def test_no_calibration_is_the_identity_in_float64() -> None:
    p32 = np.array([0.1, 0.5, 0.9], dtype=np.float32)
    out = Calibration()(p32)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, p32.astype(np.float64))
    out_int = Calibration()([0, 1])
    assert out_int.dtype == np.float64
    np.testing.assert_array_equal(out_int, [0.0, 1.0])


def test_fit_isotonic_after_the_correction_keeps_the_rate() -> None:
    # labels already non-decreasing in p: the fit reproduces them at the corrected scores
    r = 0.5
    p = np.array([0.2, 0.5, 0.8])
    y = np.array([0.0, 1.0, 1.0])
    cal = Calibration.fit(p, y, "isotonic", downsample_rate=r)
    assert cal.method == "isotonic"
    assert cal.downsample_rate == r
    np.testing.assert_allclose(cal.x, np.repeat(_corrected(p, r), 2), rtol=1e-15)
    np.testing.assert_allclose(cal.y, np.repeat(y, 2))
    np.testing.assert_allclose(cal(p), y, atol=1e-15)


def test_fit_platt_after_the_correction_keeps_the_rate() -> None:
    r = 0.25
    p, y = _platt_data(0.05, 0.95, 24, 2)
    cal = Calibration.fit(p, y, "platt", downsample_rate=r)
    assert cal.method == "platt"
    assert cal.downsample_rate == r
    q = _corrected(p, r)
    # stationary for the corrected scores (Platt fitted after the correction)
    grad = _penalised_gradient(q, y, cal.a, cal.b)
    assert np.abs(grad).max() < 1e-9 * max(1.0, abs(cal.a), abs(cal.b))
    np.testing.assert_allclose(cal(p), _sigmoid(cal.a * _logit(q) + cal.b), rtol=1e-12)


def test_fit_none_only_corrects() -> None:
    r = 0.1
    p = np.array([0.1, 0.4, 0.6, 0.9])
    cal = Calibration.fit(p, np.array([0, 1, 0, 1]), "none", downsample_rate=r)
    assert cal.method == "none"
    assert cal.downsample_rate == r
    np.testing.assert_allclose(cal(p), _corrected(p, r), rtol=1e-15)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_fit_accepts_labels_as_decimal_strings(method: str) -> None:
    # labels are coerced to float64 (e.g. a text column "0"/"1"): the same fit as numbers
    p, y = _platt_data(0.05, 0.95, 24, 2)
    y_str = np.array([str(int(v)) for v in y])
    got = Calibration.fit(p, y_str, method)  # type: ignore[arg-type]
    ref = Calibration.fit(p, y, method)  # type: ignore[arg-type]
    assert got == ref


def test_fit_converts_a_score_list_to_float64_element_by_element() -> None:
    # a Python list is read straight as float64: float() of each entry, so a complex
    # entry is refused rather than first made a complex array and truncated to its real part
    with pytest.raises(TypeError, match="complex"):
        Calibration.fit([0.2 + 0.5j, 0.7], np.array([0.0, 1.0]), "none")  # type: ignore[arg-type]
    # the same scores as real numbers are fine
    scores = [0.2, 0.7]
    cal = Calibration.fit(scores, np.array([0.0, 1.0]), "none", 0.5)  # type: ignore[arg-type]
    np.testing.assert_allclose(cal(np.array(scores)), _corrected(np.array(scores), 0.5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "isotonic", "x": [0.1, 0.2], "y": [0.3]}, "same, non-zero length"),
        ({"method": "isotonic"}, "same, non-zero length"),
        ({"method": "isotonic", "x": [0.2, 0.1], "y": [0.3, 0.4]}, "non-decreasing"),
        ({"method": "isotonic", "x": [0.1, 0.2], "y": [0.4, 0.3]}, "non-decreasing"),
        ({"a": 0.0}, "greater than 0"),
        ({"downsample_rate": 1.5}, "less than or equal to 1"),
        ({"downsample_rate": 0.0}, "greater than 0"),
    ],
)
def test_calibration_validation_messages(kwargs: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Calibration(**kwargs)


@pytest.mark.parametrize("method", ["none", "platt", "isotonic"])
def test_calibration_json_round_trip(method: str) -> None:
    p, y = _platt_data(0.05, 0.95, 24, 2)
    cal = Calibration.fit(p, y, method, downsample_rate=0.3)  # type: ignore[arg-type]
    back = Calibration.model_validate_json(cal.model_dump_json())
    assert back == cal
    np.testing.assert_array_equal(back(P), cal(P))


@pytest.mark.parametrize(
    ("label", "row", "what"),
    [(0.5, 3, "0/1"), (float("nan"), 2, "finite"), (2.0, 1, "0/1"), (-np.inf, 4, "finite")],
)
def test_fit_platt_refuses_labels_other_than_0_and_1(label: float, row: int, what: str) -> None:
    # Platt's targets count positives and negatives: a 0.5 was half a positive in the count and
    # a negative in the targets; a NaN label (a masked row) made every target NaN
    y = np.array([0.0, 1.0, 0.0, 1.0])
    y[row - 1] = label
    msg = f"Platt calibration needs {what} labels, got {label}"
    with pytest.raises(DataError, match=re.escape(msg)) as err:
        fit_platt(np.array([0.2, 0.3, 0.4, 0.9]), y)
    assert err.value.row == row


def _count_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per Newton step of fit_platt (each step evaluates the sigmoid once)."""
    import mtlrec.fusion.calibration as calibration

    calls: list[int] = []
    sigmoid = calibration._sigmoid

    def counting(z: np.ndarray) -> np.ndarray:
        calls.append(1)
        return sigmoid(z)

    monkeypatch.setattr(calibration, "_sigmoid", counting)
    return calls


def test_fit_platt_stops_after_a_handful_of_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Newton's method converges quadratically near the optimum: on an ordinary problem it
    # stops after a handful of steps (one sigmoid evaluation per step), not at the cap
    calls = _count_steps(monkeypatch)
    p, y = _platt_data(0.05, 0.95, 24, 2)
    a, b = fit_platt(p, y)
    assert 2 <= len(calls) <= 20
    assert np.abs(_penalised_gradient(p, y, a, b)).max() < 1e-9


# -- Platt: the line search, the stopping rule, input checks ---------------------------------
def test_platt_line_search_never_accepts_a_step_that_raises_the_objective() -> None:
    # one intercept, target 2/3, from b0 = -2.3525: the full Newton step overshoots to where
    # the objective is 1.2e-4 higher (less than the Armijo slack 1e-4 * decrease = 4.2e-4), so
    # only the sign of the sufficient-decrease condition decides whether it is taken
    from mtlrec.fusion.calibration import _platt_newton

    t, b0 = 2.0 / 3.0, -2.3525

    def objective(b: float) -> float:
        return t * np.logaddexp(0.0, -b) + (1 - t) * np.logaddexp(0.0, b) + 0.5 * L2 * b * b

    q = _sigmoid(np.array(b0))
    g, h = q - t + L2 * b0, q * (1 - q) + L2
    full = b0 - g / h
    assert 0 < objective(full) - objective(b0) < 1e-4 * g * g / h  # the premise
    (b1,) = _platt_newton(np.ones((1, 1)), np.array([t]), np.zeros(1), np.array([b0]), 1)
    assert objective(b1) < objective(b0) - 1e-4 * 0.5 * g * g / h  # a halved step, which gains
    assert b1 == pytest.approx(b0 - 0.5 * g / h, rel=1e-12)


@pytest.mark.parametrize(("score", "seed"), [(1 - 1e-9, 0), (1 - 1e-9, 1), (0.3, 0)])
def test_fit_platt_stops_on_constant_scores_of_many_rows(
    monkeypatch: pytest.MonkeyPatch, score: float, seed: int
) -> None:
    # every score the same: only a z0 + b is identified, and along the other direction only the
    # ridge curves the objective, far below its rounding on 200,000 rows. The steps there were
    # rounding noise times 1 / ridge: the fit wandered to its cap of 100 steps (50 s on a
    # million rows). The Newton decrement stops it once the gain is below the rounding.
    n = 200_000
    y = (np.random.default_rng(seed).random(n) < 0.5).astype(np.float64)
    steps = _count_steps(monkeypatch)
    a, b = fit_platt(np.full(n, score), y)
    assert len(steps) <= 8
    z0 = float(_logit(np.clip(np.array(score), 1e-7, 1 - 1e-7)))  # the fit clips at 1e-7
    mean_t = float(_platt_targets(y).mean())
    assert a >= 1e-6
    assert a * z0 + b == pytest.approx(float(_logit(np.array(mean_t))), abs=1e-9)


def _hard_cases(n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    y = (rng.random(n) < 0.4).astype(np.float64)
    u = rng.random(n)
    ends = rng.choice([1e-12, 1 - 1e-12], n)
    return {
        "random": (u, y),
        "separable": (np.where(y == 1, 0.9, 0.1), y),
        "saturated": (ends, y),  # logits +-16 after the clip: the sigmoid is flat at (1, 0)
        "saturated, ranked": (ends, (ends > 0.5).astype(np.float64)),
        "ranked the wrong way": (u, (u < 0.5).astype(np.float64)),
        "a gap of 1e-9": (np.where(y == 1, 0.5 + 1e-9, 0.5), y),
    }


@pytest.mark.parametrize("case", list(_hard_cases(8)))
def test_fit_platt_converges_in_few_steps_on_hard_data(
    monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    # the docstring's promise: well within the cap of 100 steps, at the optimum (scipy's
    # bounded L-BFGS-B on the same objective); Platt's start a = 0, b = prior log-odds keeps
    # saturated scores from needing 30 halvings of the first step
    p, y = _hard_cases(20_000)[case]
    steps = _count_steps(monkeypatch)
    a, b = fit_platt(p, y)
    assert len(steps) <= 30
    monkeypatch.undo()
    ref = _scipy_platt(p, y)
    z, t = _logit(np.clip(p, 1e-7, 1 - 1e-7)), _platt_targets(y)

    def objective(a_: float, b_: float) -> float:
        s = a_ * z + b_
        ce = t * np.logaddexp(0.0, -s) + (1 - t) * np.logaddexp(0.0, s)
        return float(ce.sum() + 0.5 * L2 * (a_ * a_ + b_ * b_))

    assert objective(a, b) <= objective(*ref) + 1e-9 * objective(*ref)


def test_fit_platt_takes_the_last_newton_step_when_it_stops() -> None:
    # the decrement stop finishes with a full step, accurate to second order: the optimality
    # condition then holds to rounding (without the step, or with its sign flipped, the error
    # is the size of that last step)
    p, y = _platt_data(0.05, 0.95, 2_000, 3)
    a, b = fit_platt(p, y)
    grad = _penalised_gradient(p, y, a, b)
    assert np.abs(grad).max() < 1e-10 * len(p)


def test_fit_platt_starts_from_platts_prior(monkeypatch: pytest.MonkeyPatch) -> None:
    # Platt's pseudo-code starts at a = 0 and b = log((N+ + 1) / (N- + 1)): the first sigmoid
    # evaluated is that of the prior's log-odds on every row
    import mtlrec.fusion.calibration as calibration

    seen: list[np.ndarray] = []
    sigmoid = calibration._sigmoid

    def first(z: np.ndarray) -> np.ndarray:
        seen.append(np.array(z, copy=True))
        return sigmoid(z)

    monkeypatch.setattr(calibration, "_sigmoid", first)
    fit_platt(np.array([0.1, 0.2, 0.8, 0.9, 0.6]), np.array([0.0, 1.0, 1.0, 1.0, 0.0]))
    np.testing.assert_allclose(seen[0], np.full(5, np.log(4.0 / 3.0)), rtol=1e-15)


def test_fit_platt_without_rows_is_the_identity_map() -> None:
    assert fit_platt(np.array([]), np.array([])) == (1.0, 0.0)
    cal = Calibration.fit(np.array([]), np.array([]), "platt")
    np.testing.assert_allclose(cal(P), np.clip(P, 1e-7, 1 - 1e-7), rtol=1e-14)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
@pytest.mark.parametrize(("score", "row"), [(float("nan"), 2), (-0.1, 1), (1.5, 3), (np.inf, 4)])
def test_fits_refuse_scores_that_are_not_probabilities(method: str, score: float, row: int) -> None:
    p = np.array([0.2, 0.3, 0.4, 0.9])
    p[row - 1] = score
    name = "Platt" if method == "platt" else "isotonic"
    msg = f"{name} calibration needs probabilities in [0, 1], got {score}"
    with pytest.raises(DataError, match=re.escape(msg)) as err:
        Calibration.fit(p, np.array([0.0, 1.0, 0.0, 1.0]), method)  # type: ignore[arg-type]
    assert err.value.row == row


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_fits_accept_scores_of_exactly_0_and_1(method: str) -> None:
    p, y = np.array([0.0, 1.0, 0.0, 1.0, 0.5]), np.array([0.0, 1.0, 1.0, 1.0, 0.0])
    cal = Calibration.fit(p, y, method)  # type: ignore[arg-type]
    assert np.isfinite(cal(p)).all()


@pytest.mark.parametrize(("label", "row"), [(float("nan"), 1), (-np.inf, 3)])
def test_fit_isotonic_refuses_labels_that_are_not_finite(label: float, row: int) -> None:
    y = np.array([0.0, 1.0, 0.25, 3.5])  # any finite value is a label isotonic regression takes
    fit_isotonic(np.array([0.2, 0.3, 0.4, 0.9]), y)
    y[row - 1] = label
    with pytest.raises(DataError, match=re.escape(f"finite labels, got {label}")) as err:
        fit_isotonic(np.array([0.2, 0.3, 0.4, 0.9]), y)
    assert err.value.row == row


@pytest.mark.parametrize("fit", [fit_platt, fit_isotonic])
@pytest.mark.parametrize(
    ("p", "y", "shapes"),
    [
        ([0.2, 0.3, 0.4], [0.0, 1.0], "(3,) and labels of shape (2,)"),
        ([[0.2, 0.3]], [[0.0, 1.0]], "(1, 2) and labels of shape (1, 2)"),
    ],
)
def test_fits_refuse_scores_and_labels_that_do_not_pair(
    fit: object, p: list, y: list, shapes: str
) -> None:
    with pytest.raises(
        DataError, match=re.escape(f"one label per score, as vectors: got scores of shape {shapes}")
    ):
        fit(np.array(p), np.array(y))  # type: ignore[operator]


def _unbounded_optimum(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The minimiser of the penalised cross-entropy over theta (no bound), by scipy's BFGS."""
    from scipy.optimize import minimize

    def objective(th: np.ndarray) -> float:
        s = x @ th
        ce = t * np.logaddexp(0.0, -s) + (1 - t) * np.logaddexp(0.0, s)
        return float(ce.sum() + 0.5 * L2 * th @ th)

    def gradient(th: np.ndarray) -> np.ndarray:
        return x.T @ (_sigmoid(x @ th) - t) + L2 * th

    return minimize(objective, np.zeros(x.shape[1]), jac=gradient, method="BFGS", tol=1e-12).x


@pytest.mark.parametrize(
    ("p", "y"),
    [
        ([0.7027, 0.9438, 0.1268, 0.8648, 0.0595], [1, 1, 1, 0, 0]),
        ([0.0002, 0.0], [1, 0]),
        ([0.2, 0.9, 0.9, 0.4, 0.99], [0, 1, 1, 0, 1]),
        ([1e-9, 1 - 1e-9, 1e-9, 1 - 1e-9, 0.5, 0.5], [1, 1, 0, 0, 1, 0]),
    ],
)
def test_platt_newton_line_search_reaches_the_optimum_from_a_far_start(p: list, y: list) -> None:
    # from (a, b) = (1, 0) a full Newton step lands where the sigmoid is flat (plain Newton
    # returned a = 6.4e6 on the first case): the backtracking has to halve it many times, and
    # the iteration must still end at the one minimiser of the convex objective
    from mtlrec.fusion.calibration import _platt_newton

    p_, y_ = np.array(p), np.array(y, dtype=np.float64)
    z = _logit(np.clip(p_, 1e-7, 1 - 1e-7))
    x, t = np.stack([z, np.ones_like(z)], axis=1), _platt_targets(y_)
    got = _platt_newton(x, t, np.zeros_like(z), np.array([1.0, 0.0]), 100)
    np.testing.assert_allclose(got, _unbounded_optimum(x, t), rtol=1e-6, atol=1e-9)


def test_platt_newton_stops_where_no_step_gains() -> None:
    # one row with logit 1e6 and a slope of 1: the sigmoid is flat at 1, the Hessian is the
    # ridge alone and Newton's step is 3.3e11. Every step down to 1e-10 of it lands at a
    # logit of -1e7 or below, far worse: the line search fails and the start is returned as
    # it is (taking the last tiny step anyway would have moved the slope to -18)
    from mtlrec.fusion.calibration import _platt_newton

    got = _platt_newton(np.array([[1e6]]), np.array([2.0 / 3.0]), np.zeros(1), np.ones(1), 100)
    np.testing.assert_array_equal(got, [1.0])


def test_platt_newton_goes_straight_to_the_ridges_minimum() -> None:
    # a column of zero logits: the cross-entropy does not depend on theta, the objective is
    # a constant plus the ridge 1e-6 / 2 * theta^2, and Newton's step from 1000 lands on 0 in
    # one step, which the line search accepts because it lowers the objective by its ridge
    from mtlrec.fusion.calibration import _platt_newton

    got = _platt_newton(
        np.zeros((3, 1)), np.array([0.25, 0.5, 0.75]), np.zeros(3), np.array([1e3]), 100
    )
    np.testing.assert_allclose(got, [0.0], atol=1e-12)


def test_platt_newton_tries_the_full_newton_step_first() -> None:
    # one intercept, target 2/3, from b = 0: Newton's step is -g / h = (1/6 - 0) / (1/4 + ridge)
    # and it is accepted at once (a step twice as long would lower the objective too: the
    # first trial must be the full step, not more)
    from mtlrec.fusion.calibration import _platt_newton

    (b1,) = _platt_newton(np.ones((1, 1)), np.array([2.0 / 3.0]), np.zeros(1), np.zeros(1), 1)
    assert b1 == pytest.approx((2.0 / 3.0 - 0.5) / (0.25 + L2), rel=1e-14)
