"""Optimisers are torch.optim's; combined optimisers, state materialisation, schedules, and the
Trainer's Python-side options (any optimiser class, any scheduler, the config's monitor)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mtlrec.config import OptimizerConfig, SchedulerConfig, TrainingConfig
from mtlrec.models.build import build_model
from mtlrec.testing import tiny_dataset
from mtlrec.train.callbacks import Callback
from mtlrec.train.optimizers import (
    CombinedOptimizer,
    build_optimizer,
    make_optimizer,
    materialize_state,
    param_groups,
)
from mtlrec.train.schedulers import Schedule, build_scheduler
from mtlrec.train.trainer import Trainer
from mtlrec.weighting import build_weighting

MOE = {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}


def _model(seed: int = 0):
    pre, ds = tiny_dataset(n=96)
    torch.manual_seed(seed)
    return pre, ds, build_model("mmoe", ds.schema, pre.table_sizes(), MOE)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
        ("adagrad", torch.optim.Adagrad),
        ("sgd", torch.optim.SGD),
    ],
)
def test_config_names_build_fused_torch_optimizers(name, cls) -> None:
    _, _, model = _model()
    opt = build_optimizer(model, None, OptimizerConfig(name=name, lr=0.01))
    assert type(opt) is cls
    assert all(g["fused"] for g in opt.param_groups)
    assert {g["name"] for g in opt.param_groups} == {"dense", "embedding"}


def test_sparse_adam_tables_are_lazy_and_dense_groups_use_adam() -> None:
    _, ds, model = _model()
    cfg = OptimizerConfig(name="adam", lr=0.05, sparse_embeddings=True)
    for m in model.modules():
        if hasattr(m, "sparse_grad"):
            m.sparse_grad = True
    opt = build_optimizer(model, None, cfg)
    assert isinstance(opt, CombinedOptimizer)
    kinds = [type(m) for m in opt.members]
    assert kinds == [torch.optim.Adam, torch.optim.SparseAdam]
    table = model.embedding_parameters()[0]
    before = table.detach().clone()
    batch = next(iter(ds.batches(8)))
    out = model(batch.features)
    sum(v.sum() for v in out.logits.values()).backward()
    assert table.grad is not None and table.grad.is_sparse
    touched = torch.unique(table.grad.coalesce().indices()[0])
    opt.step()
    moved = (table.detach() != before).any(dim=1).nonzero().flatten()
    assert set(moved.tolist()) <= set(touched.tolist()) and len(moved) > 0


def test_a_scheduler_reaches_every_member_of_a_combined_optimizer() -> None:
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    combined = CombinedOptimizer(
        [torch.optim.SGD(a.parameters(), lr=1.0), torch.optim.Adam(b.parameters(), lr=0.5)]
    )
    sched = torch.optim.lr_scheduler.StepLR(combined, step_size=1, gamma=0.5)
    for _ in range(2):
        combined.step()
        sched.step()
    assert combined.members[0].param_groups[0]["lr"] == pytest.approx(0.25)
    assert combined.members[1].param_groups[0]["lr"] == pytest.approx(0.125)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=g)
    y = torch.randn(16, 2, generator=g)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize(
    "cfg",
    [
        OptimizerConfig(name="adam", lr=0.01, weight_decay=0.1),
        OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.1),
        OptimizerConfig(name="adagrad", lr=0.05, weight_decay=0.01),
        OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
    ],
    ids=lambda c: c.name,
)
def test_materialized_state_changes_nothing(cfg: OptimizerConfig) -> None:
    """State allocated up front (one neutral step) gives bit-identical training."""
    torch.manual_seed(1)
    a = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    b = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    b.load_state_dict(a.state_dict())
    groups = lambda m: [{"params": list(m.parameters()), "weight_decay": cfg.weight_decay}]  # noqa: E731
    oa, ob = make_optimizer(groups(a), cfg, cfg.lr), make_optimizer(groups(b), cfg, cfg.lr)
    materialize_state(ob)
    if cfg.name != "sgd" or cfg.momentum:
        assert len(ob.state) == len(list(b.parameters()))  # allocated before any real step
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
    _train(a, oa, 7)
    _train(b, ob, 7)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_task_optimizers_step_only_the_active_task_and_round_trip() -> None:
    _, ds, model = _model()
    strategy = build_weighting("alternating", model.loss_task_names, {})
    opt = build_optimizer(model, strategy, OptimizerConfig(task_lr={"click": 0.003}))
    assert isinstance(opt, CombinedOptimizer) and len(opt.members) == 2
    lrs = {g["name"]: g["lr"] for g in opt.members[0].param_groups}
    assert lrs["task:click"] == 0.003 and lrs["dense"] == 0.003  # the task's whole optimiser
    watch_tower = model.task_parameters("watch")
    before = [p.detach().clone() for p in watch_tower]
    batch = next(iter(ds.batches(16)))
    out = model(batch.features)
    sum(v.sum() for v in out.logits.values()).backward()
    opt.step()  # the strategy's active task is the first one
    assert all(torch.equal(p, q) for p, q in zip(watch_tower, before, strict=True))
    # state dict round trip into a fresh combined optimiser continues identically
    sd = copy.deepcopy(opt.state_dict())  # as read back from a checkpoint: no aliasing
    _, _, model_b = _model()
    model_b.load_state_dict(model.state_dict())
    strategy_b = build_weighting("alternating", model_b.loss_task_names, {})
    opt_b = build_optimizer(model_b, strategy_b, OptimizerConfig(task_lr={"click": 0.003}))
    opt_b.load_state_dict(sd)
    for m, o in ((model, opt), (model_b, opt_b)):
        o.zero_grad()
        out = m(batch.features)
        sum(v.sum() for v in out.logits.values()).backward()
        o.step()
    for pa, pb in zip(model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


# -- schedules ----------------------------------------------------------------------------------
def test_schedule_formulas() -> None:
    warm = Schedule("constant", warmup_steps=4, warmup_start=0.2)
    assert [warm(i) for i in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    cos = Schedule("cosine", warmup_steps=0, total_steps=10, min_factor=0.1)
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(12)]
    expected[10:] = [0.1, 0.1]  # held at the floor past the horizon
    assert [cos(i) for i in range(12)] == pytest.approx(expected)
    step = Schedule("step", warmup_steps=2, step_size=3, gamma=0.5, warmup_start=0.0)
    assert [step(i) for i in range(9)] == pytest.approx([0, 0.5, 1, 1, 1, 0.5, 0.5, 0.5, 0.25])


def test_schedule_keeps_the_ratio_of_per_group_rates() -> None:
    _, _, model = _model()
    opt = build_optimizer(model, None, OptimizerConfig(lr=0.01, task_lr={"click": 0.1}))
    sched = build_scheduler(opt, SchedulerConfig(name="cosine", warmup_steps=2), 20)
    assert sched is not None
    for _ in range(7):
        opt.step()
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["task:click"] / lrs["dense"] == pytest.approx(10.0)
    assert lrs["dense"] == pytest.approx(0.01 * Schedule("cosine", 2, 20)(7))


def test_no_scheduler_for_a_constant_rate() -> None:
    _, _, model = _model()
    opt = build_optimizer(model, None, OptimizerConfig())
    assert build_scheduler(opt, SchedulerConfig(), 100) is None


class _Crash(Exception):
    pass


class _CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, state) -> None:  # type: ignore[no-untyped-def]
        if state.step == self.step:
            raise _Crash


def _fit(tmp: Path | None, epochs: int, callbacks=(), **kw) -> Trainer:  # type: ignore[no-untyped-def]
    _, ds, model = _model(3)
    cfg = TrainingConfig(
        epochs=epochs,
        batch_size=32,
        progress=False,
        scheduler=SchedulerConfig(name="cosine", warmup_steps=3),
        **kw,
    )
    trainer = Trainer(model, ds.schema, config=cfg, run_dir=tmp, callbacks=callbacks)
    trainer.fit(ds, ds, resume=True)
    return trainer


def test_trainer_follows_the_configured_schedule() -> None:
    trainer = _fit(None, 3)
    steps = 3 * 3  # 96 rows, batch 32
    assert trainer.scheduler is not None and trainer.scheduler.last_epoch == steps
    expected = 1e-3 * Schedule("cosine", 3, steps)(steps)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_a_resumed_run_continues_the_schedule_exactly(tmp_path: Path) -> None:
    whole = _fit(tmp_path / "a", 3)
    with pytest.raises(_Crash):  # killed after step 5 (mid-epoch), last checkpoint at step 4
        _fit(tmp_path / "b", 3, callbacks=[_CrashAt(5)], checkpoint_every_steps=4)
    resumed = _fit(tmp_path / "b", 3, checkpoint_every_steps=4)
    for pa, pb in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert resumed.scheduler is not None and whole.scheduler is not None
    assert resumed.scheduler.last_epoch == whole.scheduler.last_epoch == 9
    assert resumed.optimizer.param_groups[0]["lr"] == whole.optimizer.param_groups[0]["lr"]


def test_trainer_takes_any_torch_optimizer_and_scheduler() -> None:
    _, ds, model = _model()
    seen: list[torch.optim.Optimizer] = []

    def sched(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        seen.append(opt)
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)

    trainer = Trainer(
        model,
        ds.schema,
        config=TrainingConfig(epochs=1, batch_size=32, progress=False),
        optimizer=torch.optim.RMSprop,
        scheduler=sched,
    )
    assert type(trainer.optimizer) is torch.optim.RMSprop
    assert {g["name"] for g in trainer.optimizer.param_groups} >= {"dense", "embedding"}
    trainer.fit(ds)
    assert seen == [trainer.optimizer]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**3)
    # a callable from the parameter groups works too
    t2 = Trainer(
        model,
        ds.schema,
        config=TrainingConfig(epochs=1, progress=False),
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.5),
    )
    assert type(t2.optimizer) is torch.optim.SGD


def test_trainer_honours_the_configured_monitor() -> None:
    _, ds, model = _model()
    cfg = TrainingConfig(epochs=1, progress=False, monitor="watch/mse")
    assert Trainer(model, ds.schema, config=cfg).monitor == ("watch", "mse")
    assert Trainer(model, ds.schema, config=TrainingConfig(progress=False)).monitor == (
        "click",
        "auc",
    )
    assert Trainer(model, ds.schema, config=cfg, monitor=("click", "logloss")).monitor == (
        "click",
        "logloss",
    )


def test_progress_bar_only_on_a_terminal(monkeypatch) -> None:
    from mtlrec.train.callbacks import ProgressBar

    _, ds, model = _model()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not any(isinstance(c, ProgressBar) for c in Trainer(model, ds.schema).callbacks)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert any(isinstance(c, ProgressBar) for c in Trainer(model, ds.schema).callbacks)
    cfg = TrainingConfig(progress=False)
    assert not any(
        isinstance(c, ProgressBar) for c in Trainer(model, ds.schema, config=cfg).callbacks
    )


def test_param_groups_put_each_parameter_in_one_group() -> None:
    _, _, model = _model()
    groups = param_groups(model, None, OptimizerConfig(task_lr={"click": 0.1}))
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_library_use_has_no_process_wide_side_effects(tmp_path: Path) -> None:
    """Importing mtlrec, building a Trainer, fitting and predicting change no environment
    variable, allocator setting or memory pool and force no garbage collection; the mtlrec
    command opts in."""
    code = """
import gc, os, sys
calls = []
gc.collect = lambda *a: calls.append('gc') or 0
import mtlrec
assert 'ARROW_DEFAULT_MEMORY_POOL' not in os.environ
import pyarrow as pa
default_pool = pa.default_memory_pool().backend_name
from mtlrec.testing import tiny_dataset
from mtlrec.models.build import build_model
from mtlrec.config import TrainingConfig
from mtlrec.utils import runtime
pre, ds = tiny_dataset(n=64)
m = build_model('mmoe', ds.schema, pre.table_sizes(), {'expert_hidden': [8]})
t = mtlrec.Trainer(m, ds.schema, config=TrainingConfig(epochs=1, progress=False))
t.fit(ds, ds); t.evaluate(ds); t.predict(ds); t.predict(ds)
assert not runtime._done, 'allocator tuned'
assert calls == [], calls
assert pa.default_memory_pool().backend_name == default_pool
runtime.enable_process_tuning()
t2 = mtlrec.Trainer(m, ds.schema, config=TrainingConfig(epochs=1, progress=False))
t2.predict(ds)
assert calls, 'opted in: release_memory collects'
print('ok', default_pool, pa.default_memory_pool().backend_name)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
