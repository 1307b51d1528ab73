"""Numerical robustness of the losses, against float64 references written here.

- focal loss with 0 < gamma < 1: finite value and gradient at every logit (issue 12.4);
- ESMM's log-probability loss: exact value and gradient for confident mistakes (issue 12.6);
- NaN / inf labels and weights outside a task's mask change nothing (issue 17.2).
"""

from __future__ import annotations

import math

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
from mtlrec.models.base import ModelOutput
from mtlrec.schema import TaskSpec

NAN, INF = float("nan"), float("inf")


# -- focal loss ---------------------------------------------------------------------------------
def _sig(x: float) -> float:
    """sigmoid in float64 without cancellation (exp of a non-positive argument only)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _focal_ref(z: float, y: int, gamma: float, alpha: float | None) -> tuple[float, float]:
    """Lin et al. (ICCV 2017) Eq. 5 and its derivative in z, float64 by hand.

    With z_t = z for y = 1 and -z for y = 0, p_t = sigmoid(z_t), q = 1 - p_t = sigmoid(-z_t):
    FL = a_t q^g (-log p_t) and dFL/dz_t = -a_t q^g (g p_t (-log p_t) + q).
    """
    zt = z if y == 1 else -z
    p, q = _sig(zt), _sig(-zt)
    nlp = max(-zt, 0.0) + math.log1p(math.exp(-abs(zt)))  # -log p_t
    a = 1.0 if alpha is None else (alpha if y == 1 else 1.0 - alpha)
    value = a * q**gamma * nlp
    d_zt = -a * q**gamma * (gamma * p * nlp + q)
    return value, d_zt if y == 1 else -d_zt


GRID = [-60.0, -40.0, -20.0, -17.6, -10.0, -3.0, -0.5, 0.0, 0.7, 4.0, 17.6, 18.0, 25.0, 40.0, 60.0]


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.9, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_value_and_gradient_equal_the_float64_reference(
    gamma: float, alpha: float | None
) -> None:
    for y in (0, 1):
        want = [_focal_ref(z, y, gamma, alpha) for z in GRID]
        for dtype, rtol, atol in ((torch.float64, 1e-6, 0.0), (torch.float32, 1e-5, 1e-6)):
            z = torch.tensor(GRID, dtype=dtype, requires_grad=True)
            loss = focal_loss_with_logits(z, torch.full_like(z, float(y)), gamma, alpha)
            (grad,) = torch.autograd.grad(loss.sum(), z)
            assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all()), (
                dtype,
                y,
                loss,
                grad,
            )
            for i, zi in enumerate(GRID):
                v, d = want[i]
                assert abs(loss[i].item() - v) <= atol + rtol * abs(v), (dtype, y, zi, loss[i], v)
                assert abs(grad[i].item() - d) <= atol + rtol * abs(d), (dtype, y, zi, grad[i], d)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.99])
def test_focal_gradient_is_finite_at_every_float32_logit(gamma: float) -> None:
    """0 < gamma < 1: ``(1 - p_t)^gamma`` has an infinite slope at p_t = 1, which float32
    reaches beyond |z| ~ 17.5; the loss must still give a finite gradient there."""
    mags = torch.logspace(-3, 38, 300, dtype=torch.float64).to(torch.float32)
    z = torch.cat([-mags, torch.zeros(1), mags]).requires_grad_(True)
    for y in (0.0, 1.0):
        loss = focal_loss_with_logits(z, torch.full_like(z, y), gamma, 0.25)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert bool(torch.isfinite(grad).all()), z[~torch.isfinite(grad)]
        # easy rows (confidently right) have a vanishing gradient, not a NaN
        easy = (z > 30) if y == 1.0 else (z < -30)
        assert bool((grad[easy].abs() < 1e-12).all())


def test_focal_in_a_task_trains_without_nan_on_saturated_logits() -> None:
    task = TaskSpec(name="f", kind="binary", loss="focal", focal_gamma=0.5)
    z = torch.tensor([25.0, -25.0, 30.0, -3.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0, 1.0])
    m = torch.ones(4, dtype=torch.bool)
    batch = Batch(
        Features(torch.zeros(4, 0, dtype=torch.int32), torch.zeros(4, 0)),
        {"f": y},
        {"f": m},
        {"f": torch.ones(4)},
    )
    MultiTaskLoss([task])(ModelOutput({"f": z}), batch)["f"].backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all()), z.grad
    assert z.grad[3].item() < 0  # the hard positive still learns


def test_focal_soft_labels_mix_the_two_classes() -> None:
    z = torch.tensor([-2.0, 0.3, 5.0], dtype=torch.float64)
    y = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    got = focal_loss_with_logits(z, y, 0.5, None)
    for i in range(3):
        pos, _ = _focal_ref(z[i].item(), 1, 0.5, None)
        neg, _ = _focal_ref(z[i].item(), 0, 0.5, None)
        want = y[i].item() * pos + (1 - y[i].item()) * neg
        assert got[i].item() == pytest.approx(want, rel=1e-12)
    # gamma 0: the binary cross-entropy, soft labels included
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    torch.testing.assert_close(focal_loss_with_logits(z, y, 0.0, None), bce, rtol=1e-12, atol=0)


# -- log-probability loss (ESMM) ----------------------------------------------------------------
def _log_sig(x: float) -> float:
    return -(max(-x, 0.0) + math.log1p(math.exp(-abs(x))))


def _esmm_ref(a: float, b: float, y: int) -> tuple[float, float, float]:
    """BCE of pCTCVR = sigmoid(a) sigmoid(b) and its derivatives in a and b, float64 by hand.

    1 - pq = sigmoid(-a) + sigmoid(a) sigmoid(-b) (no cancellation), and
    d/da -log(1 - pq) = p (1 - p) q / (1 - pq); d/da -log(pq) = -(1 - p).
    """
    p, q = _sig(a), _sig(b)
    if y == 1:
        return -(_log_sig(a) + _log_sig(b)), -_sig(-a), -_sig(-b)
    one_minus = _sig(-a) + p * _sig(-b)
    value = -math.log1p(-p * q) if p * q < 0.5 else -math.log(one_minus)
    return value, p * _sig(-a) * q / one_minus, q * _sig(-b) * p / one_minus


LOGITS = [-60.0, -30.0, -17.0, -5.0, -1.0, 0.0, 0.5, 3.0, 10.0, 17.0, 20.0, 30.0, 45.0, 60.0]


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-9), (torch.float32, 2e-5)])
def test_esmm_log_prob_loss_equals_the_float64_reference(dtype: torch.dtype, rtol: float) -> None:
    pairs = [(a, b) for a in LOGITS for b in LOGITS]
    za = torch.tensor([a for a, _ in pairs], dtype=dtype, requires_grad=True)
    zb = torch.tensor([b for _, b in pairs], dtype=dtype, requires_grad=True)
    log_p = F.logsigmoid(za) + F.logsigmoid(zb)  # ESMM's log pCTCVR
    for y in (0, 1):
        loss = binary_loss_from_log_prob(log_p, torch.full_like(log_p, float(y)))
        ga, gb = torch.autograd.grad(loss.sum(), (za, zb), retain_graph=True)
        for i, (a, b) in enumerate(pairs):
            v, da, db = _esmm_ref(a, b, y)
            tiny = 1e-30 if dtype == torch.float32 else 0.0  # float32 underflow of e^-60 terms
            assert abs(loss[i].item() - v) <= rtol * abs(v) + tiny, (a, b, y, loss[i].item(), v)
            assert abs(ga[i].item() - da) <= rtol * abs(da) + tiny, (a, b, y, ga[i].item(), da)
            assert abs(gb[i].item() - db) <= rtol * abs(db) + tiny, (a, b, y, gb[i].item(), db)


def test_esmm_confident_false_positive_keeps_its_loss_and_gradient() -> None:
    """Both logits at 30, no conversion: the loss is 29.3 and each logit's gradient 1/2 (the
    old clamp of log p at -1e-7 capped the loss at 16.1 with gradient 0)."""
    za = torch.tensor([30.0], requires_grad=True)
    zb = torch.tensor([30.0], requires_grad=True)
    loss = binary_loss_from_log_prob(F.logsigmoid(za) + F.logsigmoid(zb), torch.zeros(1))
    loss.backward()
    assert loss.item() == pytest.approx(30.0 - math.log(2.0), rel=1e-5)
    assert za.grad is not None and zb.grad is not None
    assert za.grad.item() == pytest.approx(0.5, rel=1e-5)
    assert zb.grad.item() == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_prob_loss_gradient_is_finite_up_to_log_p_zero(dtype: torch.dtype) -> None:
    log_p = torch.tensor(
        [0.0, -1e-45, -1e-38, -1e-31, -1e-20, -1e-12, -1e-3, -0.7, -50.0], dtype=dtype
    ).requires_grad_(True)
    for y in (0.0, 1.0):
        loss = binary_loss_from_log_prob(log_p, torch.full_like(log_p, y))
        (grad,) = torch.autograd.grad(loss.sum(), log_p)
        assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all()), (loss, grad)


def test_log1mexp_gradient_is_finite_on_both_sides() -> None:
    """The branch that is not used must not feed an infinite slope into the gradient."""
    x = torch.tensor([-1e-30, -1e-12, -0.5, -0.7, -5.0, -800.0], requires_grad=True)
    (grad,) = torch.autograd.grad(log1mexp(x).sum(), x)
    assert bool(torch.isfinite(grad).all()), grad
    x64 = x.detach().double()
    want = -torch.exp(x64) / -torch.expm1(x64)  # d/dx log(1 - e^x) = -e^x / (1 - e^x)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=0.0)


# -- NaN / inf outside the mask (issue 17.2) ----------------------------------------------------
KINDS = ["bce", "focal", "mse", "huber", "multiclass", "log_prob"]


def _task(kind: str) -> TaskSpec:
    if kind == "multiclass":
        return TaskSpec(name="t", kind="multiclass", num_classes=3)
    if kind in ("mse", "huber"):
        return TaskSpec(name="t", kind="regression", loss=kind)
    if kind == "focal":
        return TaskSpec(name="t", kind="binary", loss="focal", focal_gamma=0.5, focal_alpha=0.3)
    return TaskSpec(name="t", kind="binary")


def _loss_and_grad(
    kind: str, labels: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    n = len(mask)
    if kind == "multiclass":
        leaf = torch.randn(n, 3, generator=g, dtype=torch.float64)
    elif kind == "log_prob":
        leaf = torch.randn(n, 2, generator=g, dtype=torch.float64) * 3  # ctr, cvr logits
    else:
        leaf = torch.randn(n, generator=g, dtype=torch.float64) * 2
    leaf.requires_grad_(True)
    if kind == "log_prob":
        log_p = F.logsigmoid(leaf[:, 0]) + F.logsigmoid(leaf[:, 1])
        out = ModelOutput(logits={}, log_probs={"t": log_p})
    else:
        out = ModelOutput({"t": leaf})
    batch = Batch(
        Features(torch.zeros(n, 0, dtype=torch.int32), torch.zeros(n, 0)),
        {"t": labels},
        {"t": mask},
        {"t": weights},
    )
    loss = MultiTaskLoss([_task(kind)])(out, batch)["t"]
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


@pytest.mark.parametrize("kind", KINDS)
def test_nan_and_inf_weights_and_labels_outside_the_mask_change_nothing(kind: str) -> None:
    mask = torch.tensor([True, False, True, False, False, True, False, False])
    inside_y = {"multiclass": [2.0, 0.0, 1.0], "mse": [1.5, -0.3, 4.0], "huber": [1.5, -0.3, 4.0]}
    y_in = torch.tensor(inside_y.get(kind, [1.0, 0.0, 1.0]), dtype=torch.float64)
    w_in = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)

    def fill(inside: torch.Tensor, outside: list[float]) -> torch.Tensor:
        t = torch.empty(len(mask), dtype=torch.float64)
        t[mask] = inside
        t[~mask] = torch.tensor(outside, dtype=torch.float64)
        return t

    clean_loss, clean_grad = _loss_and_grad(
        kind, fill(y_in, [0.0] * 5), fill(w_in, [1.0] * 5), mask
    )
    assert clean_loss.item() > 0 and bool((clean_grad != 0).any())
    dirty = [
        ([NAN, INF, -INF, 1e30, -7.0], [NAN, INF, -INF, NAN, 1e30]),  # labels, weights
        ([0.0, 0.0, 0.0, 0.0, 0.0], [NAN, NAN, INF, -INF, NAN]),  # weights only
        ([NAN, NAN, INF, -INF, NAN], [1.0, 1.0, 1.0, 1.0, 1.0]),  # labels only
    ]
    for y_out, w_out in dirty:
        loss, grad = _loss_and_grad(kind, fill(y_in, y_out), fill(w_in, w_out), mask)
        assert bool(torch.isfinite(loss)), (kind, y_out, w_out, loss)
        assert bool(torch.isfinite(grad).all()), (kind, y_out, w_out, grad)
        assert torch.equal(loss, clean_loss), (kind, loss, clean_loss)
        assert torch.equal(grad, clean_grad), (kind, grad, clean_grad)
        assert bool((grad[~mask] == 0).all())
