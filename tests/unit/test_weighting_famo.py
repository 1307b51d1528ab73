"""FAMO in the paper's form (issue 12.13): the logits learn from the same batch's losses before
and after the step (Liu et al., NeurIPS 2023, Algorithm 1; the authors' code re-scores the batch
after ``optimizer.step()``), at the cost of one forward pass without gradient per step."""

from __future__ import annotations

import math

import pytest
import torch

from mtlrec.losses import MultiTaskLoss
from mtlrec.models import build_model
from mtlrec.models.base import MultiTaskModel
from mtlrec.testing import tiny_dataset
from mtlrec.train.step import StepContext, train_step
from mtlrec.weighting import build_weighting

MOE = {"num_experts": 3, "expert_hidden": (8,), "tower_hidden": (4,)}


def setup(name: str, params: dict | None = None) -> tuple[StepContext, MultiTaskModel, object]:
    pre, ds = tiny_dataset(n=96, seed=0)
    torch.manual_seed(0)
    model = build_model("mmoe", pre.schema, pre.table_sizes(), MOE)
    strategy = build_weighting(name, model.loss_task_names, params or {})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return StepContext(model, MultiTaskLoss(list(pre.schema.tasks)), strategy, opt), model, ds


def forwards_per_step(ctx: StepContext, model: MultiTaskModel, ds, steps: int = 3) -> float:
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    for batch in list(ds.batches(32))[:steps]:
        train_step(ctx, batch)
    handle.remove()
    return len(calls) / steps


def test_the_paper_form_is_the_default_and_costs_one_forward_pass() -> None:
    ctx, model, ds = setup("famo")
    assert ctx.strategy.needs_rescore
    assert forwards_per_step(ctx, model, ds) == 2  # the step's, and the re-score
    ctx, model, ds = setup("famo", {"update": "next_batch"})
    assert not ctx.strategy.needs_rescore
    assert forwards_per_step(ctx, model, ds) == 1
    ctx, model, ds = setup("static")
    assert forwards_per_step(ctx, model, ds) == 1


def test_logits_learn_from_the_same_batch_before_and_after_the_step() -> None:
    ctx, model, ds = setup("famo", {"lr": 0.025, "weight_decay": 0.0})
    batch = next(iter(ds.batches(32)))
    res = train_step(ctx, batch)
    with torch.no_grad():  # the same batch under the updated parameters, independently
        after = ctx.loss_fn(model(batch.features), batch)
    before = res.losses.double()
    after_v = torch.stack([after[t] for t in ctx.strategy.task_names]).double()
    delta = torch.log(before + 1e-8) - torch.log(after_v + 1e-8)  # how much each log loss fell
    z = torch.full((2,), 0.5, dtype=torch.float64)  # softmax of the initial logits (0, 0)
    grad = z * (delta - (z * delta).sum())  # d(z . delta)/d logits
    # Adam's first step: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + 1e-8)
    want = -0.025 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(ctx.strategy.logits.double(), want, rtol=1e-5, atol=1e-7)
    assert float(delta.abs().max()) > 0  # the step changed the losses: the test has teeth


def test_the_slower_task_gains_weight() -> None:
    s = build_weighting("famo", ("a", "b"))
    s.after_update(torch.tensor([1.0, 1.0]), lambda: torch.tensor([0.5, 1.0]))
    assert float(s.logits[1]) > float(s.logits[0])  # a improved, b did not: b's logit rises
    w = s.weights(torch.tensor([1.0, 1.0]))
    assert float(w[1]) > float(w[0]) and float(w.sum()) == pytest.approx(2.0)


def test_next_batch_form_compares_consecutive_steps_and_skips_the_rescore() -> None:
    s = build_weighting("famo", ("a", "b"), {"update": "next_batch"})

    def fail() -> torch.Tensor:
        raise AssertionError("next_batch must not re-score")

    s.after_update(torch.tensor([1.0, 1.0]), fail)
    s.on_step_end(torch.tensor([1.0, 1.0]))
    s.on_step_end(torch.tensor([0.5, 1.0]))
    assert float(s.logits[1]) > float(s.logits[0])
    assert math.isclose(float(s.logits[0]), -float(s.logits[1]), rel_tol=1e-6)


def test_non_finite_rescore_leaves_the_logits() -> None:
    s = build_weighting("famo", ("a", "b"))
    s.after_update(torch.tensor([1.0, 1.0]), lambda: torch.tensor([float("nan"), 0.5]))
    assert torch.isfinite(s.logits).all()
    assert float(s.logits[0]) == 0.0  # the NaN task learnt nothing
