"""Metrics from logits, not float32 probabilities (issue 12.8).

float32 rounds every probability above ``1 - 6e-8`` to 1.0, so rank metrics computed on
probabilities tie confident rows. References here: scikit-learn on float64 scores, and log
losses written out in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from mtlrec.batch import Batch, Features
from mtlrec.metrics import MetricSet
from mtlrec.metrics.pointwise import logloss_from_log_probs, logloss_from_logits
from mtlrec.models.base import ModelOutput
from mtlrec.schema import DenseFeature, Schema, TaskSpec
from mtlrec.train.step import evaluate


def _bce_ref(z: np.ndarray, y: np.ndarray) -> float:
    """Mean -(y log p + (1 - y) log(1 - p)), p = sigmoid(z), float64, by rows."""
    rows = [
        max(zi, 0.0) - yi * zi + math.log1p(math.exp(-abs(zi))) for zi, yi in zip(z, y, strict=True)
    ]
    return float(np.mean(rows))


def _gauc_ref(s: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    num = den = 0.0
    for k in np.unique(g):
        sel = g == k
        if len(np.unique(y[sel])) == 2:
            num += skm.roc_auc_score(y[sel], s[sel]) * sel.sum()
            den += sel.sum()
    return num / den


def _batch(labels: dict[str, np.ndarray], groups: np.ndarray | None = None, **masks) -> Batch:
    n = len(next(iter(labels.values())))
    return Batch(
        Features(torch.zeros(n, 0, dtype=torch.int32), torch.zeros(n, 0)),
        {k: torch.tensor(v, dtype=torch.float32) for k, v in labels.items()},
        {k: torch.tensor(masks.get(k, np.ones(n, dtype=bool))) for k in labels},
        {k: torch.ones(n) for k in labels},
        groups=None if groups is None else torch.tensor(groups),
    )


class _LogitsFromDense(torch.nn.Module):
    """A stand-in model: the click logit is the first dense feature (float32)."""

    def forward(self, features: Features) -> ModelOutput:
        return ModelOutput({"click": features.dense[:, 0]})


def _extreme(n: int = 4000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits mostly beyond 16.6, where float32 sigmoid returns exactly 1.0."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    z = (16.0 + 5.5 * y + rng.normal(0.0, 1.8, n)).astype(np.float32)
    return z, y.astype(np.float64), rng.integers(0, 40, n)


def test_evaluate_ranks_on_logits_in_the_saturated_range() -> None:
    z, y, g = _extreme()
    probs32 = torch.sigmoid(torch.from_numpy(z)).numpy()
    assert (probs32 == 1.0).mean() > 0.6  # most rows tie at 1.0 in float32
    z64 = z.astype(np.float64)
    want_auc = skm.roc_auc_score(y, z64)
    assert want_auc == pytest.approx(0.986, abs=0.002)
    assert skm.roc_auc_score(y, probs32) < 0.83  # what probabilities would report

    schema = Schema(
        features=[DenseFeature(name="x")],
        tasks=[TaskSpec(name="click", kind="binary")],
        group_column="user",
    )
    n = len(z)
    batch = Batch(
        Features(torch.zeros(n, 0, dtype=torch.int32), torch.from_numpy(z).reshape(n, 1)),
        {"click": torch.tensor(y, dtype=torch.float32)},
        {"click": torch.ones(n, dtype=torch.bool)},
        {"click": torch.ones(n)},
        groups=torch.tensor(g),
    )
    res = evaluate(_LogitsFromDense(), [batch], MetricSet(schema), schema.tasks, block_rows=700)
    got = res["click"]
    assert got["auc"] == pytest.approx(want_auc, abs=1e-12)
    assert got["gauc"] == pytest.approx(_gauc_ref(z64, y, g), abs=1e-12)
    assert got["logloss"] == pytest.approx(_bce_ref(z64, y), rel=1e-12)
    assert got["pred_mean"] == pytest.approx(float(np.mean(1 / (1 + np.exp(-z64)))), rel=1e-12)


def test_logit_metrics_match_sklearn_on_ordinary_data() -> None:
    rng = np.random.default_rng(5)
    n = 3000
    y = rng.integers(0, 2, n).astype(np.float64)
    z = (rng.normal(size=n) + 1.2 * y - 0.4).astype(np.float32)
    g = rng.integers(0, 25, n)
    schema = Schema(
        features=[DenseFeature(name="x")],
        tasks=[TaskSpec(name="click", kind="binary")],
        group_column="user",
    )
    m = MetricSet(schema)
    for lo in range(0, n, 1000):  # streamed in blocks
        sl = slice(lo, lo + 1000)
        m.update(ModelOutput({"click": torch.from_numpy(z[sl])}), _batch({"click": y[sl]}, g[sl]))
    got = m.compute()["click"]
    p64 = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    assert got["auc"] == pytest.approx(skm.roc_auc_score(y, p64), abs=1e-12)
    assert got["gauc"] == pytest.approx(_gauc_ref(p64, y, g), abs=1e-12)
    assert got["logloss"] == pytest.approx(skm.log_loss(y, p64), rel=1e-10)
    assert got["pred_mean"] == pytest.approx(p64.mean(), rel=1e-12)
    assert got["pos_rate"] == pytest.approx(y.mean(), rel=1e-12)
    assert got["count"] == n


def _esmm_schema() -> Schema:
    return Schema(
        features=[DenseFeature(name="x")],
        tasks=[
            TaskSpec(name="ctr", kind="binary"),
            TaskSpec(name="cvr", kind="binary", mask="ctr"),
            TaskSpec(name="ctcvr", kind="binary"),
        ],
    )


def test_esmm_ctcvr_ranks_on_log_probability_with_an_exact_log_loss() -> None:
    rng = np.random.default_rng(7)
    n = 3000
    click = rng.integers(0, 2, n)
    buy = click * rng.integers(0, 2, n)
    a = (17.0 + 6.0 * click + rng.normal(0.0, 2.0, n)).astype(np.float32)  # ctr logits
    b = (17.0 + 6.0 * buy + rng.normal(0.0, 2.0, n)).astype(np.float32)  # cvr logits
    za, zb = torch.from_numpy(a), torch.from_numpy(b)
    log_p = F.logsigmoid(za) + F.logsigmoid(zb)  # float32, as ESMM computes it
    assert (log_p.exp().numpy() == 1.0).mean() > 0.3  # probabilities tie at 1.0
    out = ModelOutput({"ctr": za, "cvr": zb}, log_probs={"ctcvr": log_p})
    m = MetricSet(_esmm_schema())
    batch = _batch(
        {"ctr": click.astype(float), "cvr": buy.astype(float), "ctcvr": buy.astype(float)},
        cvr=click.astype(bool),
    )
    m.update(out, batch)
    res = m.compute()
    lp = log_p.numpy().astype(np.float64)
    y = buy.astype(np.float64)
    assert res["ctcvr"]["auc"] == pytest.approx(skm.roc_auc_score(y, lp), abs=1e-12)
    assert res["ctcvr"]["auc"] > skm.roc_auc_score(y, log_p.exp().numpy()) + 0.05
    # log loss from log p: -(y log p + (1 - y) log(1 - p)), log(1 - p) by hand in float64
    rows = [
        -(yi * v + (1 - yi) * (math.log(-math.expm1(v)) if v > -0.69 else math.log1p(-math.exp(v))))
        for v, yi in zip(lp, y, strict=True)
    ]
    assert res["ctcvr"]["logloss"] == pytest.approx(float(np.mean(rows)), rel=1e-12)
    assert res["ctcvr"]["pred_mean"] == pytest.approx(float(np.mean(np.exp(lp))), rel=1e-12)
    # the CVR task is evaluated on clicked rows only, from its logit
    keep = click.astype(bool)
    assert res["cvr"]["count"] == int(keep.sum())
    b64 = b.astype(np.float64)
    assert res["cvr"]["auc"] == pytest.approx(skm.roc_auc_score(y[keep], b64[keep]), abs=1e-12)
    assert res["cvr"]["logloss"] == pytest.approx(_bce_ref(b64[keep], y[keep]), rel=1e-12)


def test_multiclass_from_logits_matches_sklearn() -> None:
    rng = np.random.default_rng(9)
    n, c = 800, 4
    y = rng.integers(0, c, n)
    z = (rng.normal(size=(n, c)) * 3 + 4.0 * np.eye(c)[y]).astype(np.float32)
    schema = Schema(
        features=[DenseFeature(name="x")],
        tasks=[TaskSpec(name="k", kind="multiclass", num_classes=c)],
    )
    m = MetricSet(schema)
    m.update(ModelOutput({"k": torch.from_numpy(z)}), _batch({"k": y.astype(float)}))
    got = m.compute()["k"]
    z64 = z.astype(np.float64)
    p64 = np.exp(z64 - z64.max(1, keepdims=True))
    p64 /= p64.sum(1, keepdims=True)
    assert got["logloss"] == pytest.approx(skm.log_loss(y, p64, labels=list(range(c))), rel=1e-6)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, p64.argmax(1)), abs=1e-12)


def test_mixing_outputs_and_probabilities_in_one_pass_is_refused() -> None:
    schema = Schema(features=[DenseFeature(name="x")], tasks=[TaskSpec(name="c", kind="binary")])
    m = MetricSet(schema)
    b = _batch({"c": np.array([0.0, 1.0])})
    m.update(ModelOutput({"c": torch.tensor([-1.0, 2.0])}), b)
    with pytest.raises(ValueError, match="'c'"):
        m.update({"c": torch.tensor([0.2, 0.9])}, b)
    m.reset()  # a new pass may use the other form
    m.update({"c": torch.tensor([0.2, 0.9])}, b)
    assert m.compute()["c"]["auc"] == 1.0


def test_log_loss_functions_against_float64_references() -> None:
    z = np.array([-800.0, -40.0, -3.0, 0.0, 2.5, 40.0, 800.0])
    for y in (np.zeros(7), np.ones(7), np.full(7, 0.3)):
        want = float(
            np.mean(
                [
                    max(zi, 0) - yi * zi + math.log1p(math.exp(-abs(zi)))
                    for zi, yi in zip(z, y, strict=True)
                ]
            )
        )
        assert logloss_from_logits(z, y) == pytest.approx(want, rel=1e-13)
    # log p = log sigmoid(z) for moderate z: the same loss from log p
    zm = z[1:-1]
    lp = -np.logaddexp(0.0, -zm)
    y = np.array([0.0, 1.0, 0.0, 1.0, 0.0])
    assert logloss_from_log_probs(lp, y) == pytest.approx(logloss_from_logits(zm, y), rel=1e-12)
    # p rounded to 1 (log p == 0) with label 0 costs a large finite loss, not inf
    assert 100 < logloss_from_log_probs(np.array([0.0]), np.array([0.0])) < 110


def test_a_process_without_rows_reads_the_gathered_logits_as_logits() -> None:
    """Distributed evaluation: a process that scored no row must not read the others'
    logits as probabilities (the form of the scores is gathered too)."""
    schema = Schema(features=[DenseFeature(name="x")], tasks=[TaskSpec(name="c", kind="binary")])
    z = np.array([-3.0, 25.0, 30.0, 2.0, -40.0], dtype=np.float32)
    y = np.array([0.0, 1.0, 0.0, 1.0, 1.0])
    busy, idle = MetricSet(schema), MetricSet(schema)
    busy.update(ModelOutput({"c": torch.from_numpy(z)}), _batch({"c": y}))
    sent: list[np.ndarray] = []

    def record(a: np.ndarray) -> np.ndarray:
        sent.append(a)
        return a

    want = busy.compute(gather=record)
    arrays = iter(sent)

    def all_gather(a: np.ndarray) -> np.ndarray:  # the idle process: its rows + the busy one's
        return np.concatenate([a, next(arrays)])

    got = idle.compute(gather=all_gather)
    assert got == want
    assert got["c"]["logloss"] == pytest.approx(_bce_ref(z.astype(np.float64), y), rel=1e-12)
