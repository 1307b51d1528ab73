"""Invariants of every registered balancing strategy, with 2, 3 and 4 tasks (the registry is
iterated: a new strategy fails :func:`test_every_strategy_has_its_invariants` until it states its
own invariant here).

* each strategy's defining property on random losses and per-task gradients (hypothesis):
  the formula of its weights, or the optimality condition its solver must meet;
* permutation equivariance: relabelling the tasks relabels the weights and leaves the shared
  update unchanged (every strategy whose rule does not depend on task positions);
* state: a stateful strategy's state changes its output and survives a state_dict round trip;
  a stateless one keeps no state;
* training: a few steps on a model with T tasks give finite losses and a gradient to every
  parameter the step trains, the strategy's own parameters included, and those parameters are
  in the optimiser.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlrec.config import TrainingConfig
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.preprocess import Preprocessor
from mtlrec.models import build_model
from mtlrec.registry import WEIGHTINGS
from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec
from mtlrec.train.step import StepContext, train_step
from mtlrec.train.trainer import Trainer
from mtlrec.weighting import build_weighting
from mtlrec.weighting.base import Weighting

STRATEGIES = WEIGHTINGS.names()
SIZES = (2, 3, 4)
HYP = settings(deadline=None, max_examples=20)


def names(t: int) -> tuple[str, ...]:
    return tuple(f"t{i}" for i in range(t))


class Case:
    """Random losses ``[T]`` and per-task gradients ``[T, P]`` (float64) from a seed, with
    conflicts (some pairs of tasks pull against each other)."""

    def __init__(self, t: int, seed: int, p: int = 6) -> None:
        rng = np.random.default_rng(seed)
        self.t, self.rng = t, rng
        self.losses = torch.from_numpy(rng.uniform(0.05, 3.0, t))
        base = rng.normal(size=p)
        j = rng.normal(size=(t, p)) - 0.8 * np.outer(rng.choice([-1.0, 1.0], t), base)
        j *= rng.uniform(0.2, 5.0, t)[:, None]  # gradients of different sizes
        self.jac = torch.from_numpy(j)


def step(
    s: Weighting, losses: torch.Tensor, jac: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One strategy step on a Jacobian: (weights, shared update), as multitask_backward does."""
    s.begin_step(None)
    w = s.weights(losses, jac if s.needs_grads else None)
    return w, s.aggregate(jac, w)


# -- each strategy's defining property -------------------------------------------------------------
def inv_static(c: Case) -> None:
    given_w = {n: float(x) for n, x in zip(names(c.t), c.rng.uniform(0, 3, c.t), strict=True)}
    s = build_weighting("static", names(c.t), {"weights": given_w})
    w, _ = step(s, c.losses, c.jac)
    np.testing.assert_allclose(w.numpy(), list(given_w.values()), rtol=1e-6)


def inv_equal(c: Case) -> None:
    w, g = step(build_weighting("equal", names(c.t)), c.losses, c.jac)
    assert w.tolist() == [1.0] * c.t
    np.testing.assert_allclose(g.numpy(), c.jac.sum(0).numpy(), rtol=1e-12)


def inv_log_loss(c: Case) -> None:
    w, _ = step(build_weighting("log_loss", names(c.t), {"eps": 1e-12}), c.losses, c.jac)
    np.testing.assert_allclose((w * c.losses).numpy(), np.ones(c.t), rtol=1e-9)  # w L = 1


def inv_uncertainty(c: Case) -> None:
    forms = {n: ("regression" if c.rng.random() < 0.5 else "classification") for n in names(c.t)}
    s = build_weighting("uncertainty", names(c.t), {"forms": forms})
    with torch.no_grad():
        s.log_var.copy_(torch.from_numpy(c.rng.normal(size=c.t)))
    w, _ = step(s, c.losses, c.jac)
    factor = np.array([0.5 if forms[n] == "regression" else 1.0 for n in names(c.t)])
    sv = s.log_var.detach().double().numpy()
    np.testing.assert_allclose(w.numpy(), factor * np.exp(-sv), rtol=1e-5)
    # d/ds of c e^{-s} L + s / 2 (the objective's dependence on the log-variances)
    s.objective(c.losses.float(), w.float()).backward()
    want = -factor * np.exp(-sv) * c.losses.numpy() + 0.5
    np.testing.assert_allclose(s.log_var.grad.numpy(), want, rtol=1e-4, atol=1e-6)


def inv_dtp(c: Case) -> None:
    gamma = float(c.rng.uniform(0, 3))
    s = build_weighting("dtp", names(c.t), {"gamma": gamma})
    kpi = c.rng.uniform(0.05, 0.95, c.t)
    s.kpi.copy_(torch.from_numpy(kpi))
    w, _ = step(s, c.losses, c.jac)
    np.testing.assert_allclose(w.numpy(), -((1 - kpi) ** gamma) * np.log(kpi), rtol=1e-5)
    order = np.argsort(kpi)  # a lower KPI (a harder task) never gets a lower weight
    assert (np.diff(w.numpy()[order]) <= 1e-9).all()


def inv_dwa(c: Case) -> None:
    temp = float(c.rng.uniform(0.5, 4))
    s = build_weighting("dwa", names(c.t), {"unit": "steps", "window": 2, "temperature": temp})
    hist = [c.rng.uniform(0.1, 2.0, c.t) for _ in range(6)]  # 3 windows of 2 steps
    for k, loss in enumerate(hist):
        w, _ = step(s, c.losses, c.jac)
        if k < 4:
            assert w.tolist() == [1.0] * c.t  # weight 1 in the first two windows
        s.on_step_end(torch.from_numpy(loss))
    means = [np.mean(hist[i : i + 2], axis=0) for i in (0, 2, 4)]
    r = means[2] / means[1]
    want = c.t * np.exp(r / temp) / np.exp(r / temp).sum()
    w, _ = step(s, c.losses, c.jac)
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-6)


def inv_famo(c: Case) -> None:
    s = build_weighting("famo", names(c.t), {"eps": 1e-12})
    w, _ = step(s, c.losses, c.jac)
    wl = (w * c.losses).numpy()  # fresh logits: every task's weighted loss is the same
    np.testing.assert_allclose(wl, np.full(c.t, wl.mean()), rtol=1e-5)
    assert float(w.sum()) == pytest.approx(c.t, rel=1e-6)
    logits = c.rng.normal(size=c.t)
    s.logits.copy_(torch.from_numpy(logits))
    w, _ = step(s, c.losses, c.jac)
    z = np.exp(logits) / np.exp(logits).sum()
    wl = (w * c.losses).numpy()
    np.testing.assert_allclose(wl / wl.sum(), z, rtol=1e-5)  # w_t L_t ∝ softmax(logits)_t


def inv_gradnorm(c: Case) -> None:
    s = build_weighting("gradnorm", names(c.t))
    logits = c.rng.normal(size=c.t)
    with torch.no_grad():
        s.logits.copy_(torch.from_numpy(logits))
    w, g = step(s, c.losses.float(), c.jac.float())
    z = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(w.numpy(), c.t * z, rtol=1e-5)  # T softmax: positive, sum T
    np.testing.assert_allclose(g.numpy(), (w.double() @ c.jac).numpy(), rtol=1e-5, atol=1e-6)
    obj = s.objective(c.losses.float(), w).detach()  # the weight loss adds no value to it
    assert float(obj) == pytest.approx(float((w.double() * c.losses).sum()), rel=1e-5)


def inv_mgda(c: Case) -> None:
    s = build_weighting("mgda", names(c.t))
    _, g = step(s, c.losses, c.jac)
    a = s.shared_weights(c.losses, c.jac).double()  # float64 (last_alpha is float32)
    gram = c.jac @ c.jac.T
    assert float(a.min()) >= 0 and float(a.sum()) == pytest.approx(1.0, abs=1e-6)
    # min-norm optimality on the simplex: no task gradient is more opposed to g than g itself
    norm2 = float(a @ gram @ a)
    proj = (gram @ a).numpy()  # g_t . g
    assert proj.min() >= norm2 - 1e-6 * max(norm2, float(gram.diagonal().max()) * 1e-3)
    atol = 1e-6 * float(c.jac.abs().max())  # last_alpha is stored in float32
    np.testing.assert_allclose(g.numpy(), (a @ c.jac).numpy(), rtol=1e-5, atol=atol)


def inv_pe_ltr(c: Case) -> None:
    raw = c.rng.uniform(0, 1, c.t)
    bounds = raw / raw.sum() * c.rng.uniform(0, 0.95)
    s = build_weighting(
        "pe_ltr", names(c.t), {"bounds": dict(zip(names(c.t), bounds, strict=True))}
    )
    step(s, c.losses, c.jac)
    a = s.last_alpha.double().numpy()
    assert a.sum() == pytest.approx(1.0, abs=1e-5)
    assert (a >= bounds - 1e-6).all()


def inv_imtl(c: Case) -> None:
    s = build_weighting("imtl", names(c.t))
    _, g = step(s, c.losses, c.jac)
    units = c.jac / c.jac.norm(dim=1, keepdim=True)
    proj = (units @ g).numpy()  # equal projections on every task's unit gradient
    np.testing.assert_allclose(proj, np.full(c.t, proj.mean()), rtol=1e-6, atol=1e-9)
    assert float(s.last_alpha.sum()) == pytest.approx(c.t, rel=1e-5)


def inv_pcgrad(c: Case) -> None:
    s = build_weighting("pcgrad", names(c.t), {"seed": int(c.rng.integers(100))})
    _, g = step(s, c.losses, c.jac)
    norms = c.jac.norm(dim=1)
    assert float(g.norm()) <= float(norms.sum()) * (1 + 1e-9)  # projections never lengthen
    if c.t == 2:  # each task's projected gradient is orthogonal to the other on a conflict
        assert ((c.jac @ g).numpy() >= -1e-9 * float(norms.max()) ** 2).all()
    agree = c.jac.abs()  # no conflict at all: the plain sum
    _, g = step(s, c.losses, agree)
    np.testing.assert_allclose(g.numpy(), agree.sum(0).numpy(), rtol=1e-12)


def inv_cagrad(c: Case) -> None:
    cc = float(c.rng.uniform(0.05, 0.95))
    s = build_weighting("cagrad", names(c.t), {"c": cc})
    _, g = step(s, c.losses, c.jac)
    d = g.numpy() * (1 + cc**2) / c.t
    g0 = c.jac.mean(0).numpy()
    j = c.jac.numpy()
    assert np.linalg.norm(d - g0) <= cc * np.linalg.norm(g0) * (1 + 1e-6)  # in the ball
    # the worst task gains at least as much as under the average gradient (feasible too)
    scale = np.linalg.norm(j, axis=1).max() * np.linalg.norm(g0)
    assert (j @ d).min() >= (j @ g0).min() - 1e-6 * scale
    s0 = build_weighting("cagrad", names(c.t), {"c": 0.0})
    np.testing.assert_allclose(step(s0, c.losses, c.jac)[1].numpy(), j.sum(0), rtol=1e-12)


def inv_alternating(c: Case) -> None:
    every = int(c.rng.integers(1, 4))
    s = build_weighting("alternating", names(c.t), {"every": every})
    counts = np.zeros(c.t)
    for k in range(c.t * every):
        w, _ = step(s, c.losses, c.jac)
        assert sorted(w.tolist()) == [0.0] * (c.t - 1) + [1.0]  # one task at a time
        counts += w.numpy()
        assert int(w.argmax()) == k // every % c.t  # cyclic, `every` steps each
        s.on_step_end(c.losses)
    assert counts.tolist() == [float(every)] * c.t


INVARIANTS: dict[str, Callable[[Case], None]] = {
    "alternating": inv_alternating,
    "cagrad": inv_cagrad,
    "dtp": inv_dtp,
    "dwa": inv_dwa,
    "equal": inv_equal,
    "famo": inv_famo,
    "gradnorm": inv_gradnorm,
    "imtl": inv_imtl,
    "log_loss": inv_log_loss,
    "mgda": inv_mgda,
    "pcgrad": inv_pcgrad,
    "pe_ltr": inv_pe_ltr,
    "static": inv_static,
    "uncertainty": inv_uncertainty,
}


def test_every_strategy_has_its_invariants() -> None:
    assert set(INVARIANTS) == set(STRATEGIES)


@pytest.mark.parametrize("name", STRATEGIES)
@HYP
@given(t=st.sampled_from(SIZES), seed=st.integers(0, 2**20))
def test_defining_property(name: str, t: int, seed: int) -> None:
    INVARIANTS[name](Case(t, seed))


# -- permutation equivariance ----------------------------------------------------------------------
# the rule of these depends on the tasks' positions: PCGrad draws one random order per position,
# alternating training visits the tasks in their order
POSITIONAL = {"pcgrad", "alternating"}


def permuted_params(name: str, t: int, perm: list[int], rng: np.random.Generator) -> tuple:
    """The same per-task options for the strategy over the tasks and over the permuted tasks."""
    vals = rng.uniform(0.05, 0.2, t)
    if name == "static":
        key = "weights"
    elif name == "pe_ltr":
        key = "bounds"
    else:
        return {}, {}
    a = {n: float(v) for n, v in zip(names(t), vals, strict=True)}
    b = {names(t)[i]: float(vals[perm[i]]) for i in range(t)}
    return {key: a}, {key: b}


@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - POSITIONAL))
@HYP
@given(t=st.sampled_from(SIZES), seed=st.integers(0, 2**20), data=st.data())
def test_relabelling_the_tasks_relabels_the_weights(
    name: str, t: int, seed: int, data: st.DataObject
) -> None:
    c = Case(t, seed)
    perm = data.draw(st.permutations(range(t)), label="perm")
    pa_, pb = permuted_params(name, t, list(perm), c.rng)
    s, sp = build_weighting(name, names(t), pa_), build_weighting(name, names(t), pb)
    for _ in range(3):  # a few steps, so that history-based strategies use their state
        w, g = step(s, c.losses, c.jac)
        wp, gp = step(sp, c.losses[list(perm)], c.jac[list(perm)])
        np.testing.assert_allclose(wp.numpy(), w.numpy()[list(perm)], rtol=1e-5, atol=1e-7)
        # an entry of the update can be a near-cancelling sum of large terms: strategies whose
        # state is float32 (FAMO's logits) agree to float32 rounding of the largest term there
        scale = max(1.0, float(g.abs().max()))
        np.testing.assert_allclose(gp.numpy(), g.numpy(), rtol=1e-5, atol=1e-6 * scale)
        s.on_step_end(c.losses)
        sp.on_step_end(c.losses[list(perm)])
        c.losses = c.losses * torch.from_numpy(c.rng.uniform(0.5, 1.0, t))


# -- state -----------------------------------------------------------------------------------------
# strategies whose output depends on what they have seen (or learnt)
STATEFUL = {"alternating", "dtp", "dwa", "famo", "gradnorm", "pcgrad", "uncertainty"}


def advance(s: Weighting, c: Case, steps: int = 5) -> None:
    """Run ``steps`` steps: weights, update, a move of the strategy's own parameters, and the
    end-of-step / end-of-epoch hooks (DTP's KPIs set as an observation would)."""
    for k in range(steps):
        w, _ = step(s, c.losses.float(), c.jac.float())
        s.after_update(c.losses, lambda: c.losses * 0.9)
        own = [p for p in s.parameters() if p.requires_grad]
        if own:
            s.objective(c.losses.float(), w.float()).backward()
            with torch.no_grad():
                for p in own:
                    p -= 0.1 * p.grad
                    p.grad = None
        if hasattr(s, "kpi"):
            s.kpi.copy_(torch.from_numpy(c.rng.uniform(0.2, 0.9, c.t)))
        s.on_step_end(c.losses * (1 + 0.3 * k))
        s.on_epoch_end(k)
        c.losses = c.losses * torch.from_numpy(c.rng.uniform(0.3, 1.0, c.t))


def test_stateful_set_is_exact() -> None:
    assert set(STRATEGIES) >= STATEFUL


@pytest.mark.parametrize("name", STRATEGIES)
@settings(deadline=None, max_examples=8)
@given(t=st.sampled_from(SIZES), seed=st.integers(0, 2**20))
def test_state_changes_the_output_and_round_trips(name: str, t: int, seed: int) -> None:
    c = Case(t, seed)
    params = {"unit": "steps"} if name == "dwa" else {}
    s = build_weighting(name, names(t), params)
    advance(s, c)
    state = {k: v.clone() for k, v in s.state_dict().items()}
    loaded = build_weighting(name, names(t), params)
    loaded.load_state_dict(state)
    fresh = build_weighting(name, names(t), params)
    probe = c.jac.float()
    outs = []
    for x in (s, loaded, fresh):
        w, g = step(x, c.losses.float(), probe)
        outs.append((w.detach(), g.detach()))
        x.on_step_end(c.losses)
    (w, g), (wl, gl), (wf, gf) = outs
    torch.testing.assert_close(wl, w, rtol=0, atol=0)  # the state is all there is
    torch.testing.assert_close(gl, g, rtol=0, atol=0)
    same_as_fresh = torch.equal(wf, w) and torch.equal(gf, g)
    if name == "pcgrad":  # its state is the step of its random orders (which may not matter)
        assert int(s.step) == int(loaded.step) == 6 and s.orders() == loaded.orders()
    elif name in STATEFUL:
        assert not same_as_fresh, f"{name}: its state does not change its output"
    else:
        assert same_as_fresh, f"{name}: a stateless strategy's output changed with its history"
        persistent = {k for k in s.state_dict() if k not in ("fixed", "bounds", "factor")}
        assert not persistent, f"{name}: keeps state {persistent}"


# -- training on a model with T tasks ------------------------------------------------------------
@cache
def data4() -> tuple[Preprocessor, ColumnarDataset]:
    """Four binary tasks, the last masked by the first (some batches have few of its rows)."""
    rng = np.random.default_rng(0)
    n = 96
    user, item, price = rng.integers(0, 12, n), rng.integers(0, 15, n), rng.normal(size=n)
    t0 = (item % 3 == 0).astype(np.int64)
    table = pa.table(
        {
            "user": pa.array([f"u{u}" for u in user]),
            "item": pa.array([f"i{i}" for i in item]),
            "price": pa.array(price),
            "t0": pa.array(t0),
            "t1": pa.array((price > 0).astype(np.int64)),
            "t2": pa.array(((user + item) % 2).astype(np.int64)),
            "t3": pa.array(t0 * (user % 2)),
        }
    )
    schema = Schema(
        features=(
            SparseFeature(name="user", embedding_dim=4),
            SparseFeature(name="item", embedding_dim=4),
            DenseFeature(name="price"),
        ),
        tasks=tuple(
            TaskSpec(name=f"t{i}", kind="binary", mask="t0" if i == 3 else None) for i in range(4)
        ),
    )
    pre = Preprocessor.fit(schema, table)
    return pre, pre.encode(table)


def make(name: str, t: int) -> tuple[Trainer, ColumnarDataset]:
    pre, ds = data4()
    schema = Schema(features=pre.schema.features, tasks=pre.schema.tasks[:t])
    torch.manual_seed(0)
    model = build_model(
        "mmoe",
        schema,
        pre.table_sizes(),
        {"num_experts": 3, "expert_hidden": (8, 6), "tower_hidden": (6,), "activation": "tanh"},
    )
    strategy = build_weighting(name, model.loss_task_names, {})
    cfg = TrainingConfig(epochs=1, batch_size=32, progress=False)
    return Trainer(model, schema, config=cfg, strategy=strategy), ds


@pytest.mark.parametrize("t", SIZES)
@pytest.mark.parametrize("name", STRATEGIES)
def test_training_steps_reach_every_parameter(name: str, t: int) -> None:
    trainer, ds = make(name, t)
    ctx = StepContext(trainer.model, trainer.loss_fn, trainer.strategy, trainer.optimizer)
    named = dict(trainer.model.named_parameters())
    named |= {f"strategy.{k}": p for k, p in trainer.strategy.named_parameters()}
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for k, p in trainer.strategy.named_parameters():
        assert id(p) in in_opt, f"{name}: its parameter {k} is not optimised"
    touched: set[str] = set()
    for i, batch in enumerate(list(ds.batches(32, shuffle=True, seed=0)) * 2):
        res = train_step(ctx, batch, where=f"step {i}")
        assert res.losses.shape == (t,) and res.weights.shape == (t,)
        assert torch.isfinite(res.losses).all() and torch.isfinite(res.objective)
        assert torch.isfinite(res.weights).all()
        for k, p in named.items():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient of {k}"
                if p.grad.abs().sum() > 0:
                    touched.add(k)
    missing = sorted(set(named) - touched)
    assert not missing, f"{name} ({t} tasks): no gradient reached {missing}"
