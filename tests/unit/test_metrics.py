"""Tests of mtlrec.metrics: parity with scikit-learn, group AUC, and the streaming MetricSet."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from mtlrec.batch import Batch, Features
from mtlrec.metrics import (
    HIGHER_IS_BETTER,
    MetricSet,
    accuracy,
    auc,
    gauc,
    is_better,
    logloss,
    mae,
    mse,
    multiclass_logloss,
    rmse,
)
from mtlrec.schema import DenseFeature, Schema, TaskSpec


# -- AUC ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 2000)
    s = rng.normal(size=2000) + 0.7 * y
    assert auc(s, y) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_auc_matches_sklearn_heavy_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 3000)
    s = np.round(rng.random(3000) * 0.6 + 0.3 * y, 1)  # about ten distinct values
    assert len(np.unique(s)) < 15
    assert auc(s, y) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_auc_all_scores_tied_is_half() -> None:
    assert auc(np.full(10, 0.3), np.arange(10) % 2) == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1])
def test_auc_matches_sklearn_with_weights(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 1500)
    s = np.round(rng.normal(size=1500) + 0.5 * y, 1)
    w = rng.exponential(size=1500)
    got = auc(s, y, w)
    assert got == pytest.approx(skm.roc_auc_score(y, s, sample_weight=w), abs=1e-12)
    assert abs(got - auc(s, y)) > 1e-6  # the weights really changed something


def test_auc_independent_of_row_order_and_monotone_transform() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500), 2)
    perm = rng.permutation(500)
    base = auc(s, y)
    assert auc(s[perm], y[perm]) == pytest.approx(base, abs=1e-14)
    assert auc(np.exp(3 * s), y) == pytest.approx(base, abs=1e-14)


@settings(deadline=None, max_examples=50)
@given(
    data=st.lists(
        st.tuples(
            st.integers(0, 1),
            st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 1.0]),
            st.floats(0.1, 10.0),
        ),
        min_size=2,
        max_size=40,
    ).filter(lambda rows: len({r[0] for r in rows}) == 2)
)
def test_auc_property_matches_sklearn(data: list[tuple[int, float, float]]) -> None:
    y = np.array([r[0] for r in data])
    s = np.array([r[1] for r in data])
    w = np.array([r[2] for r in data])
    assert auc(s, y) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert auc(s, y, w) == pytest.approx(skm.roc_auc_score(y, s, sample_weight=w), abs=1e-12)
    assert auc(-s, y) == pytest.approx(1.0 - auc(s, y), abs=1e-12)


def test_auc_one_class_or_empty_is_nan() -> None:
    assert math.isnan(auc(np.array([0.1, 0.5, 0.9]), np.ones(3)))
    assert math.isnan(auc(np.array([0.1, 0.5, 0.9]), np.zeros(3)))
    assert math.isnan(auc(np.array([]), np.array([])))


def test_auc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="length"):
        auc(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        auc(np.array([0.1, np.nan]), np.array([0, 1]))


def test_auc_returns_python_float() -> None:
    assert type(auc(np.array([0.2, 0.8]), np.array([0, 1]))) is float


# -- group AUC ----------------------------------------------------------------------------------
def _gauc_reference(s: np.ndarray, y: np.ndarray, g: np.ndarray, w: np.ndarray | None) -> float:
    num = den = 0.0
    for grp in np.unique(g):
        sel = g == grp
        if len(np.unique(y[sel])) < 2:
            continue
        a = skm.roc_auc_score(y[sel], s[sel], sample_weight=None if w is None else w[sel])
        num += a * sel.sum()
        den += sel.sum()
    return num / den if den else math.nan


@pytest.mark.parametrize("weighted", [False, True])
def test_gauc_matches_per_group_loop(weighted: bool) -> None:
    rng = np.random.default_rng(7)
    n = 3000
    g = rng.integers(0, 120, n) * 7 - 50  # sparse, negative ids too
    y = rng.integers(0, 2, n)
    # a few groups that are all positive or all negative: they must be skipped
    y[g == g[0]] = 1
    y[g == g[1]] = 0
    s = np.round(rng.random(n) + 0.3 * y + 0.01 * g, 1)
    w = rng.exponential(size=n) if weighted else None
    assert gauc(s, y, g, w) == pytest.approx(_gauc_reference(s, y, g, w), abs=1e-10)


def test_gauc_single_group_equals_auc_and_differs_from_pooled_auc() -> None:
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 400)
    s = rng.random(400) + 0.2 * y
    assert gauc(s, y, np.zeros(400, dtype=np.int64)) == pytest.approx(auc(s, y), abs=1e-12)
    # group 1 scores are shifted: pooled AUC changes, per-group AUC does not
    g = np.arange(400) % 2
    shifted = s + 5.0 * g
    assert gauc(shifted, y, g) == pytest.approx(gauc(s, y, g), abs=1e-12)
    assert abs(auc(shifted, y) - auc(s, y)) > 1e-3


def test_gauc_nan_when_no_group_has_both_classes() -> None:
    s = np.array([0.1, 0.2, 0.3, 0.4])
    assert math.isnan(gauc(s, np.array([1, 1, 0, 0]), np.array([1, 1, 2, 2])))
    assert math.isnan(gauc(np.array([]), np.array([]), np.array([])))


# -- pointwise metrics --------------------------------------------------------------------------
def test_logloss_matches_sklearn() -> None:
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 1000)
    p = rng.uniform(0.01, 0.99, 1000)
    w = rng.exponential(size=1000)
    assert logloss(p, y) == pytest.approx(skm.log_loss(y, y_proba=p), abs=1e-12)
    assert logloss(p, y, w) == pytest.approx(skm.log_loss(y, y_proba=p, sample_weight=w), abs=1e-12)


def test_logloss_clips_extreme_probabilities() -> None:
    y = np.array([1, 0, 1, 0])
    p = np.array([0.0, 1.0, 1.0, 0.0])
    eps = 1e-7
    got = logloss(p, y, eps=eps)
    assert math.isfinite(got)
    assert got == pytest.approx(skm.log_loss(y, y_proba=np.clip(p, eps, 1 - eps)), rel=1e-12)
    # analytic value, up to the rounding of 1 - eps
    assert got == pytest.approx(-0.5 * (math.log(eps) + math.log1p(-eps)), rel=1e-8)


def test_regression_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(12)
    y = rng.normal(size=500)
    p = y + rng.normal(scale=0.5, size=500)
    w = rng.exponential(size=500)
    assert mse(p, y) == pytest.approx(skm.mean_squared_error(y, p), abs=1e-12)
    assert mae(p, y) == pytest.approx(skm.mean_absolute_error(y, p), abs=1e-12)
    assert rmse(p, y) == pytest.approx(math.sqrt(skm.mean_squared_error(y, p)), abs=1e-12)
    assert mse(p, y, w) == pytest.approx(skm.mean_squared_error(y, p, sample_weight=w), abs=1e-12)
    assert mae(p, y, w) == pytest.approx(skm.mean_absolute_error(y, p, sample_weight=w), abs=1e-12)


def test_multiclass_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(13)
    logits = rng.normal(size=(300, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 4, 300)
    assert accuracy(probs, y.astype(np.float32)) == pytest.approx(
        skm.accuracy_score(y, probs.argmax(axis=1)), abs=1e-12
    )
    assert multiclass_logloss(probs, y) == pytest.approx(
        skm.log_loss(y, y_proba=probs, labels=[0, 1, 2, 3]), abs=1e-12
    )


def test_two_class_logloss_agrees_with_binary() -> None:
    rng = np.random.default_rng(14)
    p = rng.uniform(0, 1, 200)
    y = rng.integers(0, 2, 200)
    two = np.stack([1 - p, p], axis=1)
    assert multiclass_logloss(two, y) == pytest.approx(logloss(p, y), rel=1e-9)
    assert accuracy(p, y) == pytest.approx(accuracy(two, y), abs=1e-15)


def test_multiclass_label_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"0\.\.2"):
        multiclass_logloss(np.full((2, 3), 1 / 3), np.array([0, 3]))


def test_empty_inputs_are_nan_without_warnings() -> None:
    e = np.array([])
    for fn in (logloss, mse, mae, rmse, accuracy):
        assert math.isnan(fn(e, e))
    assert math.isnan(multiclass_logloss(np.zeros((0, 3)), e))


# -- comparison ---------------------------------------------------------------------------------
def test_is_better_directions_and_nan() -> None:
    assert is_better("auc", 0.8, 0.7)
    assert not is_better("auc", 0.7, 0.8)
    assert is_better("logloss", 0.3, 0.4)
    assert not is_better("rmse", 0.5, 0.4)
    assert not is_better("auc", 0.7, 0.7)
    assert is_better("mse", 10.0, math.nan)
    assert not is_better("auc", math.nan, 0.1)
    assert not is_better("auc", math.nan, math.nan)
    assert is_better("click/auc", 0.9, 0.8)
    assert is_better("watch.mse", 0.1, 0.2)
    with pytest.raises(KeyError):
        is_better("bogus", 1.0, 0.0)


def test_higher_is_better_covers_every_reported_metric() -> None:
    m = MetricSet(_schema(with_groups=True))
    names = {k for task in m.compute().values() for k in task}
    assert names <= set(HIGHER_IS_BETTER)
    assert not HIGHER_IS_BETTER["logloss"] and HIGHER_IS_BETTER["gauc"]


# -- MetricSet ----------------------------------------------------------------------------------
def _schema(with_groups: bool = False) -> Schema:
    return Schema(
        features=[DenseFeature(name="x")],
        tasks=[
            TaskSpec(name="click", kind="binary"),
            TaskSpec(name="watch", kind="regression", mask="click_mask"),
            TaskSpec(name="genre", kind="multiclass", num_classes=3),
        ],
        group_column="user" if with_groups else None,
    )


def _batch(
    rng: np.random.Generator,
    size: int,
    *,
    watch_mask: np.ndarray | None = None,
    groups: bool = False,
) -> tuple[dict[str, torch.Tensor], Batch]:
    click = rng.integers(0, 2, size).astype(np.float32)
    wmask = click.astype(bool) if watch_mask is None else watch_mask
    watch = np.where(wmask, rng.exponential(size=size), 0.0).astype(np.float32)
    genre = rng.integers(0, 3, size).astype(np.float32)
    logits = torch.tensor(rng.normal(size=(size, 3)) + 2.0 * np.eye(3)[genre.astype(int)])
    preds = {
        "click": torch.tensor(np.clip(0.3 + 0.4 * click + rng.normal(0, 0.2, size), 0.01, 0.99)),
        "watch": torch.tensor(watch + rng.normal(0, 0.5, size)).float(),
        "genre": torch.softmax(logits.float(), dim=1),
    }
    batch = Batch(
        Features(torch.zeros(size, 0, dtype=torch.int32), torch.zeros(size, 0)),
        labels={
            "click": torch.tensor(click),
            "watch": torch.tensor(watch),
            "genre": torch.tensor(genre),
        },
        masks={
            "click": torch.ones(size, dtype=torch.bool),
            "watch": torch.tensor(wmask),
            "genre": torch.ones(size, dtype=torch.bool),
        },
        weights={k: torch.ones(size) for k in ("click", "watch", "genre")},
        groups=torch.tensor(rng.integers(0, 10, size)) if groups else None,
    )
    return preds, batch


def _concat_batches(
    parts: list[tuple[dict[str, torch.Tensor], Batch]],
) -> tuple[dict[str, torch.Tensor], Batch]:
    preds = {k: torch.cat([p[k] for p, _ in parts]) for k in parts[0][0]}
    bs = [b for _, b in parts]
    size = sum(len(b) for b in bs)
    batch = Batch(
        Features(torch.zeros(size, 0, dtype=torch.int32), torch.zeros(size, 0)),
        labels={k: torch.cat([b.labels[k] for b in bs]) for k in bs[0].labels},
        masks={k: torch.cat([b.masks[k] for b in bs]) for k in bs[0].masks},
        weights={k: torch.cat([b.weights[k] for b in bs]) for k in bs[0].weights},
        groups=None if bs[0].groups is None else torch.cat([b.groups for b in bs]),
    )
    return preds, batch


def _assert_same(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> None:
    assert a.keys() == b.keys()
    for task in a:
        assert a[task].keys() == b[task].keys(), task
        for k in a[task]:
            x, y = a[task][k], b[task][k]
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-9), (task, k)


def test_metricset_reports_expected_keys_and_values() -> None:
    rng = np.random.default_rng(20)
    preds, batch = _batch(rng, 400, groups=True)
    m = MetricSet(_schema(with_groups=True))
    m.update(preds, batch)
    res = m.compute()
    assert set(res["click"]) == {"auc", "gauc", "logloss", "pos_rate", "pred_mean", "count"}
    assert set(res["watch"]) == {"mse", "mae", "rmse", "label_mean", "pred_mean", "count"}
    assert set(res["genre"]) == {"accuracy", "logloss", "count"}

    y = batch.labels["click"].numpy()
    p = preds["click"].numpy()
    assert res["click"]["count"] == 400
    assert res["click"]["auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert res["click"]["pos_rate"] == pytest.approx(y.mean(), abs=1e-6)
    assert res["click"]["pred_mean"] == pytest.approx(p.mean(), abs=1e-9)
    assert res["click"]["gauc"] == pytest.approx(
        _gauc_reference(p, y, batch.groups.numpy(), None), abs=1e-10
    )
    wm = batch.masks["watch"].numpy()
    assert res["watch"]["count"] == int(wm.sum())
    assert res["watch"]["mse"] == pytest.approx(
        skm.mean_squared_error(batch.labels["watch"].numpy()[wm], preds["watch"].numpy()[wm]),
        rel=1e-6,
    )
    g = batch.labels["genre"].numpy().astype(int)
    assert res["genre"]["accuracy"] == pytest.approx(
        (preds["genre"].numpy().argmax(1) == g).mean(), abs=1e-12
    )
    assert res["genre"]["accuracy"] > 0.5  # sanity: the fake model is informative


def test_metricset_no_gauc_without_groups() -> None:
    rng = np.random.default_rng(21)
    m = MetricSet(_schema())
    m.update(*_batch(rng, 50))
    assert "gauc" not in m.compute()["click"]


def test_metricset_masked_rows_are_ignored() -> None:
    rng = np.random.default_rng(22)
    preds, batch = _batch(rng, 300)
    m = MetricSet(_schema())
    m.update(preds, batch)
    before = m.compute()

    outside = ~batch.masks["watch"]
    assert outside.any()
    changed = dict(preds)
    changed["watch"] = preds["watch"].clone()
    changed["watch"][outside] = 1e6
    changed_labels = dict(batch.labels)
    changed_labels["watch"] = batch.labels["watch"].clone()
    changed_labels["watch"][outside] = -1e6
    batch2 = Batch(batch.features, changed_labels, batch.masks, batch.weights, batch.groups)
    m.reset()
    m.update(changed, batch2)
    _assert_same(m.compute(), before)
    assert before["watch"]["count"] == int(batch.masks["watch"].sum())


def test_metricset_ignores_sample_weights() -> None:
    rng = np.random.default_rng(23)
    preds, batch = _batch(rng, 200)
    m = MetricSet(_schema())
    m.update(preds, batch)
    base = m.compute()
    heavy = Batch(
        batch.features,
        batch.labels,
        batch.masks,
        {k: torch.rand(len(batch)) * 10 for k in batch.weights},
        batch.groups,
    )
    m.reset()
    m.update(preds, heavy)
    _assert_same(m.compute(), base)


@pytest.mark.parametrize("groups", [False, True])
def test_metricset_streaming_equals_concatenation(groups: bool) -> None:
    rng = np.random.default_rng(24)
    parts = [_batch(rng, n, groups=groups) for n in (17, 64, 1, 120)]
    streamed = MetricSet(_schema(groups))
    for preds, batch in parts:
        streamed.update(preds, batch)
    whole = MetricSet(_schema(groups))
    whole.update(*_concat_batches(parts))
    _assert_same(streamed.compute(), whole.compute())


def test_metricset_reset_clears_state() -> None:
    rng = np.random.default_rng(25)
    first = _batch(rng, 200)
    second = _batch(rng, 150)

    fresh = MetricSet(_schema())
    fresh.update(*second)
    expected = fresh.compute()

    m = MetricSet(_schema())
    m.update(*first)
    first_res = m.compute()
    m.reset()
    m.update(*second)
    _assert_same(m.compute(), expected)
    assert first_res["click"]["count"] == 200
    assert m.compute()["click"]["count"] == 150


def test_metricset_empty_mask_gives_count_zero_and_nan() -> None:
    rng = np.random.default_rng(26)
    m = MetricSet(_schema())
    m.update(*_batch(rng, 40, watch_mask=np.zeros(40, dtype=bool)))
    res = m.compute()
    assert res["watch"]["count"] == 0
    assert all(math.isnan(v) for k, v in res["watch"].items() if k != "count")
    assert res["click"]["count"] == 40


def test_metricset_compute_without_updates() -> None:
    res = MetricSet(_schema(with_groups=True)).compute()
    for task, values in res.items():
        assert values["count"] == 0, task
        assert all(math.isnan(v) for k, v in values.items() if k != "count"), task
    assert "gauc" in res["click"]


def test_metricset_gather_sees_every_array() -> None:
    rng = np.random.default_rng(27)
    preds, batch = _batch(rng, 30, groups=True)
    seen: list[tuple[int, ...]] = []

    def twice(a: np.ndarray) -> np.ndarray:
        seen.append(a.shape)
        return np.concatenate([a, a])

    m = MetricSet(_schema(with_groups=True))
    m.update(preds, batch)
    res = m.compute(gather=twice)
    assert len(seen) == 12  # three tasks x (preds, labels, groups, form of the scores)
    assert seen[-4] == (30, 3)
    assert seen[-1] == (1,)
    assert res["click"]["count"] == 60
    assert res["click"]["auc"] == pytest.approx(m.compute()["click"]["auc"], abs=1e-12)


def test_metricset_rejects_bad_predictions() -> None:
    rng = np.random.default_rng(28)
    preds, batch = _batch(rng, 10)
    m = MetricSet(_schema())
    with pytest.raises(ValueError, match="genre"):
        m.update({**preds, "genre": preds["genre"][:, :2]}, batch)
    with pytest.raises(KeyError, match="click"):
        m.update({k: v for k, v in preds.items() if k != "click"}, batch)


def test_metricset_accepts_column_predictions_and_detaches() -> None:
    rng = np.random.default_rng(29)
    preds, batch = _batch(rng, 25)
    col = {**preds, "click": preds["click"].reshape(-1, 1).requires_grad_(True)}
    m = MetricSet(_schema())
    m.update(col, batch)
    ref = MetricSet(_schema())
    ref.update(preds, batch)
    _assert_same(m.compute(), ref.compute())


def test_metricset_reset_forgets_groups() -> None:
    rng = np.random.default_rng(30)
    m = MetricSet(_schema())
    m.update(*_batch(rng, 20, groups=True))
    with pytest.raises(ValueError, match="groups"):
        m.update(*_batch(rng, 20))
    m.reset()
    m.update(*_batch(rng, 20))
    assert "gauc" not in m.compute()["click"]
