"""Fusion: formulas, rank transforms, calibration, searchers, learned fusion, JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlrec.errors import ConfigError, DataError
from mtlrec.fusion import (
    SEARCHERS,
    Calibration,
    ExtendedParams,
    ExtendedProduct,
    FusionObjective,
    NeuralFusion,
    ProductParams,
    RankFusion,
    RankParams,
    SumParams,
    WeightedProduct,
    WeightedSum,
    business_label,
    downsample_correction,
    fit_lgbm,
    fit_neural,
    fusion_from_dict,
    load_fusion,
    save_fusion,
    search_fusion,
)
from mtlrec.fusion.calibration import fit_isotonic
from mtlrec.fusion.ltr import NeuralParams
from mtlrec.fusion.rank import group_percentiles
from mtlrec.metrics import auc
from mtlrec.registry import FUSIONS

TASKS = ["click", "conv", "like"]


def _formula(kind: str, w: list[float], extra: list[float]) -> object:
    weights = dict(zip(TASKS, w, strict=True))
    other = dict(zip(TASKS, extra, strict=True))
    if kind == "sum_identity":
        return WeightedSum(SumParams(weights=weights))
    if kind == "sum_log":
        return WeightedSum(SumParams(weights=weights, transform="log"))
    if kind == "sum_logit":
        return WeightedSum(SumParams(weights=weights, transform="logit"))
    if kind == "product":
        return WeightedProduct(ProductParams(exponents=weights, offsets=other))
    if kind == "extended":
        return ExtendedProduct(
            ExtendedParams(
                exponents=weights,
                slopes=other,
                factors={t: 1.0 + 10 * v for t, v in other.items()},
                floors={t: v / 10 for t, v in other.items()},
            )
        )
    return RankFusion(RankParams(weights=weights, buckets=None if extra[0] < 0.5 else 10))


KINDS = ["sum_identity", "sum_log", "sum_logit", "product", "extended", "rank"]
unit = st.floats(0.0, 1.0, allow_nan=False)
positive = st.floats(0.01, 3.0, allow_nan=False)


def test_every_formula_is_registered() -> None:
    assert {
        "weighted_sum",
        "weighted_product",
        "extended_product",
        "rank",
        "lgbm",
        "neural",
    } <= set(FUSIONS.names())


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    w=st.lists(positive, min_size=3, max_size=3),
    extra=st.lists(unit, min_size=3, max_size=3),
    p=st.lists(st.lists(unit, min_size=3, max_size=3), min_size=1, max_size=8),
    task=st.integers(0, 2),
    row=st.integers(0, 7),
    delta=st.floats(0.0, 1.0),
)
def test_formulas_are_monotone_in_each_task(
    kind: str,
    w: list[float],
    extra: list[float],
    p: list[list[float]],
    task: int,
    row: int,
    delta: float,
) -> None:
    f = _formula(kind, w, extra)
    m = np.array(p)  # [N, 3]
    row = row % len(m)
    up = m.copy()
    up[row, task] = min(1.0, up[row, task] + delta)
    probs = {t: m[:, j] for j, t in enumerate(TASKS)}
    probs_up = {t: up[:, j] for j, t in enumerate(TASKS)}
    before, after = f(probs)[row], f(probs_up)[row]  # type: ignore[operator]
    assert after >= before - 1e-9 * max(1.0, abs(before))


@settings(max_examples=30, deadline=None)
@given(
    w=st.lists(positive, min_size=2, max_size=2),
    p=st.lists(st.lists(unit, min_size=2, max_size=2), min_size=2, max_size=20),
    task=st.integers(0, 1),
    row=st.integers(0, 19),
    delta=st.floats(0.0, 2.0),
)
def test_neural_fusion_is_monotone(
    w: list[float], p: list[list[float]], task: int, row: int, delta: float
) -> None:
    rng = np.random.default_rng(int(1000 * w[0]))
    f = NeuralFusion(
        NeuralParams(
            tasks=["a", "b"],
            mean=[0.1, -0.2],
            scale=[1.0, 2.0],
            w1=np.abs(rng.normal(size=(2, 4))).tolist(),
            b1=rng.normal(size=4).tolist(),
            w2=[w[0], w[1], 0.5, 0.0],
            b2=0.3,
        )
    )
    m = np.array(p)
    row = row % len(m)
    up = m.copy()
    up[row, task] = min(1.0, up[row, task] + delta)
    a = f({"a": m[:, 0], "b": m[:, 1]})
    b = f({"a": up[:, 0], "b": up[:, 1]})
    assert b[row] >= a[row] - 1e-12


def test_rank_fusion_is_invariant_to_monotone_transforms() -> None:
    rng = np.random.default_rng(0)
    n = 500
    p = {"click": rng.random(n), "conv": np.round(rng.random(n), 2), "like": rng.random(n)}
    groups = rng.integers(0, 17, n)
    f = RankFusion(RankParams(weights={"click": 1.0, "conv": 2.5, "like": 0.3}, buckets=100))
    base = f(p, groups)
    for transform in (
        lambda x: np.exp(5 * x) - 3,
        lambda x: x**3,
        lambda x: np.log(x + 1e-3),
    ):
        q = dict(p, conv=transform(p["conv"]))
        np.testing.assert_array_equal(f(q, groups), base)
    # and grouping matters: a row's rank is within its request
    assert not np.array_equal(f(p, None), base)


def test_group_percentiles_match_a_brute_force_count() -> None:
    rng = np.random.default_rng(1)
    s = np.round(rng.random(300), 1)  # many ties
    g = rng.integers(0, 7, 300)
    pct = group_percentiles(s, g)
    for i in range(0, 300, 13):
        same = g == g[i]
        assert pct[i] == pytest.approx((s[same] < s[i]).sum() / same.sum())


def test_weighted_product_and_extended_match_their_formulas() -> None:
    p = {"a": np.array([0.2, 0.7]), "b": np.array([0.5, 0.01])}
    f = WeightedProduct(ProductParams(exponents={"a": 2.0, "b": 0.5}, offsets={"b": 0.1}))
    np.testing.assert_allclose(f(p), p["a"] ** 2 * (0.1 + p["b"]) ** 0.5)
    e = ExtendedProduct(
        ExtendedParams(
            exponents={"a": 1.0, "b": 2.0},
            slopes={"a": 3.0},
            factors={"a": 5.0, "b": 2.0},
            floors={"b": 0.1},
        )
    )
    want = (1 + 5 * p["a"]) ** (1 + 3 * p["a"]) * (1 + 2 * np.maximum(p["b"], 0.1)) ** 2.0
    np.testing.assert_allclose(e(p), want)


def test_torch_in_torch_out() -> None:
    f = WeightedSum(SumParams(weights={"a": 1.0, "b": 2.0}))
    out = f({"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([[0.3], [0.4]])})
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), [0.7, 1.0])


def test_bad_inputs_are_clear_errors() -> None:
    f = WeightedSum(SumParams(weights={"click": 1.0, "conv": 2.0}))
    with pytest.raises(ConfigError, match=r"\['conv'\]"):
        f({"click": np.array([0.1])})
    with pytest.raises(DataError, match=r"'conv', row 2: .*not a finite"):
        f({"click": np.array([0.1, 0.2]), "conv": np.array([0.1, np.nan])})
    with pytest.raises(DataError, match="differ in length"):
        f({"click": np.array([0.1, 0.2]), "conv": np.array([0.1])})


# -- calibration ------------------------------------------------------------------------------
def test_isotonic_matches_sklearn() -> None:
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(0)
    p = np.round(rng.random(2000), 3)
    y = (rng.random(2000) < p**2).astype(float)
    x, v = fit_isotonic(p, y)
    ours = np.interp(p, x, v)
    ref = IsotonicRegression(out_of_bounds="clip").fit(p, y).predict(p)
    np.testing.assert_allclose(ours, ref, atol=1e-10)
    cal = Calibration.fit(p, y, "isotonic")
    assert np.all(np.diff(cal(np.linspace(0, 1, 50))) >= 0)


def test_platt_matches_logistic_regression_on_platts_targets() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.99, 5000)
    z = np.log(p / (1 - p))
    y = (rng.random(5000) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(float)
    cal = Calibration.fit(p, y, "platt")
    # Platt's targets (N+ + 1) / (N+ + 2) and 1 / (N- + 2) as soft labels: each row once as a
    # positive with weight t and once as a negative with weight 1 - t
    pos, neg = y.sum(), (1 - y).sum()
    t = np.where(y == 1, (pos + 1) / (pos + 2), 1 / (neg + 2))
    zz, yy, ww = np.concatenate([z, z]), np.repeat([1.0, 0.0], len(z)), np.concatenate([t, 1 - t])
    lr = LogisticRegression(C=1e8, tol=1e-10, max_iter=1000).fit(zz[:, None], yy, ww)
    assert cal.a == pytest.approx(lr.coef_[0, 0], abs=1e-5)
    assert cal.b == pytest.approx(lr.intercept_[0], abs=1e-5)
    assert cal.a == pytest.approx(0.5, abs=0.1)


def test_downsampling_correction_recovers_the_rate() -> None:
    # a calibrated model on data with negatives kept at rate r predicts p' = p / (p + (1-p) r)
    p_true = np.array([0.01, 0.1, 0.5])
    r = 0.1
    p_sampled = p_true / (p_true + (1 - p_true) * r)
    np.testing.assert_allclose(downsample_correction(p_sampled, r), p_true)
    cal = Calibration(downsample_rate=r)
    np.testing.assert_allclose(cal(p_sampled), p_true)


# -- search -----------------------------------------------------------------------------------
def _known_optimum(n: int = 3000, seed: int = 0) -> tuple[dict, dict]:
    """One scored task whose labels are exactly ``a + 2 b > t``: the weighted sum reaches
    AUC 1 only with weights in the ratio b / a = 2."""
    rng = np.random.default_rng(seed)
    a, b = rng.random(n), rng.random(n)
    y = (a + 2 * b > 1.5).astype(float)
    return {"a": a, "b": b}, {"target": y, "a": y, "b": y}


@pytest.mark.parametrize("method", SEARCHERS)
def test_searchers_find_the_known_optimum(method: str) -> None:
    probs, labels = _known_optimum()
    obj = FusionObjective(labels, {"target": 1.0})
    start = WeightedSum(SumParams(weights={"a": 1.0, "b": 0.2}))
    res = search_fusion(start, probs, obj, method=method, budget=300, seed=3)
    assert res.start.objective < 0.97
    best = res.best
    assert best.objective > 0.995, method
    wa, wb = best.x
    assert wb / wa == pytest.approx(2.0, rel=0.08), method
    assert len(res.trials) == 300 if method != "grid" else 290  # 17 x 17 + start
    # the fusion returned scores with the best parameters
    assert auc(res.fusion(probs), labels["target"]) == pytest.approx(best.objective)


@pytest.mark.parametrize("method", ["random", "cem", "es", "tpe", "cmaes"])
def test_search_is_reproducible_with_a_seed(method: str) -> None:
    probs, labels = _known_optimum(800)
    obj = FusionObjective(labels, {"target": 1.0})
    start = WeightedSum(SumParams(weights={"a": 1.0, "b": 1.0}))
    runs = [search_fusion(start, probs, obj, method=method, budget=40, seed=s) for s in (7, 7, 8)]
    xs = [np.array([t.x for t in r.trials]) for r in runs]
    np.testing.assert_array_equal(xs[0], xs[1])
    assert not np.array_equal(xs[0], xs[2])


def _realistic(n: int, seed: int) -> tuple[dict, dict, dict]:
    """A stand-in for a two-task model's held-out predictions: weakly correlated tasks, the
    conversion task scored on clicked rows only, its head's scores on a compressed scale (so
    equal exponents let the click score dominate the product)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=n)
    v = 0.3 * u + rng.normal(size=n)
    click = (rng.random(n) < 1 / (1 + np.exp(-(u - 1)))).astype(float)
    conv = (rng.random(n) < 1 / (1 + np.exp(-(2 * v - 3)))).astype(float)
    p_click = 1 / (1 + np.exp(-(u - 1 + 0.7 * rng.normal(size=n))))
    p_conv = 1 / (1 + np.exp(-(0.3 * (v + 0.5 * rng.normal(size=n)) - 4)))
    return (
        {"click": p_click, "conv": p_conv},
        {"click": click, "conv": conv},
        {"click": np.ones(n, bool), "conv": click == 1},
    )


def test_cem_improves_on_equal_weights_out_of_sample() -> None:
    probs, labels, masks = _realistic(6000, 0)
    obj = FusionObjective(labels, {"click": 1.0, "conv": 3.0}, masks=masks)
    start = WeightedProduct(ProductParams(exponents={"click": 1.0, "conv": 1.0}))
    res = search_fusion(start, probs, obj, method="cem", budget=120, seed=0)
    assert res.best.objective > res.start.objective + 0.1
    # the chosen weights also beat equal weights on fresh data
    p2, l2, m2 = _realistic(6000, 1)
    obj2 = FusionObjective(l2, {"click": 1.0, "conv": 3.0}, masks=m2)
    eq = obj2.value(obj2.per_task(start(p2)))[0]
    ch = obj2.value(obj2.per_task(res.fusion(p2)))[0]
    assert ch > eq + 0.1


def test_floors_are_respected() -> None:
    probs, labels, masks = _realistic(4000, 2)
    free = FusionObjective(labels, {"conv": 1.0}, masks=masks)
    start = WeightedSum(SumParams(weights={"click": 1.0, "conv": 1.0}))
    r0 = search_fusion(start, probs, free, method="cem", budget=80, seed=0)
    click_auc = FusionObjective(labels, {"click": 1.0}).per_task(r0.fusion(probs))[0]
    floor = click_auc + 0.02  # ask for more click AUC than the unconstrained optimum gives
    held = FusionObjective(labels, {"conv": 1.0, "click": 0.0}, floors={"click": floor})
    r1 = search_fusion(start, probs, held, method="cem", budget=80, seed=0)
    assert r1.best.feasible
    assert r1.best.metrics[1] >= floor


def test_pareto_front_is_not_dominated() -> None:
    probs, labels, masks = _realistic(2000, 3)
    obj = FusionObjective(labels, {"click": 1.0, "conv": 1.0}, masks=masks)
    start = WeightedSum(SumParams(weights={"click": 1.0, "conv": 1.0}))
    res = search_fusion(start, probs, obj, method="random", budget=60, seed=0)
    front = np.array([t.metrics for t in res.pareto()])
    every = np.array([t.metrics for t in res.trials])
    assert 1 <= len(front) <= len(every)
    for f in front:
        assert not ((every >= f).all(1) & (every > f).any(1)).any()
    best = res.best.metrics
    assert any(np.array_equal(best, f) for f in front)


def test_gauc_objective_uses_groups() -> None:
    from mtlrec.metrics import gauc

    probs, labels, _ = _realistic(3000, 4)
    groups = np.random.default_rng(0).integers(0, 40, 3000)
    obj = FusionObjective(labels, {"click": 1.0}, groups=groups)
    assert obj.metric == "gauc"
    s = probs["click"] + probs["conv"]
    assert obj.per_task(s)[0] == pytest.approx(gauc(s, labels["click"], groups))


def test_unknown_search_inputs() -> None:
    probs, labels = _known_optimum(100)
    with pytest.raises(ConfigError, match="nope"):
        FusionObjective(labels, {"nope": 1.0})
    obj = FusionObjective(labels, {"target": 1.0})
    with pytest.raises(ConfigError, match="unknown search method"):
        search_fusion(WeightedSum(SumParams(weights={"a": 1.0})), probs, obj, method="sgd")


# -- learned fusion ---------------------------------------------------------------------------
def test_business_label() -> None:
    lab = {"click": np.array([1.0, 1.0, 0.0]), "conv": np.array([1.0, 0.0, np.nan])}
    np.testing.assert_array_equal(business_label("click + 4*conv", lab), [5.0, 1.0, 0.0])
    np.testing.assert_array_equal(business_label("max(click, conv) > 0", lab), [1, 1, 0])
    with pytest.raises(ConfigError, match="'buy'"):
        business_label("click + buy", lab)
    with pytest.raises(ConfigError, match="not allowed"):
        business_label("__import__('os')", lab)


def test_lgbm_and_neural_fusion_learn_and_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("lightgbm")
    probs, labels, _ = _realistic(4000, 5)
    groups = np.repeat(np.arange(200), 20)
    p = np.stack([probs["click"], probs["conv"]], 1)
    y = business_label("click + 3*conv", labels)
    obj = FusionObjective(labels, {"click": 1.0, "conv": 3.0})
    for fusion in (
        fit_lgbm(p, y, ["click", "conv"], groups=groups, model_file="f.lgbm.txt"),
        fit_lgbm(p, y, ["click", "conv"], model_file="f.lgbm.txt"),
        fit_neural(p, y, ["click", "conv"], epochs=60),
    ):
        s = fusion(probs, groups)
        m = obj.per_task(s)
        assert m[1] > 0.6, fusion.kind  # learned to rank conversions
        save_fusion(fusion, tmp_path / "f.json")
        again = load_fusion(tmp_path / "f.json", ["click", "conv"])
        np.testing.assert_allclose(again(probs, groups), s)
    assert (tmp_path / "f.lgbm.txt").read_text().startswith("tree")


# -- JSON -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_json_round_trip(kind: str, tmp_path: Path) -> None:
    f = _formula(kind, [1.0, 0.5, 2.0], [0.2, 0.6, 0.1])
    f.calibration = {  # type: ignore[attr-defined]
        "conv": Calibration(downsample_rate=0.25, method="platt", a=1.3, b=-0.2),
        "like": Calibration.fit(np.linspace(0, 1, 30), np.linspace(0, 1, 30) > 0.5, "isotonic"),
    }
    path = tmp_path / "fusion.json"
    save_fusion(f, path)  # type: ignore[arg-type]
    again = load_fusion(path, TASKS)
    rng = np.random.default_rng(0)
    probs = {t: rng.random(50) for t in TASKS}
    groups = rng.integers(0, 5, 50)
    np.testing.assert_allclose(again(probs, groups), f(probs, groups))  # type: ignore[operator]
    assert json.loads(path.read_text())["kind"] == f.kind  # type: ignore[attr-defined]


def test_wrong_task_names_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    save_fusion(WeightedSum(SumParams(weights={"click": 1.0, "buy": 2.0})), path)
    with pytest.raises(ConfigError, match=r"\['buy'\].*model tasks: click, conv"):
        load_fusion(path, ["click", "conv"])
    data = json.loads(path.read_text())
    bad = {**data, "params": {"weights": {"click": 1.0}, "transfrom": "log"}}
    with pytest.raises(ConfigError, match="transfrom"):
        fusion_from_dict(bad)
    with pytest.raises(ConfigError, match="tasks"):
        fusion_from_dict({**data, "tasks": ["click", "conv"]})
    with pytest.raises(ConfigError, match="unknown fusion 'magic'"):
        fusion_from_dict({**data, "kind": "magic"})
    with pytest.raises(ValueError, match="offsets names tasks"):
        ProductParams(exponents={"a": 1.0}, offsets={"b": 0.1})
    prod = {**data, "kind": "weighted_product", "tasks": ["a"]}
    with pytest.raises(ConfigError, match=r"offsets names tasks \['b'\]"):
        fusion_from_dict({**prod, "params": {"exponents": {"a": 1.0}, "offsets": {"b": 0.1}}})
    with pytest.raises(ConfigError, match="calibration for unknown tasks"):
        WeightedSum(SumParams(weights={"a": 1.0}), {"b": Calibration()})
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_fusion(tmp_path / "x.json")
    with pytest.raises(ConfigError, match="not found"):
        load_fusion(tmp_path / "missing.json")


@pytest.mark.slow
def test_cem_improves_on_census_predictions(tmp_path: Path) -> None:
    """The issue's bar on real data: a small MMoE on census-income (one epoch), CEM on the
    validation predictions beats equal exponents on the test split."""
    from mtlrec.config import ExperimentConfig
    from mtlrec.fusion.heldout import run_predictions
    from mtlrec.train.run import train_run

    root = Path(__file__).resolve().parents[2]
    cfg = ExperimentConfig.load(
        root / "examples" / "census" / "mmoe.yaml",
        [
            "training.epochs=1",
            "training.progress=false",
            "training.batch_size=1024",
            "model.params.num_experts=2",
            "model.params.expert_hidden=[16]",
            "model.params.tower_hidden=[8]",
        ],
    )
    train_run(cfg, output_dir=tmp_path / "run")
    valid = run_predictions(tmp_path / "run", "valid")
    test = run_predictions(tmp_path / "run", "test")
    coefs = {"income": 2.0, "never_married": 1.0}
    ov = FusionObjective(valid.labels, coefs, masks=valid.masks)
    ot = FusionObjective(test.labels, coefs, masks=test.masks)
    start = WeightedProduct(ProductParams(exponents={"income": 1.0, "never_married": 1.0}))
    res = search_fusion(start, valid.probs, ov, method="cem", budget=100, seed=0)
    assert res.best.objective > res.start.objective + 0.01
    eq = ot.value(ot.per_task(start(test.probs)))[0]
    ch = ot.value(ot.per_task(res.fusion(test.probs)))[0]
    assert ch > eq + 0.01
