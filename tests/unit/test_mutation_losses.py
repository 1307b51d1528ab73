"""Tests that kill the mutants of ``mtlrec.losses`` the rest of the suite let live
(``python benchmarks/mutation.py losses``): the bound of the log-probability loss, the focal
loss's class weight through the task spec, and the valid-row counts (fractional under data
parallelism) behind each task's mean."""

from __future__ import annotations

import math

import pytest
import torch

from mtlrec.batch import Batch, Features
from mtlrec.losses import MultiTaskLoss, binary_loss_from_log_prob
from mtlrec.models.base import ModelOutput
from mtlrec.schema import TaskSpec


def _batch(labels: dict, masks: dict, weights: dict | None = None) -> Batch:
    n = len(next(iter(labels.values())))
    weights = weights or {k: torch.ones(n) for k in labels}
    feats = Features(torch.zeros(n, 0, dtype=torch.int32), torch.zeros(n, 0))
    return Batch(feats, labels, masks, weights)


# -- binary_loss_from_log_prob near p = 1 --------------------------------------------------------
BOUND32 = torch.finfo(torch.float32).tiny / torch.finfo(torch.float32).eps  # ~9.9e-32


def test_log_prob_loss_is_held_at_the_bound_with_zero_gradient() -> None:
    """For ``|log p|`` at or below ``tiny / eps`` the negative-label loss is ``-log(bound)``
    (about 71.4 in float32) with zero gradient: closer to 0, ``1 / |log p|`` overflows."""
    bound = torch.tensor(BOUND32, dtype=torch.float32).item()  # as float32 rounds it
    log_p = torch.tensor([-bound, -bound / 2, -1e-35, 0.0], requires_grad=True)
    y = torch.zeros(4)
    loss = binary_loss_from_log_prob(log_p, y)
    want = -math.log(bound)
    assert want == pytest.approx(71.39, abs=0.01)
    np_loss = loss.detach().double()
    assert torch.allclose(np_loss, torch.full((4,), want, dtype=torch.float64), rtol=1e-6)
    loss.sum().backward()
    assert log_p.grad is not None
    assert torch.equal(log_p.grad, torch.zeros(4))  # at the bound too: no 1e31 gradient


def test_log_prob_loss_beyond_the_bound_is_exact_with_its_gradient() -> None:
    """Just past the bound the loss is the exact ``-log(-log p)`` (to first order) and the
    gradient ``-1 / log p`` is large but finite."""
    lp64 = torch.tensor([-2 * BOUND32, -1e-20, -1e-3, -1.0, -30.0], dtype=torch.float64)
    log_p = lp64.float().requires_grad_(True)
    loss = binary_loss_from_log_prob(log_p, torch.zeros(5))
    ref = -torch.log(-torch.expm1(log_p.detach().double()))  # -log(1 - p), float64
    torch.testing.assert_close(loss.detach().double(), ref, rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    assert log_p.grad is not None
    grad_ref = torch.exp(log_p.detach().double()) / -torch.expm1(log_p.detach().double())
    assert torch.isfinite(log_p.grad).all()
    torch.testing.assert_close(log_p.grad.double(), grad_ref, rtol=1e-4, atol=1e-6)


# -- focal loss with a class weight, through the task spec ---------------------------------------
def test_focal_task_uses_its_alpha() -> None:
    z = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.5, 4.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    gamma, alpha = 2.0, 0.25
    t = TaskSpec(name="ctr", kind="binary", loss="focal", focal_gamma=gamma, focal_alpha=alpha)
    b = _batch({"ctr": y}, {"ctr": torch.ones(6, dtype=torch.bool)}, {"ctr": torch.ones(6)})
    got = MultiTaskLoss([t])(ModelOutput({"ctr": z}), b)["ctr"]
    p = torch.sigmoid(z)
    p_t = torch.where(y == 1, p, 1 - p)
    a_t = torch.where(y == 1, torch.tensor(alpha), torch.tensor(1 - alpha)).double()
    want = (-a_t * (1 - p_t) ** gamma * torch.log(p_t)).mean()  # Lin et al. 2017, Eq. 5
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


# -- counts behind each mean ---------------------------------------------------------------------
def _two_tasks() -> tuple[list[TaskSpec], Batch, ModelOutput]:
    tasks = [TaskSpec(name="a", kind="binary"), TaskSpec(name="b", kind="regression", mask="a")]
    labels = {"a": torch.tensor([1.0, 0.0, 1.0, 1.0]), "b": torch.tensor([2.0, 0.0, 1.0, 3.0])}
    masks = {
        "a": torch.tensor([True, True, True, True]),
        "b": torch.tensor([True, False, False, False]),
    }
    out = ModelOutput({"a": torch.tensor([0.3, -0.2, 1.0, 2.0]), "b": torch.zeros(4)})
    return tasks, _batch(labels, masks), out


def test_losses_carry_the_valid_row_counts() -> None:
    tasks, batch, out = _two_tasks()
    losses = MultiTaskLoss(tasks)(out, batch)
    assert set(losses.counts) == {"a", "b"}
    assert losses.counts["a"].item() == 4 and losses.counts["b"].item() == 1
    assert losses.counts["a"].dtype == torch.float32  # the loss's dtype: it may be fractional
    assert not losses.counts["a"].requires_grad
    assert losses["b"].item() == pytest.approx(4.0)  # (0 - 2)^2 over its one valid row


def test_fractional_counts_from_the_reducer_divide_the_loss() -> None:
    """Under data parallelism the reducer gives ``global count / world size``, in the count's
    dtype: 1 valid row of 2 processes is 0.5 here, and the loss is the local sum over it."""

    def halve(count: torch.Tensor) -> torch.Tensor:  # as global_count_reducer with world 2
        return (count.to(torch.float64) / 2).to(count.dtype)

    tasks, batch, out = _two_tasks()
    plain = MultiTaskLoss(tasks)(out, batch)
    reduced = MultiTaskLoss(tasks, count_reducer=halve)(out, batch)
    assert reduced.counts["a"].item() == 2.0 and reduced.counts["b"].item() == 0.5
    for t in ("a", "b"):
        assert reduced[t].item() == pytest.approx(2 * plain[t].item(), rel=1e-6)
    # 3 valid rows: 1.5, not a truncated 1
    batch.masks["a"][3] = False
    three = MultiTaskLoss(tasks, count_reducer=halve)(out, batch)
    assert three.counts["a"].item() == 1.5
    total = MultiTaskLoss(tasks)(out, batch)["a"].item() * 3
    assert three["a"].item() == pytest.approx(total / 1.5, rel=1e-6)
