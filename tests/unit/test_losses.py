"""Tests of mtlrec.losses: masks, sample weights, reductions, loss formulas, DDP denominators."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import torch
import torch.nn.functional as F

from mtlrec.batch import Batch, Features
from mtlrec.losses import (
    MultiTaskLoss,
    binary_loss_from_log_prob,
    focal_loss_with_logits,
    log1mexp,
)
from mtlrec.models import build_model
from mtlrec.models.base import ModelOutput
from mtlrec.schema import TaskSpec
from mtlrec.testing import tiny_dataset


def _batch(
    labels: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor] | None = None,
) -> Batch:
    n = int(next(iter(labels.values())).shape[0])
    if weights is None:
        weights = {k: m.to(torch.float32) for k, m in masks.items()}
    feats = Features(torch.zeros(n, 0, dtype=torch.int32), torch.zeros(n, 0))
    return Batch(feats, labels, masks, weights)


def _one(task: TaskSpec, z: torch.Tensor, y, m, w=None, reducer=None) -> torch.Tensor:
    b = _batch({task.name: y}, {task.name: m}, None if w is None else {task.name: w})
    return MultiTaskLoss([task], reducer)(ModelOutput({task.name: z}), b)[task.name]


BCE = TaskSpec(name="ctr", kind="binary")
MSE = TaskSpec(name="dur", kind="regression")


# -- empty masks ---------------------------------------------------------------------------------
def test_empty_mask_on_a_model_gives_zero_loss_and_zero_tower_gradient() -> None:
    pre, ds = tiny_dataset(n=200)
    torch.manual_seed(0)
    model = build_model(
        "shared_bottom", ds.schema, pre.table_sizes(), {"bottom_hidden": [8], "tower_hidden": [4]}
    )
    assert ds.masks is not None
    no_watch = torch.nonzero(~ds.masks[:, 1]).squeeze(1)[:16]  # rows where click == 0
    batch = ds.subset(no_watch).take(slice(0, 16))
    assert not bool(batch.masks["watch"].any())
    losses = MultiTaskLoss(ds.schema.tasks)(model(batch.features), batch)
    assert losses["watch"].item() == 0.0
    assert not math.isnan(losses["watch"].item())
    assert losses["click"].item() > 0.0
    (losses["click"] + losses["watch"]).backward()
    tower = model.task_parameters("watch")
    assert tower
    for p in tower:
        assert p.grad is None or bool((p.grad == 0).all())
    # the click tower does learn from this batch
    assert any(
        p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.task_parameters("click")
    )


@pytest.mark.parametrize("task", [BCE, MSE, TaskSpec(name="f", kind="binary", loss="focal")])
def test_empty_mask_gives_exactly_zero_and_zero_gradient(task: TaskSpec) -> None:
    z = torch.tensor([0.3, -2.0, 5.0], requires_grad=True)
    loss = _one(task, z, torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad is not None
    assert torch.equal(z.grad, torch.zeros(3))


# -- masked rows ---------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["bce", "focal", "mse", "huber"])
def test_masked_rows_get_exactly_zero_gradient(loss: str) -> None:
    kind = "binary" if loss in ("bce", "focal") else "regression"
    task = TaskSpec(name="t", kind=kind, loss=loss)
    z = torch.tensor([0.3, -0.2, 1.0, 0.5, -3.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    m = torch.tensor([True, False, True, False, True])
    _one(task, z, y, m).backward()
    assert z.grad is not None
    assert torch.equal(z.grad[~m], torch.zeros(2))
    assert bool((z.grad[m] != 0).all())


@pytest.mark.parametrize("loss", ["bce", "focal", "mse", "huber", "cross_entropy"])
def test_nan_and_huge_labels_on_masked_rows_do_not_leak(loss: str) -> None:
    kind = {"bce": "binary", "focal": "binary", "cross_entropy": "multiclass"}.get(
        loss, "regression"
    )
    task = TaskSpec(name="t", kind=kind, loss=loss, num_classes=3 if kind == "multiclass" else None)
    z = torch.tensor([0.3, -0.2, 1.0, 0.5], requires_grad=True)
    if kind == "multiclass":
        z = torch.tensor([[0.3, 0.1, 0.0]] * 4, requires_grad=True)
    y = torch.tensor([1.0, float("nan"), 0.0, 1e30])
    m = torch.tensor([True, False, True, False])
    loss_value = _one(task, z, y, m)
    clean = _one(task, z.detach(), torch.tensor([1.0, 0.0, 0.0, 0.0]), m)
    assert loss_value.item() == clean.item()
    loss_value.backward()
    assert z.grad is not None
    assert bool(torch.isfinite(z.grad).all()), z.grad
    assert bool((z.grad[~m] == 0).all())


def test_nan_labels_on_masked_rows_do_not_change_the_loss_value() -> None:
    """The forward value (unlike the gradient, see above) ignores masked labels."""
    for task in (BCE, MSE):
        z = torch.tensor([0.3, -0.2, 1.0])
        m = torch.tensor([True, False, True])
        dirty = _one(task, z, torch.tensor([1.0, float("nan"), 0.0]), m)
        clean = _one(task, z, torch.tensor([1.0, 0.0, 0.0]), m)
        assert dirty.item() == clean.item()


# -- reduction -----------------------------------------------------------------------------------
def test_mean_over_valid_rows_is_invariant_to_batch_size() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, generator=g, dtype=torch.float64)
    y = (torch.rand(10, generator=g) > 0.5).to(torch.float64)
    m = torch.tensor([True, False] * 5)
    small = _one(BCE, z, y, m)
    big = _one(BCE, z.repeat(2), y.repeat(2), m.repeat(2))
    torch.testing.assert_close(big, small, rtol=1e-14, atol=0.0)
    hand = F.binary_cross_entropy_with_logits(z[m], y[m])
    torch.testing.assert_close(small, hand, rtol=1e-14, atol=0.0)


def test_uniform_unit_weights_equal_the_unweighted_loss_exactly() -> None:
    z = torch.tensor([0.3, -0.2, 1.0, 0.5, -3.0])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    m = torch.tensor([True, False, True, True, True])
    weighted = _one(BCE, z, y, m, torch.ones(5))
    row = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    unweighted = torch.where(m, row, torch.zeros_like(row)).sum() / m.sum()
    assert weighted.item() == unweighted.item()
    torch.testing.assert_close(weighted, row[m].mean())


def test_weights_are_per_row_multipliers_divided_by_the_valid_count() -> None:
    z = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    m = torch.tensor([True, True, True, False])
    w = torch.tensor([2.0, 0.5, 3.0, 7.0], dtype=torch.float64)
    got = _one(BCE, z, y, m, w).item()

    def bce(zi: float, yi: float) -> float:
        p = 1.0 / (1.0 + math.exp(-zi))
        return -(yi * math.log(p) + (1 - yi) * math.log(1 - p))

    rows = [(0.5, 1.0, 2.0), (-1.0, 0.0, 0.5), (2.0, 0.0, 3.0)]
    expected = sum(wi * bce(zi, yi) for zi, yi, wi in rows) / 3  # valid count, not sum of w
    assert got == pytest.approx(expected, rel=1e-12)
    assert got != pytest.approx(sum(wi * bce(zi, yi) for zi, yi, wi in rows) / 5.5, rel=1e-3)


def test_regression_weights_and_mask() -> None:
    z = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    y = torch.tensor([0.0, 0.0, 10.0], dtype=torch.float64)
    m = torch.tensor([True, True, False])
    w = torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)
    assert _one(MSE, z, y, m, w).item() == pytest.approx((1 * 1 + 3 * 4) / 2)


def test_tasks_are_independent_and_keyed_by_name() -> None:
    a, b = TaskSpec(name="a", kind="binary"), TaskSpec(name="b", kind="regression")
    z = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([2.0, 3.0])}
    batch = _batch(
        {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 1.0])},
        {"a": torch.tensor([True, False]), "b": torch.tensor([True, True])},
    )
    out = MultiTaskLoss([b, a])(ModelOutput(z), batch)
    assert set(out) == {"a", "b"}
    assert out["a"].item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert out["b"].item() == pytest.approx((1.0 + 4.0) / 2)


# -- formulas ------------------------------------------------------------------------------------
def _data(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g) * 3
    y01 = (torch.rand(n, generator=g) > 0.5).float()
    yr = torch.randn(n, generator=g) * 2
    m = torch.rand(n, generator=g) > 0.3
    m[0] = True
    m[1] = False
    return z, y01, yr, m


def test_bce_equals_torch_on_valid_rows() -> None:
    z, y, _, m = _data()
    got = _one(BCE, z, y, m)
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(z[m], y[m]))


def test_mse_equals_torch_on_valid_rows() -> None:
    z, _, y, m = _data()
    torch.testing.assert_close(_one(MSE, z, y, m), F.mse_loss(z[m], y[m]))


@pytest.mark.parametrize("delta", [0.5, 1.0, 3.0])
def test_huber_equals_torch_on_valid_rows(delta: float) -> None:
    task = TaskSpec(name="h", kind="regression", loss="huber", huber_delta=delta)
    z, _, y, m = _data()
    torch.testing.assert_close(_one(task, z, y, m), F.huber_loss(z[m], y[m], delta=delta))
    # the huber loss differs from mse here (some residuals exceed delta)
    assert abs(_one(task, z, y, m).item() - _one(MSE, z, y, m).item()) > 1e-3


def test_cross_entropy_for_multiclass() -> None:
    task = TaskSpec(name="cls", kind="multiclass", num_classes=4)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(9, 4, generator=g)
    y = torch.randint(0, 4, (9,), generator=g).float()
    m = torch.tensor([True, True, False, True, False, True, True, True, False])
    torch.testing.assert_close(_one(task, z, y, m), F.cross_entropy(z[m], y[m].long()))


def test_focal_with_gamma_zero_and_no_alpha_equals_bce() -> None:
    task = TaskSpec(name="f", kind="binary", loss="focal", focal_gamma=0.0)
    z, y, _, m = _data()
    torch.testing.assert_close(_one(task, z, y, m), _one(BCE, z, y, m))


def test_focal_analytic_value_for_one_row() -> None:
    z, y = torch.tensor([2.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    p = 1.0 / (1.0 + math.exp(-2.0))
    expected = (1.0 - p) ** 2 * -math.log(p)
    got = focal_loss_with_logits(z, y, gamma=2.0, alpha=None).item()
    assert got == pytest.approx(expected, rel=1e-12)
    task = TaskSpec(name="f", kind="binary", loss="focal", focal_gamma=2.0)
    assert _one(task, z, y, torch.tensor([True])).item() == pytest.approx(expected, rel=1e-12)
    # alpha weighs the positive class by alpha and the negative class by 1 - alpha
    assert focal_loss_with_logits(z, y, 2.0, 0.25).item() == pytest.approx(0.25 * expected)
    neg = focal_loss_with_logits(-z, 1 - y, 2.0, 0.25).item()
    assert neg == pytest.approx(0.75 * expected, rel=1e-12)


def test_focal_down_weights_easy_examples() -> None:
    z = torch.tensor([4.0, -0.5], dtype=torch.float64)  # easy positive, hard positive
    y = torch.ones(2, dtype=torch.float64)
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    focal = focal_loss_with_logits(z, y, gamma=2.0, alpha=None)
    ratio = focal / bce  # (1 - p_t)^gamma
    p = torch.sigmoid(z)
    torch.testing.assert_close(ratio, (1 - p) ** 2)
    assert bool((focal < bce).all())
    assert ratio[0] < 1e-3 < ratio[1]


# -- log-probability losses ----------------------------------------------------------------------
@pytest.mark.parametrize("p", [1e-6, 0.5, 1 - 1e-6])
@pytest.mark.parametrize("y", [0.0, 1.0])
def test_binary_loss_from_log_prob_equals_bce(p: float, y: float) -> None:
    log_p = torch.tensor([math.log(p)], dtype=torch.float64)
    got = binary_loss_from_log_prob(log_p, torch.tensor([y], dtype=torch.float64)).item()
    expected = -(y * math.log(p) + (1 - y) * math.log1p(-p))
    assert got == pytest.approx(expected, rel=1e-6)
    bce = F.binary_cross_entropy(
        torch.tensor([p], dtype=torch.float64), torch.tensor([y], dtype=torch.float64)
    ).item()
    assert got == pytest.approx(bce, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_loss_from_log_prob_is_finite_for_extreme_log_p(dtype: torch.dtype) -> None:
    log_p = torch.tensor([-1e-12, -1e-12, -80.0, -80.0, 0.0], dtype=dtype, requires_grad=True)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0], dtype=dtype)
    loss = binary_loss_from_log_prob(log_p, y)
    assert bool(torch.isfinite(loss).all()), loss
    assert loss[3].item() == pytest.approx(80.0)
    assert 0.0 <= loss[2].item() < 1e-30
    loss.sum().backward()
    assert log_p.grad is not None
    assert bool(torch.isfinite(log_p.grad).all()), log_p.grad


def test_log_prob_output_is_used_for_derived_tasks() -> None:
    task = TaskSpec(name="ctcvr", kind="binary")
    p = torch.tensor([0.2, 0.7, 0.01])
    y = torch.tensor([0.0, 1.0, 1.0])
    m = torch.ones(3, dtype=torch.bool)
    out = ModelOutput(logits={}, log_probs={"ctcvr": p.log()})
    got = MultiTaskLoss([task])(out, _batch({"ctcvr": y}, {"ctcvr": m}))["ctcvr"]
    torch.testing.assert_close(got, F.binary_cross_entropy(p, y), rtol=1e-5, atol=1e-6)


def _log1mexp_exact(x: float) -> float:
    """``log(1 - exp(x))`` with 60 significant digits (reference for any x < 0)."""
    with localcontext() as ctx:
        ctx.prec = 60
        return float((1 - Decimal(x).exp()).ln())


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-15), (torch.float32, 5e-7)])
def test_log1mexp_is_accurate(dtype: torch.dtype, rtol: float) -> None:
    mags = torch.logspace(-10, math.log10(50.0), 400, dtype=torch.float64)
    xs = torch.cat([-mags, torch.tensor([-math.log(2.0), -0.6931, -0.6932])]).to(dtype)
    got = log1mexp(xs).to(torch.float64)
    for x, g in zip(xs.tolist(), got.tolist(), strict=True):
        ref = _log1mexp_exact(x)
        assert math.isfinite(g)
        assert abs(g - ref) <= rtol * abs(ref), (x, g, ref)
        if x >= -math.log(2.0):  # where the float64 expm1 formula is itself accurate
            naive = math.log(-math.expm1(x))
            assert abs(g - naive) <= max(rtol, 1e-15) * abs(naive), (x, g, naive)


def test_log1mexp_keeps_tiny_values_for_very_negative_x() -> None:
    """``log(-expm1(x))`` rounds to 0 below x ~ -37 in float64; log1mexp must not."""
    x = torch.tensor([-40.0, -50.0], dtype=torch.float64)
    got = log1mexp(x)
    assert bool((got < 0).all())
    torch.testing.assert_close(got, -torch.exp(x), rtol=1e-12, atol=0.0)


# -- distributed denominators --------------------------------------------------------------------
def test_count_reducer_sets_the_denominator() -> None:
    z, y, _, m = _data()
    local = _one(BCE, z, y, m)
    halved = _one(BCE, z, y, m, reducer=lambda c: c / 2)
    torch.testing.assert_close(halved, 2 * local)


def test_count_reducer_with_no_valid_row_anywhere_gives_zero() -> None:
    z = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = _one(BCE, z, torch.ones(2), torch.zeros(2, dtype=torch.bool), reducer=lambda c: c * 0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros(2))


def test_ddp_simulation_averages_to_the_full_batch_gradient() -> None:
    torch.manual_seed(0)
    n, d = 16, 5
    x = torch.randn(n, d, dtype=torch.float64)
    y = (torch.rand(n) > 0.5).to(torch.float64)
    # unequal valid counts per rank: a per-process mean would be wrong
    m = torch.tensor([True] * 7 + [False] + [True] * 2 + [False] * 6)
    lin = torch.nn.Linear(d, 1).double()

    def grads(rows: slice, reducer=None) -> torch.Tensor:
        lin.zero_grad()
        z = lin(x[rows]).squeeze(-1)
        _one(BCE, z, y[rows], m[rows], reducer=reducer).backward()
        return torch.cat([p.grad.reshape(-1).clone() for p in lin.parameters()])

    full = grads(slice(0, n))
    world = 2
    global_count = m.sum().to(torch.float64)
    reducer = lambda c: global_count / world  # noqa: E731  all-reduce(count) / world_size
    ranks = [grads(slice(0, n // 2), reducer), grads(slice(n // 2, n), reducer)]
    torch.testing.assert_close((ranks[0] + ranks[1]) / world, full, rtol=1e-12, atol=1e-14)
    naive = [grads(slice(0, n // 2)), grads(slice(n // 2, n))]
    assert not torch.allclose((naive[0] + naive[1]) / world, full, rtol=1e-3, atol=1e-6)

    # the same on logits directly (a leaf standing for a shared model's output)
    z = lin(x).squeeze(-1).detach().requires_grad_(True)
    _one(BCE, z, y, m).backward()
    full_z = z.grad.clone()
    z.grad = None
    for rows in (slice(0, n // 2), slice(n // 2, n)):
        _one(BCE, z[rows], y[rows], m[rows], reducer=reducer).backward()
    torch.testing.assert_close(z.grad / world, full_z, rtol=1e-12, atol=1e-14)
