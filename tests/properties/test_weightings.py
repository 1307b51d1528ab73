"""Invariants of every registered balancing strategy (the registry is iterated, so new
strategies are covered): a few training steps give finite losses and a gradient to every
parameter the step trains (the strategy's own parameters included), the strategy's parameters
are in the optimiser, and its state_dict round-trips."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch

from mtlrec.config import TrainingConfig
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.preprocess import Preprocessor
from mtlrec.models import build_model
from mtlrec.registry import WEIGHTINGS
from mtlrec.testing import tiny_dataset
from mtlrec.train.step import StepContext, train_step
from mtlrec.train.trainer import Trainer
from mtlrec.weighting import build_weighting

STRATEGIES = WEIGHTINGS.names()
MODEL_PARAMS = {"num_experts": 3, "expert_hidden": (8, 6), "tower_hidden": (4,)}


@cache
def tiny() -> tuple[Preprocessor, ColumnarDataset]:
    return tiny_dataset(n=96, seed=0)


def make(name: str, params: dict[str, Any] | None = None) -> Trainer:
    pre, _ = tiny()
    torch.manual_seed(0)
    model = build_model("mmoe", pre.schema, pre.table_sizes(), MODEL_PARAMS)
    strategy = build_weighting(name, model.loss_task_names, params or {})
    cfg = TrainingConfig(epochs=1, batch_size=32, progress=False)
    return Trainer(model, pre.schema, config=cfg, strategy=strategy)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_parameter_gets_a_finite_gradient(name: str) -> None:
    trainer = make(name)
    _, ds = tiny()
    ctx = StepContext(trainer.model, trainer.loss_fn, trainer.strategy, trainer.optimizer)
    touched: set[str] = set()
    named = dict(trainer.model.named_parameters())
    named |= {f"strategy.{k}": p for k, p in trainer.strategy.named_parameters()}
    for step, batch in enumerate(ds.batches(32, shuffle=True, seed=0)):
        res = train_step(ctx, batch, where=f"step {step}")
        assert torch.isfinite(res.losses).all() and torch.isfinite(res.objective)
        assert torch.isfinite(res.weights).all()
        for k, p in named.items():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient of {k}"
                if p.grad.abs().sum() > 0:
                    touched.add(k)
    missing = sorted(set(named) - touched)
    assert not missing, f"{name}: no gradient reached {missing}"


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_parameters_are_in_the_optimizer(name: str) -> None:
    trainer = make(name)
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for k, p in trainer.strategy.named_parameters():
        assert id(p) in in_opt, f"{name}: parameter {k} is not optimised"


@pytest.mark.parametrize("name", STRATEGIES)
def test_state_dict_round_trip(name: str) -> None:
    trainer = make(name)
    _, ds = tiny()
    ctx = StepContext(trainer.model, trainer.loss_fn, trainer.strategy, trainer.optimizer)
    for batch in ds.batches(32, shuffle=True, seed=1):
        train_step(ctx, batch)
    trainer.strategy.on_epoch_end(0)
    state = {k: v.clone() for k, v in trainer.strategy.state_dict().items()}
    fresh = make(name).strategy
    fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
