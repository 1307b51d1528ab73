"""Analytic tests of the balancing strategies (issue 4)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import Adam

from mtlrec.autograd import multitask_backward
from mtlrec.config import OptimizerConfig, TrainingConfig
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.testing import tiny_dataset
from mtlrec.train.checkpoint import load_checkpoint
from mtlrec.train.optimizers import build_optimizer
from mtlrec.train.trainer import Trainer
from mtlrec.weighting import build_weighting
from mtlrec.weighting._solvers import min_norm_weights, project_simplex
from mtlrec.weighting.dtp import batch_auc

TASKS = ("a", "b")
MOE = {"num_experts": 3, "expert_hidden": (8,), "tower_hidden": (4,)}


def rng_tensor(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape)).float()


# -- PCGrad ------------------------------------------------------------------------------------
def test_pcgrad_projects_conflicting_gradients_onto_the_normal_plane() -> None:
    s = build_weighting("pcgrad", TASKS)
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    jac = torch.stack([g1, g2])
    out = s.aggregate(jac, s.weights(torch.ones(2), jac))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2  # (0.5, 0.5): orthogonal to g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1  # (0, 1): orthogonal to g1
    assert float(p1 @ g2) == pytest.approx(0.0, abs=1e-7)
    assert float(p2 @ g1) == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(out, p1 + p2)


def test_pcgrad_leaves_non_conflicting_gradients_unchanged() -> None:
    s = build_weighting("pcgrad", TASKS)
    jac = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(s.aggregate(jac, torch.ones(2)), jac.sum(0))


def test_pcgrad_orders_are_random_per_step_and_seeded() -> None:
    names = [f"t{i}" for i in range(5)]
    a = build_weighting("pcgrad", names, {"seed": 3})
    b = build_weighting("pcgrad", names, {"seed": 3})
    seen = set()
    for _ in range(6):
        assert a.orders() == b.orders()
        seen.add(tuple(map(tuple, a.orders())))
        a.on_step_end(torch.zeros(5))
        b.on_step_end(torch.zeros(5))
    assert len(seen) > 1  # the shuffle is not a no-op
    c = build_weighting("pcgrad", names, {"seed": 4})
    assert c.orders() != build_weighting("pcgrad", names, {"seed": 3}).orders()


def test_pcgrad_receives_one_gradient_per_task() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(3, 4)
    heads = nn.ModuleList([nn.Linear(4, 1) for _ in TASKS])
    x = torch.randn(8, 3)
    h = shared(x)
    losses = {t: heads[i](h).square().mean() for i, t in enumerate(TASKS)}
    s = build_weighting("pcgrad", TASKS)
    shapes = []
    original = s.aggregate

    def spy(jac: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(jac.shape))
        return original(jac, w)

    s.aggregate = spy  # type: ignore[method-assign]
    multitask_backward(losses, s, shared_parameters=list(shared.parameters()))
    assert shapes == [(2, 3 * 4 + 4)]  # T rows, all shared parameters flattened together


def test_gradient_surgery_reaches_the_shared_parameters_exactly() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(3, 4)
    heads = nn.ModuleList([nn.Linear(4, 1) for _ in TASKS])
    x = torch.randn(8, 3)

    def losses() -> dict[str, torch.Tensor]:
        h = shared(x)
        return {t: (heads[i](h).squeeze(-1) - i).square().mean() for i, t in enumerate(TASKS)}

    per_task = []
    for t in TASKS:
        shared.zero_grad()
        losses()[t].backward()
        per_task.append(torch.cat([p.grad.flatten() for p in shared.parameters()]))
    s = build_weighting("pcgrad", TASKS)
    expected = s.aggregate(torch.stack(per_task), torch.ones(2))
    for m in (shared, heads):
        m.zero_grad(set_to_none=True)
    multitask_backward(losses(), s, shared_parameters=list(shared.parameters()))
    got = torch.cat([p.grad.flatten() for p in shared.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# -- MGDA / PE-LTR / IMTL / CAGrad ---------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_mgda_two_task_weights_match_the_closed_form(seed: int) -> None:
    jac = rng_tensor(2, 6, seed=seed)
    g1, g2 = jac[0], jac[1]
    gamma = float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)))
    gamma = min(max(gamma, 0.0), 1.0)
    s = build_weighting("mgda", TASKS)
    alpha = s.shared_weights(torch.ones(2), jac)
    assert alpha.tolist() == pytest.approx([gamma, 1 - gamma], abs=1e-6)
    # and it is the min-norm point of the segment (grid check)
    grid = torch.linspace(0, 1, 2001)
    norms = ((grid[:, None] * g1 + (1 - grid[:, None]) * g2) ** 2).sum(1)
    assert float(grid[norms.argmin()]) == pytest.approx(gamma, abs=1e-3)


def test_mgda_frank_wolfe_finds_the_min_norm_point_of_three_tasks() -> None:
    jac = rng_tensor(3, 4, seed=7).double()
    gram = jac @ jac.T
    w = min_norm_weights(gram)
    best = min(
        float(
            torch.tensor([a, b, 1 - a - b], dtype=torch.float64)
            @ gram
            @ torch.tensor([a, b, 1 - a - b], dtype=torch.float64)
        )
        for a, b in itertools.product(np.linspace(0, 1, 201), repeat=2)
        if a + b <= 1
    )
    assert float(w @ gram @ w) <= best + 1e-6
    assert float(w.sum()) == pytest.approx(1.0) and bool((w >= 0).all())


def test_pe_ltr_respects_its_bounds() -> None:
    names = ("a", "b", "c")
    bounds = {"a": 0.3, "b": 0.2, "c": 0.1}
    s = build_weighting("pe_ltr", names, {"bounds": bounds})
    for seed in range(10):
        w = s.shared_weights(torch.ones(3), rng_tensor(3, 5, seed=seed))
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-9)
        for i, t in enumerate(names):
            assert float(w[i]) >= bounds[t] - 1e-9


def test_pe_ltr_without_bounds_is_the_min_norm_solution_for_two_tasks() -> None:
    for seed in range(5):
        jac = rng_tensor(2, 6, seed=seed)
        pe = build_weighting("pe_ltr", TASKS).shared_weights(torch.ones(2), jac)
        mg = build_weighting("mgda", TASKS).shared_weights(torch.ones(2), jac)
        torch.testing.assert_close(pe.double(), mg.double(), atol=1e-6, rtol=0)


def test_pe_ltr_rejects_bounds_above_one() -> None:
    with pytest.raises(ConfigError, match="sum to at most 1"):
        build_weighting("pe_ltr", TASKS, {"bounds": {"a": 0.7, "b": 0.5}})


def test_imtl_update_has_equal_projections_on_every_task() -> None:
    names = ("a", "b", "c")
    jac = rng_tensor(3, 7, seed=2)
    s = build_weighting("imtl", names)
    g = s.aggregate(jac, s.weights(torch.ones(3), jac))
    units = jac / jac.norm(dim=1, keepdim=True)
    proj = units @ g
    torch.testing.assert_close(proj, proj.mean().expand(3), rtol=1e-4, atol=1e-5)


def test_cagrad_with_c_zero_is_the_sum_and_otherwise_solves_its_dual() -> None:
    jac = torch.tensor([[1.0, 0.2], [-0.8, 1.0]])
    s0 = build_weighting("cagrad", TASKS, {"c": 0.0})
    torch.testing.assert_close(s0.aggregate(jac, torch.ones(2)), jac.sum(0))
    s = build_weighting("cagrad", TASKS, {"c": 0.5, "iterations": 500})
    gram = (jac @ jac.T).double()
    w = s.dual_weights(gram)
    g0 = jac.mean(0).double()
    sqrt_phi = 0.5 * float(g0.norm())

    def f(a: float) -> float:
        gw = a * jac[0].double() + (1 - a) * jac[1].double()
        return float(gw @ g0 + sqrt_phi * gw.norm())

    best = min(f(a) for a in np.linspace(0, 1, 4001))
    assert f(float(w[0])) <= best + 1e-5
    d = s.aggregate(jac, torch.ones(2))
    # the conflict-averse direction improves the worst task more than the average gradient
    assert float((jac @ d).min()) > float((jac @ jac.sum(0)).min())


def test_project_simplex() -> None:
    v = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    p = project_simplex(v, 1.0)
    assert p.tolist() == pytest.approx([0.0, 1.0, 0.0])
    p = project_simplex(torch.tensor([0.2, 0.3], dtype=torch.float64), 0.7)
    assert p.tolist() == pytest.approx([0.3, 0.4])


# -- uncertainty -------------------------------------------------------------------------------
def test_uncertainty_log_variances_reach_the_closed_form_optimum() -> None:
    s = build_weighting("uncertainty", TASKS, {"forms": {"b": "classification"}})
    losses = torch.tensor([0.3, 2.0])
    opt = Adam([{"params": list(s.parameters())}], lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        s.objective(losses, s.weights(losses)).backward()
        opt.step()
    expected = [math.log(0.3), math.log(2 * 2.0)]  # regression: log L; classification: log 2L
    assert s.log_var.detach().tolist() == pytest.approx(expected, abs=1e-2)


def test_uncertainty_total_may_be_negative_and_is_not_clipped() -> None:
    s = build_weighting("uncertainty", TASKS, {"init_log_var": -3.0})
    losses = torch.tensor([0.001, 0.001])
    obj = s.objective(losses, s.weights(losses)).detach()
    expected = float((0.5 * math.exp(3.0) * 0.001 + 0.5 * -3.0) * 2)
    assert float(obj) == pytest.approx(expected, rel=1e-5) and float(obj) < 0


def test_uncertainty_parameters_are_registered_with_the_optimizer() -> None:
    pre, _ = tiny_dataset(n=32)
    model = build_model("mmoe", pre.schema, pre.table_sizes(), MOE)
    s = build_weighting("uncertainty", model.loss_task_names, {"lr": 0.01})
    opt = build_optimizer(model, s, OptimizerConfig())
    groups = {g["name"]: g for g in opt.param_groups}
    assert any(p is s.log_var for p in groups["balancing"]["params"])
    assert groups["balancing"]["lr"] == 0.01 and groups["balancing"]["weight_decay"] == 0.0


# -- GradNorm ----------------------------------------------------------------------------------
def gradnorm_toy(c: float, steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = x @ torch.randn(5)
    shared = nn.Linear(5, 8)
    head = nn.Linear(8, 1)
    s = build_weighting("gradnorm", TASKS, {"alpha": 1.0, "lr": 0.05})
    opt = Adam(
        [
            {"params": [*shared.parameters(), *head.parameters()], "lr": 1e-3},
            {"params": list(s.parameters()), "lr": s.param_lr},
        ]
    )
    seen = []
    first = None
    for _ in range(steps):
        loss = (head(torch.relu(shared(x))).squeeze(-1) - y).square().mean()
        if first is None:
            first = torch.stack([c * loss, loss]).detach()
        opt.zero_grad()
        res = multitask_backward({"a": c * loss, "b": loss}, s, shared_parameters=[shared.weight])
        opt.step()
        s.on_step_end(res.losses)
        seen.append(s.current().detach().clone())
    assert first is not None
    torch.testing.assert_close(s.initial, first)  # recorded once, at the first step
    return seen, s.initial


def test_gradnorm_two_scaled_copies_converge_to_inverse_weights() -> None:
    c = 4.0
    seen, _ = gradnorm_toy(c, 150)
    for w in seen:
        assert bool((w > 0).all())
        assert float(w.sum()) == pytest.approx(2.0, abs=1e-5)
    w = seen[-1]
    assert float(w[0] / w[1]) == pytest.approx(1 / c, rel=0.1)


def test_gradnorm_weight_loss_does_not_change_the_model_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    shared = nn.Linear(3, 4)
    heads = nn.ModuleList([nn.Linear(4, 1) for _ in TASKS])

    def losses() -> dict[str, torch.Tensor]:
        h = shared(x)
        return {t: (heads[i](h).squeeze(-1) - 2 * i).square().mean() for i, t in enumerate(TASKS)}

    params = [*shared.parameters(), *heads.parameters()]
    multitask_backward(losses(), build_weighting("equal", TASKS))
    ref = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    gn = build_weighting("gradnorm", TASKS)
    multitask_backward(losses(), gn, shared_parameters=[shared.weight])
    for p, r in zip(params, ref, strict=True):  # initial weights are 1: same model gradient
        torch.testing.assert_close(p.grad, r)
    assert gn.logits.grad is not None and bool(gn.logits.grad.abs().sum() > 0)


def test_gradnorm_layer_choice() -> None:
    pre, _ = tiny_dataset(n=32)
    model = build_model("shared_bottom", pre.schema, pre.table_sizes(), {"bottom_hidden": (8, 6)})
    last = build_weighting("gradnorm", model.loss_task_names).grad_parameters(model)
    mats = [
        p
        for p in model.shared_parameters()
        if p.ndim >= 2 and all(p is not e for e in model.embedding_parameters())
    ]
    assert len(last) == 1 and last[0] is mats[-1]
    with pytest.raises(ConfigError, match="matches no shared parameter"):
        build_weighting("gradnorm", model.loss_task_names, {"layer": "nope."}).grad_parameters(
            model
        )


# -- DWA / FAMO / DTP / log-loss ----------------------------------------------------------------
def test_dwa_equal_loss_ratios_give_equal_weights() -> None:
    s = build_weighting("dwa", ("a", "b", "c"), {"unit": "steps", "window": 2})
    for k in range(8):
        torch.testing.assert_close(s.weights(torch.ones(3)), torch.ones(3))  # first 2 windows: 1
        # every task's loss halves each window: equal ratios
        s.on_step_end(torch.tensor([1.0, 5.0, 50.0]) * 0.5 ** (k // 2))
        if k >= 3:
            break
    w = s.weights(torch.ones(3))
    torch.testing.assert_close(w, torch.ones(3), atol=1e-6, rtol=0)


def test_dwa_formula_and_epoch_windows() -> None:
    s = build_weighting("dwa", TASKS, {"temperature": 2.0})
    for loss in ([1.0, 1.0], [0.5, 0.9]):
        s.on_step_end(torch.tensor(loss))
        s.on_step_end(torch.tensor(loss))
        s.on_epoch_end(0)
    r = torch.tensor([0.5, 0.9])
    expected = 2 * torch.softmax(r / 2.0, 0)
    torch.testing.assert_close(s.weights(torch.ones(2)), expected.float())
    assert float(s.weights(torch.ones(2))[1]) > 1.0  # the slower task gets more weight


def test_famo_weights_and_logit_update() -> None:
    s = build_weighting("famo", TASKS, {"update": "next_batch"})
    w = s.weights(torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(w, torch.tensor([1.6, 0.4]))  # 2 * (1/L) / sum(1/L)
    s.on_step_end(torch.tensor([1.0, 1.0]))
    s.on_step_end(torch.tensor([0.5, 1.0]))  # task a improved, b did not
    assert float(s.logits[1]) > float(s.logits[0])  # FAMO shifts weight to the slow task


def test_log_loss_weights() -> None:
    s = build_weighting("log_loss", TASKS)
    torch.testing.assert_close(s.weights(torch.tensor([2.0, 0.5])), torch.tensor([0.5, 2.0]))


def test_batch_auc_matches_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300).astype(np.float64)
    p = np.round(rng.random(300) + 0.3 * y, 1)  # many ties
    got = float(batch_auc(torch.from_numpy(p), torch.from_numpy(y)))
    assert got == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert batch_auc(torch.ones(3), torch.ones(3)) is None


def test_dtp_gives_priority_to_the_task_with_the_lower_kpi() -> None:
    s = build_weighting("dtp", TASKS, {"gamma": 2.0})
    s.kpi.copy_(torch.tensor([0.9, 0.6], dtype=torch.float64))
    w = s.weights(torch.ones(2))
    expected = [-(0.1**2) * math.log(0.9), -(0.4**2) * math.log(0.6)]
    assert w.tolist() == pytest.approx(expected, rel=1e-5)


# -- trainer integration -----------------------------------------------------------------------
def make_trainer(name: str, params: dict | None = None, **cfg: object) -> tuple[Trainer, object]:
    pre, ds = tiny_dataset(n=96)
    torch.manual_seed(0)
    model = build_model("mmoe", pre.schema, pre.table_sizes(), MOE)
    strategy = build_weighting(name, model.loss_task_names, params or {})
    config = TrainingConfig(epochs=1, batch_size=32, progress=False, **cfg)  # type: ignore[arg-type]
    return Trainer(model, pre.schema, config=config, strategy=strategy, run_dir=cfg_dir), ds


cfg_dir = None


@pytest.mark.parametrize("name", ["gradnorm", "dwa", "famo", "dtp", "uncertainty", "alternating"])
def test_strategy_state_survives_checkpoint_resume(name: str, tmp_path) -> None:
    global cfg_dir
    cfg_dir = tmp_path / "run"
    params = {"unit": "steps"} if name == "dwa" else {}
    try:
        t1, ds = make_trainer(name, params)
        t1.fit(ds)
        saved = {k: v.clone() for k, v in t1.strategy.state_dict().items()}
        ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
        for k, v in saved.items():
            torch.testing.assert_close(ckpt.strategy[k], v, rtol=0, atol=0)
        t2, _ = make_trainer(name, params)
        t2.fit(ds, resume=True)  # already at the last epoch: restores, trains nothing
        for k, v in t2.strategy.state_dict().items():
            torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
        assert any(float(v.float().abs().sum()) > 0 for v in saved.values())
    finally:
        cfg_dir = None


def test_alternating_leaves_the_other_tower_untouched() -> None:
    trainer, ds = make_trainer("alternating", {}, optimizer={"task_lr": {"watch": 0.01}})
    model = trainer.model
    tasks = model.loss_task_names
    before = {t: [p.detach().clone() for p in model.task_parameters(t)] for t in tasks}
    shared_before = [p.detach().clone() for p in model.shared_parameters()]
    from mtlrec.train.step import StepContext, train_step

    ctx = StepContext(model, trainer.loss_fn, trainer.strategy, trainer.optimizer)
    batch = next(iter(ds.batches(32)))
    active = tasks[trainer.strategy.active()]
    other = next(t for t in tasks if t != active)
    train_step(ctx, batch)
    for p, b in zip(model.task_parameters(other), before[other], strict=True):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    assert any(
        not torch.equal(p.detach(), b)
        for p, b in zip(model.task_parameters(active), before[active], strict=True)
    )
    assert any(
        not torch.equal(p.detach(), b)
        for p, b in zip(model.shared_parameters(), shared_before, strict=True)
    )
    assert trainer.strategy.active() != tasks.index(active)  # the next step trains the other
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["task:watch"] == 0.01


def test_per_task_learning_rates_in_joint_training() -> None:
    trainer, _ = make_trainer("static", {}, optimizer={"task_lr": {"click": 0.05}})
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    ids = {id(p) for p in groups["task:click"]["params"]}
    assert groups["task:click"]["lr"] == 0.05
    assert ids == {id(p) for p in trainer.model.task_parameters("click")}
    assert not ids & {id(p) for p in groups["dense"]["params"]}
    with pytest.raises(ConfigError, match="unknown tasks"):
        make_trainer("static", {}, optimizer={"task_lr": {"nope": 0.1}})


def test_representation_target() -> None:
    pre, ds = tiny_dataset(n=64)
    batch = next(iter(ds.batches(32)))
    for model_name, params, ok in [
        ("shared_bottom", {"bottom_hidden": (8,)}, True),
        ("mmoe", MOE, False),
    ]:
        torch.manual_seed(0)
        model = build_model(model_name, pre.schema, pre.table_sizes(), params)
        s = build_weighting("mgda", model.loss_task_names, {"grad_target": "representation"})
        trainer = Trainer(model, pre.schema, strategy=s, config=TrainingConfig(progress=False))
        from mtlrec.train.step import StepContext, train_step

        ctx = StepContext(model, trainer.loss_fn, s, trainer.optimizer)
        if ok:
            res = train_step(ctx, batch)
            assert torch.isfinite(res.objective)
            assert float(s.last_alpha.sum()) == pytest.approx(1.0, abs=1e-5)
        else:
            with pytest.raises(ConfigError, match="share no representation"):
                train_step(ctx, batch)


def test_strategies_are_chosen_in_the_config() -> None:
    from mtlrec.config import ExperimentConfig

    cfg = ExperimentConfig.from_dict(
        {
            "data": {"dataset": "census-income"},
            "model": {"name": "mmoe"},
            "balancing": {"name": "gradnorm", "alpha": 0.5, "layer": "all"},
        }
    )
    s = build_weighting(cfg.balancing.name, TASKS, cfg.balancing.params())
    assert s.alpha == 0.5 and s.layer == "all"
    with pytest.raises(ConfigError, match="parameter alpah"):
        build_weighting("gradnorm", TASKS, {"alpah": 1.0})
    with pytest.raises(ConfigError, match="unknown balancing strategy"):
        build_weighting("gradnrom", TASKS)


def test_gradient_strategy_on_a_model_without_shared_parameters_is_a_config_error() -> None:
    from mtlrec.losses import MultiTaskLoss
    from mtlrec.train.step import StepContext, train_step

    pre, ds = tiny_dataset(n=32)
    model = build_model("single_task", pre.schema, pre.table_sizes(), {"bottom_hidden": (4,)})
    s = build_weighting("pcgrad", model.loss_task_names)
    ctx = StepContext(
        model,
        MultiTaskLoss(list(pre.schema.tasks)),
        s,
        build_optimizer(model, s, OptimizerConfig()),
    )
    with pytest.raises(ConfigError, match="shares none"):
        train_step(ctx, next(iter(ds.batches(32))))
