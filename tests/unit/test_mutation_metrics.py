"""Tests that kill the mutants of ``mtlrec.metrics`` the rest of the suite let live
(``python benchmarks/mutation.py metrics``): the input contract of every metric function (each
argument named in its shape and length errors, float64 throughout, sample weights applied),
clipping bounds, warnings, thresholds and the direction of each metric."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from mtlrec.batch import Batch, Features
from mtlrec.metrics import MetricSet, pointwise, ranking
from mtlrec.metrics.selection import HIGHER_IS_BETTER, is_better
from mtlrec.models.base import ModelOutput
from mtlrec.schema import DenseFeature, Schema, TaskSpec

N = 12
RNG = np.random.default_rng(0)
PROB = RNG.uniform(0.05, 0.95, N)
LABEL = (np.arange(N) % 3 == 0).astype(np.float64)  # both classes
LOGIT = RNG.normal(0, 2, N)
REAL = RNG.normal(0, 1, N) + 0.8 * LABEL
PROBS3 = RNG.dirichlet(np.ones(3), N)
CLASS3 = (np.arange(N) % 3).astype(np.float64)
GROUP = np.arange(N) % 2  # both classes in each group

# function, its array arguments (in call order) and their values; "weights" comes last
CASES: dict[str, tuple[Callable[..., float], dict[str, np.ndarray]]] = {
    "logloss": (pointwise.logloss, {"probs": PROB, "labels": LABEL}),
    "logloss_from_logits": (pointwise.logloss_from_logits, {"logits": LOGIT, "labels": LABEL}),
    "logloss_from_log_probs": (
        pointwise.logloss_from_log_probs,
        {"log_probs": np.log(PROB), "labels": LABEL},
    ),
    "multiclass_logloss": (pointwise.multiclass_logloss, {"probs": PROBS3, "labels": CLASS3}),
    "multiclass_logloss_from_log_probs": (
        pointwise.multiclass_logloss_from_log_probs,
        {"log_probs": np.log(PROBS3), "labels": CLASS3},
    ),
    "accuracy": (pointwise.accuracy, {"probs": PROB, "labels": LABEL}),
    "accuracy_multiclass": (pointwise.accuracy, {"probs": PROBS3, "labels": CLASS3}),
    "mse": (pointwise.mse, {"preds": REAL, "labels": LABEL}),
    "mae": (pointwise.mae, {"preds": REAL, "labels": LABEL}),
    "rmse": (pointwise.rmse, {"preds": REAL, "labels": LABEL}),
    "auc": (ranking.auc, {"scores": REAL, "labels": LABEL}),
    "gauc": (ranking.gauc, {"scores": REAL, "labels": LABEL, "groups": GROUP}),
}


def _call(name: str, **override: Any) -> float:
    fn, args = CASES[name]
    return fn(**{**args, **override})


@pytest.mark.parametrize("name", list(CASES))
def test_integer_weights_equal_repeated_rows(name: str) -> None:
    """A weight of k counts a row k times (the weights reach the mean, not just the checks)."""
    fn, args = CASES[name]
    k = (np.arange(N) * 7) % 5 + 1  # 1..5, not uniform
    repeated = {a: np.repeat(v, k, axis=0) for a, v in args.items()}
    weighted = fn(**args, weights=k.astype(np.float64))
    if name == "gauc":  # a group's weight in the average stays its row count
        per = [ranking.auc(REAL[g == GROUP], LABEL[g == GROUP], k[g == GROUP]) for g in range(2)]
        assert weighted == pytest.approx(np.mean(per), abs=1e-12)
        return
    assert weighted == pytest.approx(fn(**repeated), abs=1e-12)
    assert weighted != pytest.approx(fn(**args), abs=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_each_argument_is_named_in_its_length_error(name: str) -> None:
    fn, args = CASES[name]
    full = {**args, "weights": np.ones(N)}
    for short in full:
        if name == "gauc" and short == "groups":
            continue  # groups are any sortable ids; their length check is the same dict
        given = {**full, short: full[short][:-1]}
        with pytest.raises(ValueError, match="differ in length") as err:
            fn(**given)
        msg = str(err.value)
        assert f"'{short}': {N - 1}" in msg, msg
        for other in full:
            if other != short:
                assert f"'{other}': {N}" in msg, msg


@pytest.mark.parametrize("name", list(CASES))
def test_each_argument_is_named_in_its_shape_error(name: str) -> None:
    fn, args = CASES[name]
    full = {**args, "weights": np.ones(N)}
    for arg, value in full.items():
        if arg == "groups":
            continue
        if value.ndim == 2:  # class probabilities: [N, C]
            if name.startswith("accuracy"):
                continue  # [N] probabilities are a valid binary input
            bad, expected = value[:, 0], f"{arg} must be [N, C], got shape ({N},)"
        else:
            bad, expected = np.stack([value, value], axis=1), f"{arg} must be 1-D"
            if name == "accuracy" and arg == "probs":
                continue  # [N, 2] probabilities are a valid two-class input
        with pytest.raises(ValueError) as err:
            fn(**{**full, arg: bad})
        assert str(err.value).startswith(expected), str(err.value)


@pytest.mark.parametrize("name", list(CASES))
def test_computed_in_float64_whatever_the_input_dtype(name: str) -> None:
    """float16 inputs give what their float64 copies give (to float64 rounding)."""
    fn, args = CASES[name]
    half = {a: (v.astype(np.float16) if a != "labels" else v) for a, v in args.items()}
    wide = {a: v.astype(np.float64) for a, v in half.items()}
    assert fn(**half) == pytest.approx(fn(**wide), abs=1e-12)


def test_a_column_of_binary_probabilities_is_binary_accuracy() -> None:
    assert pointwise.accuracy(PROB[:, None], LABEL) == pointwise.accuracy(PROB, LABEL)
    assert pointwise.accuracy(PROB[:, None], LABEL) != pointwise.accuracy(
        np.zeros((N, 1)) + 0.9, LABEL
    )


def test_binary_accuracy_threshold_is_strict() -> None:
    assert pointwise.accuracy([0.5, 0.5000001], [0.0, 1.0]) == 1.0


def test_class_labels_are_rounded_and_checked() -> None:
    assert pointwise.accuracy(PROBS3, CLASS3 + 0.2) == pointwise.accuracy(PROBS3, CLASS3)
    with pytest.raises(ValueError, match=r"class labels must lie in 0\.\.2"):
        pointwise.multiclass_logloss(PROBS3, CLASS3 + 1)


def test_multiclass_logloss_clips_both_ends() -> None:
    eps = 1e-7
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert pointwise.multiclass_logloss(probs, [0, 0]) == pytest.approx(
        (-math.log1p(-eps) - math.log(eps)) / 2, rel=1e-12
    )
    assert pointwise.multiclass_logloss(probs, [0, 1]) == pytest.approx(-math.log1p(-eps))


def test_zero_eps_gives_infinite_loss_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pointwise.logloss([0.0, 0.5], [1.0, 1.0], eps=0.0) == math.inf
        assert pointwise.multiclass_logloss([[0.0, 1.0]], [0], eps=0.0) == math.inf
        assert math.isnan(pointwise.logloss([0.0], [0.0], eps=0.0))  # 0 * log 0: no warning


def test_log_prob_loss_branches_at_minus_log_two() -> None:
    """Both branches of log(1 - e^lp) agree with the float64 reference around -log 2."""
    lp = np.array([-math.log(2) - 1e-9, -math.log(2), -math.log(2) + 1e-9, -1e-9, -30.0])
    for x in lp:
        ref = -math.log(-math.expm1(x))
        assert pointwise.logloss_from_log_probs([x], [0.0]) == pytest.approx(ref, rel=1e-9)


# -- selection ------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["a.b.auc", "a/b/logloss", "x.y/z.mse", "task.sub/gauc"])
def test_direction_reads_the_last_component(metric: str) -> None:
    tail = metric.replace("/", ".").split(".")[-1]
    higher = HIGHER_IS_BETTER[tail]
    assert is_better(metric, 1.0, 0.5) is higher
    assert is_better(metric, 0.5, 1.0) is (not higher)


@pytest.mark.parametrize("metric", ["logloss", "click/mse", "auc", "click/auc"])
def test_an_equal_value_is_not_better(metric: str) -> None:
    assert is_better(metric, 0.3, 0.3) is False


def test_an_unknown_metric_is_named_with_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown metric 'click/ndcg'; known metrics are \["):
        is_better("click/ndcg", 1.0, 0.0)


@pytest.mark.parametrize("name", list(CASES))
def test_a_column_input_is_its_vector(name: str) -> None:
    """``[N, 1]`` arrays are flattened (the first and only column), for every 1-D argument."""
    fn, args = CASES[name]
    for arg, value in args.items():
        if value.ndim == 1 and arg != "groups":
            assert fn(**{**args, arg: value[:, None]}) == pytest.approx(fn(**args), abs=1e-15)


@pytest.mark.parametrize("name", list(CASES))
def test_empty_input_is_nan(name: str) -> None:
    fn, args = CASES[name]
    assert math.isnan(fn(**{a: v[:0] for a, v in args.items()}))


def test_zero_total_weight_is_nan_and_a_small_total_is_a_mean() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(pointwise.mse([1.0, 2.0], [0.0, 0.0], weights=[0.0, 0.0]))
    assert pointwise.mse([1.0, 2.0], [0.0, 0.0], weights=[0.1, 0.3]) == pytest.approx(3.25)


def test_a_label_of_one_half_is_negative_for_auc() -> None:
    assert ranking.auc([0.9, 0.1, 0.5], [0.5, 1.0, 0.0]) == 0.0  # 0.5: negative, above 1.0
    assert ranking.auc([0.9, 0.1, 0.5], [0.51, 1.0, 0.0]) == 0.5


def test_nan_scores_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"^scores contain NaN; AUC is undefined$"):
        ranking.auc([0.1, math.nan], [0.0, 1.0])


# -- MetricSet ------------------------------------------------------------------------------------
def _ms_schema(*tasks: TaskSpec, groups: bool = False) -> Schema:
    return Schema(
        features=[DenseFeature(name="x")], tasks=list(tasks), group_column="u" if groups else None
    )


def _ms_batch(labels: dict[str, list[float]], masks: dict | None = None, groups=None) -> Batch:
    n = len(next(iter(labels.values())))
    return Batch(
        Features(torch.zeros(n, 0, dtype=torch.int32), torch.zeros(n, 0)),
        labels={k: torch.tensor(v, dtype=torch.float32) for k, v in labels.items()},
        masks=masks if masks is not None else {k: torch.ones(n, dtype=torch.bool) for k in labels},
        weights={k: torch.ones(n) for k in labels},
        groups=None if groups is None else torch.tensor(groups, dtype=torch.int64),
    )


BIN = TaskSpec(name="click", kind="binary")
REG = TaskSpec(name="watch", kind="regression")
CLS = TaskSpec(name="genre", kind="multiclass", num_classes=3)


def test_a_regression_task_keeps_its_form_from_mappings_and_model_outputs() -> None:
    ms = MetricSet(_ms_schema(REG))
    batch = _ms_batch({"watch": [1.0, 2.0]})
    ms.update({"watch": torch.tensor([1.5, 2.5])}, batch)
    ms.update(ModelOutput(logits={"watch": torch.tensor([1.0, 2.0])}), batch)
    assert ms.compute()["watch"]["mse"] == pytest.approx(0.125)


def test_a_binary_task_refuses_a_change_of_form_by_name() -> None:
    ms = MetricSet(_ms_schema(BIN))
    batch = _ms_batch({"click": [1.0, 0.0]})
    ms.update({"click": torch.tensor([0.6, 0.4])}, batch)
    with pytest.raises(ValueError) as err:
        ms.update(ModelOutput(logits={"click": torch.tensor([1.0, -1.0])}), batch)
    assert str(err.value) == (
        "task 'click': scores given as logit after prob in the same evaluation; pass "
        "ModelOutputs or probabilities throughout"
    )


def test_missing_predictions_and_labels_are_named() -> None:
    ms = MetricSet(_ms_schema(BIN))
    batch = _ms_batch({"click": [1.0, 0.0]})
    with pytest.raises(KeyError, match="no prediction for task 'click'"):
        ms.update({"other": torch.tensor([0.5, 0.5])}, batch)
    with pytest.raises(KeyError, match="batch has no labels for task 'click'"):
        ms.update({"click": torch.tensor([0.5, 0.5])}, _ms_batch({"other": [1.0, 0.0]}))


def test_groups_in_some_batches_only_are_refused_by_message() -> None:
    ms = MetricSet(_ms_schema(BIN, groups=True))
    ms.update({"click": torch.tensor([0.6, 0.4])}, _ms_batch({"click": [1, 0]}, groups=[1, 1]))
    with pytest.raises(ValueError, match=r"^some batches carry groups and others do not; gauc"):
        ms.update({"click": torch.tensor([0.6, 0.4])}, _ms_batch({"click": [1, 0]}))


def test_a_prediction_of_the_wrong_length_is_refused() -> None:
    ms = MetricSet(_ms_schema(BIN))
    with pytest.raises(ValueError) as err:
        ms.update({"click": torch.tensor([0.6, 0.4, 0.5])}, _ms_batch({"click": [1, 0]}))
    assert str(err.value) == "task 'click': expected predictions of shape [2], got (3,)"


def test_a_task_without_a_mask_keeps_every_row_and_integer_masks_select() -> None:
    ms = MetricSet(_ms_schema(BIN, REG))
    labels = {"click": [1.0, 0.0, 1.0], "watch": [1.0, 2.0, 4.0]}
    masks = {"watch": torch.tensor([1, 0, 1])}  # int64 0/1, not indices; click: none
    preds = {"click": torch.tensor([0.9, 0.2, 0.4]), "watch": torch.tensor([1.0, 9.0, 3.0])}
    ms.update(preds, _ms_batch(labels, masks))
    out = ms.compute()
    assert out["click"]["count"] == 3
    assert out["watch"]["count"] == 2 and out["watch"]["mse"] == pytest.approx(0.5)


def test_multiclass_log_softmax_is_taken_in_float64_for_float64_and_half_logits() -> None:
    z = torch.tensor([[30.0, 0.0, -30.0], [0.0, 1e-3, 0.0]], dtype=torch.float64)
    y = [0.0, 1.0]
    ref = -(torch.log_softmax(z, dim=-1)[[0, 1], [0, 1]]).mean().item()
    ms = MetricSet(_ms_schema(CLS))
    ms.update(ModelOutput(logits={"genre": z}), _ms_batch({"genre": y}))
    assert ms.compute()["genre"]["logloss"] == pytest.approx(ref, rel=1e-14, abs=0)
    zb = z.to(torch.bfloat16)
    ref_b = -(torch.log_softmax(zb.double(), dim=-1)[[0, 1], [0, 1]]).mean().item()
    ms = MetricSet(_ms_schema(CLS))
    ms.update(ModelOutput(logits={"genre": zb}), _ms_batch({"genre": y}))
    assert ms.compute()["genre"]["logloss"] == pytest.approx(ref_b, rel=1e-6)


def test_multiclass_probabilities_give_the_probability_log_loss() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], dtype=torch.float64)
    ms = MetricSet(_ms_schema(CLS))
    ms.update({"genre": p}, _ms_batch({"genre": [0.0, 1.0]}))
    expected = -(math.log(0.7) + math.log(0.6)) / 2
    assert ms.compute()["genre"]["logloss"] == pytest.approx(expected, rel=1e-12)


def test_group_ids_beyond_float_precision_stay_distinct() -> None:
    big = 2**53
    ms = MetricSet(_ms_schema(BIN, groups=True))
    batch = _ms_batch({"click": [1, 0, 1, 0]}, groups=[big, big, big + 1, big + 1])
    ms.update({"click": torch.tensor([0.9, 0.1, 0.2, 0.8])}, batch)
    assert ms.compute()["click"]["gauc"] == pytest.approx(0.5)  # 1.0 and 0.0, two groups


def test_metrics_are_float64_whatever_the_gather_returns() -> None:
    ms = MetricSet(_ms_schema(BIN))
    ms.update({"click": torch.tensor([0.9, 0.1, 0.2])}, _ms_batch({"click": [1, 0, 0]}))

    def to_half(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float16) if a.dtype.kind == "f" else a

    out = ms.compute(gather=to_half)["click"]
    assert out["pos_rate"] == pytest.approx(1 / 3, abs=1e-12)
    half = np.array([0.9, 0.1, 0.2], np.float32).astype(np.float16).astype(np.float64)
    assert out["pred_mean"] == pytest.approx(half.mean(), abs=1e-12)


def _merge(other: list[np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A gather that appends another process's arrays, in the order compute asks for them."""
    it = iter(other)
    return lambda a: np.concatenate([a.reshape(-1), next(it).reshape(-1)])


def test_a_process_without_rows_takes_the_others_form() -> None:
    ms = MetricSet(_ms_schema(BIN))  # this process saw nothing
    log_prob_code = np.array([2], np.int64)  # _FORMS.index("log_prob")
    other = [np.log([0.8, 0.3]), np.array([1.0, 0.0]), log_prob_code]
    out = ms.compute(gather=_merge(other))["click"]
    assert out["count"] == 2 and out["auc"] == 1.0
    assert out["logloss"] == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert out["pred_mean"] == pytest.approx(0.55)


def test_groups_are_tracked_when_batches_carry_them_whatever_the_schema() -> None:
    ms = MetricSet(_ms_schema(BIN))  # no group column declared
    batch = _ms_batch({"click": [1, 0, 1, 0]}, groups=[1, 1, 2, 2])
    ms.update({"click": torch.tensor([0.9, 0.1, 0.2, 0.8])}, batch)
    assert ms.compute()["click"]["gauc"] == pytest.approx(0.5)


def test_gauc_groups_of_any_shape_are_flattened() -> None:
    flat = ranking.gauc(REAL, LABEL, GROUP)
    assert ranking.gauc(REAL, LABEL, GROUP[None, :]) == flat
    assert ranking.gauc(REAL, LABEL, GROUP[:, None]) == flat


def test_processes_with_different_forms_are_refused_by_message() -> None:
    ms = MetricSet(_ms_schema(BIN))
    ms.update({"click": torch.tensor([0.9, 0.1])}, _ms_batch({"click": [1, 0]}))  # prob
    other = [np.array([2.0, -2.0]), np.array([1.0, 0.0]), np.array([1], np.int64)]
    with pytest.raises(ValueError) as err:
        ms.compute(gather=_merge(other))
    assert str(err.value) == "task 'click': scores of different forms ['logit', 'prob'] to combine"


def test_a_model_output_without_the_task_is_named() -> None:
    ms = MetricSet(_ms_schema(BIN))
    with pytest.raises(KeyError, match="no prediction for task 'click'"):
        ms.update(ModelOutput(logits={"other": torch.zeros(2)}), _ms_batch({"click": [1, 0]}))


def test_binary_accuracy_names_probs_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"^probs must be 1-D, got shape \(2, 1, 1\)"):
        pointwise.accuracy(np.zeros((2, 1, 1)), [0.0, 1.0])
