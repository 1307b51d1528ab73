"""Per-part optimisers (``training.optimizer.groups``): patterns over parameter names, one
``torch.optim`` member per group, errors on empty and overlapping matches, each group's own
update rule, schedules and the state round trip."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mtlrec.config import ExperimentConfig, OptimizerConfig, SchedulerConfig, TrainingConfig
from mtlrec.errors import ConfigError
from mtlrec.models.build import build_model
from mtlrec.testing import tiny_dataset
from mtlrec.train.ftrl import FTRL
from mtlrec.train.optimizers import CombinedOptimizer, build_optimizer, materialize_state
from mtlrec.train.schedulers import build_scheduler
from mtlrec.train.trainer import Trainer
from mtlrec.weighting import build_weighting

MOE = {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}


def _model(seed: int = 0, **extra):
    pre, ds = tiny_dataset(n=96)
    torch.manual_seed(seed)
    return ds, build_model("mmoe", ds.schema, pre.table_sizes(), {**MOE, **extra})


def _cfg(groups: list[dict], **kw) -> OptimizerConfig:
    return OptimizerConfig.model_validate({"lr": 0.01, "groups": groups, **kw})


def _members_by_param(opt: CombinedOptimizer) -> dict[int, list[torch.optim.Optimizer]]:
    out: dict[int, list[torch.optim.Optimizer]] = {}
    for m in opt.members:
        for g in m.param_groups:
            for p in g["params"]:
                out.setdefault(id(p), []).append(m)
    return out


def test_patterns_map_parameters_to_their_own_optimizer() -> None:
    _, model = _model()
    cfg = _cfg([{"params": ["embedding.*"], "name": "adagrad", "lr": 0.05}])
    opt = build_optimizer(model, None, cfg)
    assert isinstance(opt, CombinedOptimizer)
    assert [type(m) for m in opt.members] == [torch.optim.Adam, torch.optim.Adagrad]
    adagrad = opt.members[1]
    assert adagrad.param_groups[0]["lr"] == 0.05
    assert adagrad.param_groups[0]["name"] == "group:0"
    emb = {id(p) for p in model.embedding_parameters()}
    assert {id(p) for p in adagrad.param_groups[0]["params"]} == emb
    owners = _members_by_param(opt)
    # every trainable parameter in exactly one member; the tables only in Adagrad
    assert set(owners) == {id(p) for p in model.parameters()}
    assert all(len(v) == 1 for v in owners.values())
    assert {g["name"] for g in opt.members[0].param_groups} == {"dense"}


def test_each_group_follows_its_own_update_rule() -> None:
    ds, model = _model()
    cfg = _cfg(
        [
            {"params": ["heads.*"], "name": "sgd", "lr": 0.1},
            {"params": ["gates.*"], "name": "ftrl", "lr": 0.5, "l1": 0.0},
        ]
    )
    opt = build_optimizer(model, None, cfg)
    assert [type(m) for m in opt.members] == [torch.optim.Adam, torch.optim.SGD, FTRL]
    batch = ds.take(slice(0, 32))
    out = model(batch.features)
    (out.logits["click"].sum() + out.logits["watch"].sum()).backward()
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    grads = {n: p.grad.clone() for n, p in named.items()}
    opt.step()
    tower = "heads.towers.click.layers.0.weight"
    torch.testing.assert_close(named[tower], before[tower] - 0.1 * grads[tower])  # plain SGD
    gate = "gates.click.net.layers.0.weight"
    g, w0 = grads[gate], before[gate]
    z = g - g.abs() / 0.5 * w0  # FTRL's first step from w0 (n = 0)
    torch.testing.assert_close(named[gate], -z / ((1.0 + g.abs()) / 0.5))
    expert = "experts.weights.0"  # Adam's first step moves every coordinate by about lr
    moved = (named[expert] - before[expert]).abs()
    big = grads[expert].abs() > 1e-5
    assert big.any() and torch.allclose(moved[big], torch.tensor(0.01), rtol=1e-2)


def test_a_pattern_that_matches_nothing_names_it_and_lists_parameters() -> None:
    _, model = _model()
    cfg = _cfg([{"params": ["experts.*", "tower.*"], "name": "adam"}])
    with pytest.raises(ConfigError, match=r"'tower\.\*' matches no parameter.*embedding\.tables"):
        build_optimizer(model, None, cfg)


def test_a_parameter_in_two_groups_is_an_error_naming_both() -> None:
    _, model = _model()
    cfg = _cfg(
        [
            {"params": ["heads.*"], "name": "sgd"},
            {"params": ["*.bias"], "name": "adagrad"},
        ]
    )
    with pytest.raises(ConfigError, match=r"groups\[0\] \(pattern 'heads\.\*'\).*groups\[1\]"):
        build_optimizer(model, None, cfg)
    # two patterns of one group may overlap
    cfg = _cfg([{"params": ["heads.*", "*.towers.click.*"], "name": "sgd"}])
    build_optimizer(model, None, cfg)


def test_settings_of_another_optimizer_are_refused() -> None:
    with pytest.raises(ConfigError, match="adam takes no l1"):
        ExperimentConfig.from_dict(
            {
                "data": {"dataset": "census-income"},
                "model": {"name": "mmoe"},
                "training": {
                    "optimizer": {"groups": [{"params": ["x"], "name": "adam", "l1": 0.1}]}
                },
            }
        )


def test_groups_and_alternating_training_are_refused() -> None:
    _, model = _model()
    strategy = build_weighting("alternating", list(model.task_names))
    with pytest.raises(ConfigError, match="alternating"):
        build_optimizer(model, strategy, _cfg([{"params": ["heads.*"], "name": "sgd"}]))


def test_lazy_tables_in_an_adam_group_go_to_sparse_adam() -> None:
    ds, model = _model()
    cfg = _cfg(
        [{"params": ["embedding.*", "heads.*"], "name": "adam", "lr": 0.02}],
        sparse_embeddings=True,
    )
    trainer = Trainer(model, ds.schema, config=TrainingConfig(optimizer=cfg, progress=False))
    opt = trainer.optimizer
    assert isinstance(opt, CombinedOptimizer)
    kinds = [type(m).__name__ for m in opt.members]
    assert kinds == ["Adam", "Adam", "SparseAdam"]
    trainer.fit(ds)  # sparse gradients reach SparseAdam without an error


def test_the_schedule_scales_every_group() -> None:
    _, model = _model()
    cfg = _cfg([{"params": ["gates.*"], "name": "ftrl", "lr": 0.5}])
    opt = build_optimizer(model, None, cfg)
    build_scheduler(opt, SchedulerConfig(warmup_steps=10, warmup_start=0.1), 100)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["group:0"] == pytest.approx(0.05)
    assert lrs["dense"] == pytest.approx(0.001)


def test_state_dict_round_trip_and_materialize_leave_ftrl_alone() -> None:
    ds, model = _model()
    cfg = _cfg(
        [
            {"params": ["gates.*"], "name": "ftrl", "lr": 0.5, "l1": 0.01},
            {"params": ["embedding.*"], "name": "adagrad"},
        ]
    )
    opt = build_optimizer(model, None, cfg)
    gate = dict(model.named_parameters())["gates.click.net.layers.0.weight"]
    before = gate.detach().clone()
    materialize_state(opt)  # a neutral step for Adam/Adagrad; FTRL's first step is not neutral
    assert torch.equal(gate, before)

    def step(m: torch.nn.Module, o: torch.optim.Optimizer, lo: int) -> None:
        o.zero_grad()
        out = m(ds.take(slice(lo, lo + 16)).features)
        (out.logits["click"].sum() + out.logits["watch"].square().sum()).backward()
        o.step()

    for lo in (0, 16):
        step(model, opt, lo)
    twin = copy.deepcopy(model)
    opt2 = build_optimizer(twin, None, cfg)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for lo in (32, 48):
        step(model, opt, lo)
        step(twin, opt2, lo)
    for (n, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), n


def test_a_grouped_run_resumes_bit_identically(tmp_path: Path) -> None:
    from mtlrec.train.callbacks import Callback

    ds, _ = _model()
    tcfg = TrainingConfig(
        epochs=2,
        batch_size=32,
        progress=False,
        checkpoint_every_steps=1,
        optimizer=_cfg(
            [
                {"params": ["gates.*"], "name": "ftrl", "lr": 0.3, "l1": 0.001},
                {"params": ["embedding.*"], "name": "adagrad", "lr": 0.05},
            ]
        ),
    )

    class Stop(Callback):
        def on_step_end(self, trainer, state) -> None:
            if state.step == 2:  # mid-epoch
                raise KeyboardInterrupt

    def trainer(run: Path, callbacks=()) -> Trainer:
        _, m = _model(seed=5)
        return Trainer(m, ds.schema, config=tcfg, run_dir=run, callbacks=list(callbacks))

    whole = trainer(tmp_path / "a")
    whole.fit(ds, ds)
    broken = trainer(tmp_path / "b", [Stop()])
    with pytest.raises(KeyboardInterrupt):
        broken.fit(ds, ds)
    resumed = trainer(tmp_path / "b")
    resumed.fit(ds, ds, resume=True)
    for (n, a), b in zip(whole.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), n
