"""CGC, PLE, ML-MMoE and the gate options (softmax temperature, hidden layers, expert dropout,
regularisers, DSelect-k) of every gated model."""

from __future__ import annotations

import itertools
import math
from functools import cache
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import ConfigError
from mtlrec.losses import MultiTaskLoss
from mtlrec.models import build_model
from mtlrec.models.base import MultiTaskModel
from mtlrec.nn.experts import ExpertBank
from mtlrec.nn.extraction import ExtractionLevel
from mtlrec.nn.gates import Gate, GateBank, GateOutput, code_matrices, gate_penalty, smooth_step
from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec

TASKS = ("a", "b", "c")
GATED = ("mmoe", "omoe", "cgc", "ple", "ml_mmoe")
SMALL: dict[str, dict[str, Any]] = {
    "mmoe": {"num_experts": 3, "expert_hidden": (8, 6), "tower_hidden": (4,)},
    "omoe": {"num_experts": 3, "expert_hidden": (8, 6), "tower_hidden": (4,)},
    "cgc": {"experts_per_task": 2, "shared_experts": 1, "expert_hidden": (8, 6)},
    "ple": {"num_levels": 2, "experts_per_task": 2, "shared_experts": 1, "expert_hidden": (8, 6)},
    "ml_mmoe": {"num_levels": 2, "num_experts": 3, "expert_hidden": (8, 6), "tower_hidden": (4,)},
}


@cache
def data3() -> tuple[Preprocessor, ColumnarDataset]:
    """Three binary tasks over two sparse fields and a dense one."""
    rng = np.random.default_rng(0)
    n = 96
    user, item, price = rng.integers(0, 12, n), rng.integers(0, 15, n), rng.normal(size=n)
    table = pa.table(
        {
            "user": pa.array([f"u{u}" for u in user]),
            "item": pa.array([f"i{i}" for i in item]),
            "price": pa.array(price),
            "a": pa.array((item % 3 == 0).astype(np.int64)),
            "b": pa.array((price > 0).astype(np.int64)),
            "c": pa.array(((user + item) % 2).astype(np.int64)),
        }
    )
    schema = Schema(
        features=(
            SparseFeature(name="user", embedding_dim=4),
            SparseFeature(name="item", embedding_dim=4),
            DenseFeature(name="price"),
        ),
        tasks=tuple(TaskSpec(name=t, kind="binary") for t in TASKS),
    )
    pre = Preprocessor.fit(schema, table)
    return pre, pre.encode(table)


def build(name: str, seed: int = 0, **over: Any) -> MultiTaskModel:
    pre, _ = data3()
    torch.manual_seed(seed)
    return build_model(name, pre.schema, pre.table_sizes(), {**SMALL[name], **over})


def batch(n: int = 96):
    return data3()[1].take(slice(0, n))


def task_loss(model: MultiTaskModel, task: str, b=None) -> Tensor:
    b = b or batch()
    spec = next(t for t in data3()[0].schema.tasks if t.name == task)
    return MultiTaskLoss([spec])(model(b.features), b)[task]


def per_expert_grad(bank: ExpertBank, grads: list[Tensor]) -> Tensor:
    """Sum of |gradient| of every expert of a bank, ``[E]``, from grads of its parameters."""
    e = bank.num_experts
    total = torch.zeros(e)
    for i, g in enumerate(grads):
        if i < len(bank.weights) and i == 0 and bank.shared_input:
            total += g.abs().view(g.shape[0], e, -1).sum((0, 2))  # weight [in, E*d]
        elif i == len(bank.weights) and bank.shared_input:
            total += g.abs().view(e, -1).sum(1)  # first bias [E*d]
        else:
            total += g.abs().flatten(1).sum(1)  # [E, ...]
    return total


def bank_grads(model: MultiTaskModel, loss: Tensor, bank: ExpertBank) -> Tensor:
    params = [*bank.weights, *bank.biases]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return per_expert_grad(bank, grads)


# -- shapes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate_type", ["softmax", "dselect"])
@pytest.mark.parametrize("name", GATED)
def test_shapes_width_one_towers_and_gate_rows(name: str, gate_type: str) -> None:
    model = build(name, gate_type=gate_type, dselect_k=2).eval()
    b = batch(11)
    with torch.no_grad():
        out = model(b.features)
    assert set(out.logits) == set(TASKS)
    for t in TASKS:
        assert out.logits[t].shape == (11,)
        assert model.heads.towers[t].layers[-1].out_features == 1
    assert out.gates
    for g in out.gates.values():
        assert g.shape[0] == 11 and (g >= 0).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(11), atol=1e-5, rtol=0)


def test_gate_names_and_widths_of_ple() -> None:
    model = build("ple", num_levels=3, experts_per_task=2, shared_experts=3)
    out = model(batch(5).features)
    e_all, e_task = 3 * 2 + 3, 2 + 3
    want = {f"level{i}.{t}" for i in (0, 1) for t in (*TASKS, "shared")} | set(TASKS)
    assert set(out.gates) == want
    for k, g in out.gates.items():
        assert g.shape == (5, e_all if k.endswith("shared") else e_task), k


# -- PLE structure -----------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_shared_gate_at_every_level_but_the_last_spans_all_experts(levels: int) -> None:
    model = build("ple", num_levels=levels, experts_per_task=2, shared_experts=1)
    lv = list(model.levels)
    assert [lvl.shared_gate is not None for lvl in lv] == [True] * (levels - 1) + [False]
    for lvl in lv[:-1]:
        assert lvl.shared_gate.num_experts == lvl.experts.num_experts == 3 * 2 + 1
    for lvl in lv:
        assert lvl.task_gates.num == 3 and lvl.task_gates.num_experts == 2 + 1


@pytest.mark.parametrize("shared_gate", [True, False])
def test_each_task_stream_reads_exactly_its_own_and_the_shared_experts(shared_gate: bool) -> None:
    # experts_per_task (2) != tasks (3): changing expert e's output must change task e // 2's
    # stream (and the shared stream, whose gate spans all experts) and no other stream
    torch.manual_seed(0)
    t, m, s = 3, 2, 2
    for first in (True, False):
        lvl = ExtractionLevel(t, m, s, 5, [4, 3], shared_gate=shared_gate, first=first).eval()
        x = torch.randn(7, 5) if first else torch.randn(t + 1, 7, 5)
        with torch.no_grad():
            ref, _ = lvl(x)
            for e in range(t * m + s):
                lvl.experts.biases[-1][e] += 1.0
                out, _ = lvl(x)
                lvl.experts.biases[-1][e] -= 1.0
                changed = {i for i in range(out.shape[0]) if not torch.allclose(out[i], ref[i])}
                own = {e // m} if e < t * m else set(range(t))
                want = own | ({t} if shared_gate else set())
                assert changed == want, (first, e, changed)


@pytest.mark.parametrize("levels", [2, 3])
def test_ple_gradient_isolation(levels: int) -> None:
    """Task k's loss never reaches task j's specific experts of the last level, nor (CGC) of the
    only level. At the first level of a multi-level PLE it does, through the shared gate, which
    weighs every expert and feeds the next level's shared experts (PLE paper, Section 4.3)."""
    model = build("ple", num_levels=levels, experts_per_task=2, shared_experts=1)
    m, t = 2, 3
    first, last = model.levels[0].experts, model.levels[-1].experts
    for k, task in enumerate(TASKS):
        loss = task_loss(model, task)
        g_last = bank_grads(model, loss, last)
        g_first = bank_grads(model, loss, first)
        for j in range(t):
            own = g_last[j * m : (j + 1) * m]
            assert own.sum() > 0 if j == k else (own == 0).all(), (task, j)
            assert g_first[j * m : (j + 1) * m].sum() > 0  # via the shared gate
        assert g_last[t * m :].sum() > 0  # shared experts serve every task


def test_cgc_gradient_isolation_at_its_level() -> None:
    model = build("cgc", experts_per_task=2, shared_experts=1)
    bank = model.levels[0].experts
    for k, task in enumerate(TASKS):
        g = bank_grads(model, task_loss(model, task), bank)
        for j in range(3):
            blk = g[j * 2 : (j + 1) * 2]
            assert (blk > 0).all() if j == k else (blk == 0).all(), (task, j)
        assert (g[6:] > 0).all()


def test_task_gates_of_the_last_level_are_isolated() -> None:
    model = build("ple", num_levels=2)
    net = model.levels[-1].task_gates.net  # ParallelMLP over the task gates: member = task
    for k, task in enumerate(TASKS):
        loss = task_loss(model, task)
        grads = torch.autograd.grad(loss, list(net.weights))
        for j in range(3):
            gj = grads[-1][j]  # [in, width] of gate j (own input: stacked per member)
            assert (gj.abs().sum() > 0) == (j == k)


# -- parameter counts --------------------------------------------------------------------------
def _mlp_params(dims: list[int]) -> int:
    return sum(a * b + b for a, b in itertools.pairwise(dims))


def _emb_params(model: MultiTaskModel) -> int:
    lay = model.layout
    return sum(lay.table_sizes[t] * lay.table_dims[t] for t in lay.table_sizes)


def test_mmoe_parameter_count() -> None:
    e, h, tw = 5, [16, 8], [4]
    model = build("mmoe", num_experts=e, expert_hidden=h, tower_hidden=tw)
    d = model.embedding.out_dim
    t = len(TASKS)
    want = (
        _emb_params(model)
        + e * _mlp_params([d, *h])  # experts
        + t * (d * e + e)  # one linear gate per task
        + t * _mlp_params([h[-1], *tw, 1])  # towers
    )
    assert sum(p.numel() for p in model.parameters()) == want


@pytest.mark.parametrize(
    ("levels", "m", "s", "gh"), [(1, 2, 1, ()), (2, 2, 3, ()), (3, 1, 2, (5,))]
)
def test_ple_parameter_count(levels: int, m: int, s: int, gh: tuple) -> None:
    h, tw = [16, 8], [4]
    name = "cgc" if levels == 1 else "ple"
    extra = {} if levels == 1 else {"num_levels": levels}
    model = build(
        name,
        experts_per_task=m,
        shared_experts=s,
        expert_hidden=h,
        tower_hidden=tw,
        gate_hidden=gh,
        **extra,
    )
    t, d = len(TASKS), model.embedding.out_dim
    want = _emb_params(model) + t * _mlp_params([h[-1], *tw, 1])
    for lvl in range(levels):
        d_in = d if lvl == 0 else h[-1]
        want += (t * m + s) * _mlp_params([d_in, *h])  # experts
        want += t * _mlp_params([d_in, *gh, m + s])  # task gates
        if lvl < levels - 1:
            want += _mlp_params([d_in, *gh, t * m + s])  # shared gate over all experts
    assert sum(p.numel() for p in model.parameters()) == want


# -- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts",
    [
        {"gate_type": "dselect", "gate_regularizer": "entropy", "dselect_k": 2},
        {"gate_regularizer": "load_balance", "gate_hidden": (5,), "gate_dropout": 0.2},
    ],
    ids=["dselect", "softmax"],
)
@pytest.mark.parametrize("name", GATED)
def test_every_parameter_gets_a_gradient_with_gate_options(name: str, opts: dict) -> None:
    model = build(name, seed=1, tower_hidden=(8,), **opts).train()  # seed 0: a dead tower
    b = batch()
    out = model(b.features)
    assert set(out.aux_losses) == {f"gate_{opts['gate_regularizer']}"}
    losses = MultiTaskLoss(data3()[0].schema.tasks)(out, b)
    (sum(losses.values()) + sum(out.aux_losses.values())).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {pname}"


def test_ml_mmoe_with_one_level_is_mmoe() -> None:
    ml = build("ml_mmoe", num_levels=1, num_experts=3).eval()
    mm = build("mmoe", seed=1, num_experts=3).eval()
    lvl = ml.levels[0]
    with torch.no_grad():
        mm.embedding.load_state_dict(ml.embedding.state_dict())
        mm.experts.load_state_dict(lvl.experts.state_dict())
        mm.heads.load_state_dict(ml.heads.state_dict())
        w, bias = lvl.gates.net.weights[0], lvl.gates.net.biases[0]  # [in, T*E], [T*E]
        for k, t in enumerate(TASKS):
            mm.gates[t].net.layers[0].weight.copy_(w[:, k * 3 : (k + 1) * 3].T)
            mm.gates[t].net.layers[0].bias.copy_(bias[k * 3 : (k + 1) * 3])
        a, b = ml(batch().features), mm(batch().features)
    for t in TASKS:
        torch.testing.assert_close(a.logits[t], b.logits[t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.gates[t], b.gates[t], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["cgc", "ple", "ml_mmoe"])
@settings(deadline=None, max_examples=8)
@given(
    rows=st.lists(st.integers(0, 95), min_size=2, max_size=20),
    gt=st.sampled_from(["softmax", "dselect"]),
)
def test_batch_independence(name: str, rows: list[int], gt: str) -> None:
    model = _eval_model(name, gt)
    ds = data3()[1]
    with torch.no_grad():
        together = model(ds.features_at(torch.tensor(rows))).logits
        alone = model(ds.features_at(torch.tensor(rows[-1:]))).logits
    for t in TASKS:
        torch.testing.assert_close(together[t][-1], alone[t][0], atol=1e-5, rtol=1e-5)


@cache
def _eval_model(name: str, gate_type: str) -> MultiTaskModel:
    return build(name, gate_type=gate_type, gate_regularizer="load_balance").eval()


# -- no expert loops ---------------------------------------------------------------------------
class _CountMatmuls(TorchDispatchMode):
    OPS: ClassVar[set[str]] = {"mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "einsum"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _matmuls(model: MultiTaskModel) -> int:
    with torch.no_grad(), _CountMatmuls() as c:
        model.eval()(batch(8).features)
    return c.count


@pytest.mark.parametrize(
    ("name", "few", "many"),
    [
        (
            "ple",
            {"experts_per_task": 1, "shared_experts": 1},
            {"experts_per_task": 5, "shared_experts": 4},
        ),
        (
            "cgc",
            {"experts_per_task": 1, "shared_experts": 1},
            {"experts_per_task": 4, "shared_experts": 6},
        ),
        ("ml_mmoe", {"num_experts": 2}, {"num_experts": 7}),
        ("mmoe", {"num_experts": 2}, {"num_experts": 7}),
    ],
)
def test_matmul_count_does_not_grow_with_experts(name: str, few: dict, many: dict) -> None:
    # a model looping over its experts in Python would run more matmuls with more experts
    a, b = _matmuls(build(name, **few)), _matmuls(build(name, **many))
    assert a == b > 0
    # and every expert of a level lives in one ExpertBank
    model = build(name, **many)
    banks = [m for m in model.modules() if isinstance(m, ExpertBank)]
    levels = getattr(model, "levels", [model])
    assert len(banks) == len(levels)
    n = many.get("num_experts") or 3 * many["experts_per_task"] + many["shared_experts"]
    assert all(bk.num_experts == n for bk in banks)


# -- gates -------------------------------------------------------------------------------------
def test_smooth_step_values_and_flat_ends() -> None:
    g = 2.0
    t = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 5.0], requires_grad=True)
    s = smooth_step(t, g)
    inner = lambda u: -2 / g**3 * u**3 + 1.5 / g * u + 0.5  # noqa: E731
    want = torch.tensor([0.0, 0.0, inner(-0.5), 0.5, inner(0.5), 1.0, 1.0])
    torch.testing.assert_close(s.detach(), want)
    s.sum().backward()
    assert t.grad[[0, 1, 5, 6]].abs().max() < 1e-6  # flat (and C1) at and beyond +-gamma/2
    assert t.grad[3] == pytest.approx(1.5 / g)


@pytest.mark.parametrize("n", [2, 5, 8])
def test_code_matrices(n: int) -> None:
    bits, fold = code_matrices(n)
    m = math.ceil(math.log2(n))
    assert bits.shape == (2**m, m) and fold.shape == (2**m, n)
    assert torch.equal(fold.sum(1), torch.ones(2**m))  # every code names one expert
    assert torch.equal(fold[:n], torch.eye(n))
    assert len({tuple(r.tolist()) for r in bits}) == 2**m


@settings(deadline=None, max_examples=25)
@given(
    n=st.integers(2, 9), k=st.integers(1, 4), scale=st.floats(0.01, 100.0), seed=st.integers(0, 999)
)
def test_dselect_rows_are_distributions(n: int, k: int, scale: float, seed: int) -> None:
    torch.manual_seed(seed)
    gate = Gate(6, n, kind="dselect", k=k)
    w = gate(scale * torch.randn(9, 6))
    assert w.shape == (9, n) and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(9), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("n", "k"), [(8, 1), (8, 2), (5, 2), (16, 3)])
def test_dselect_selects_at_most_k_once_saturated(n: int, k: int) -> None:
    torch.manual_seed(n + k)
    gate = Gate(6, n, kind="dselect", k=k, gamma=1.0)
    x = torch.randn(64, 6)
    assert (gate(x) > 0).sum(-1).max() > k  # smooth at initialisation: more than k experts
    with torch.no_grad():
        gate.net.layers[-1].weight.mul_(1e4)  # every bit past +-gamma/2
    out = gate.route(x)
    nz = (out.weights > 0).sum(-1)
    assert (nz >= 1).all() and (nz <= k).all()
    if k == 1:
        assert torch.equal(out.weights.max(-1).values, torch.ones(64))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(64), atol=1e-6, rtol=0)
    assert float(gate_penalty(out, "entropy").detach()) == pytest.approx(0.0, abs=1e-6)
    fresh = Gate(6, n, kind="dselect", k=k).route(x)
    assert float(gate_penalty(fresh, "entropy").detach()) > 0.01


def test_temperature_limits() -> None:
    torch.manual_seed(3)
    x = torch.randn(20, 6)
    for make in (lambda t: Gate(6, 5, temperature=t), lambda t: GateBank(2, 6, 5, temperature=t)):
        torch.manual_seed(4)
        cold = make(1e-4)
        torch.manual_seed(4)
        hot = make(1e4)
        z = cold.logits(x)
        one_hot = torch.nn.functional.one_hot(z.argmax(-1), 5).float()
        torch.testing.assert_close(cold(x), one_hot, atol=1e-6, rtol=0)
        torch.testing.assert_close(hot(x), torch.full_like(one_hot, 0.2), atol=1e-3, rtol=0)
    # in a model: a hot PLE's task gates are uniform over own + shared experts
    out = build("ple", gate_temperature=1e5, experts_per_task=2, shared_experts=2)(
        batch(4).features
    )
    torch.testing.assert_close(out.gates["a"], torch.full((4, 4), 0.25), atol=1e-3, rtol=0)


def test_gate_dropout_drops_experts_only_in_training() -> None:
    torch.manual_seed(5)
    gate = Gate(6, 4, dropout=0.5)
    x = torch.randn(200, 6)
    gate.eval()
    torch.testing.assert_close(gate(x), torch.softmax(gate.logits(x), -1))
    gate.train()
    w = gate(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(200), atol=1e-6, rtol=0)
    zeros = (w == 0).float().mean()
    assert 0.3 < zeros < 0.55  # about half dropped (rows that lost every expert keep theirs)


def test_penalties_analytic() -> None:
    uniform = GateOutput(torch.full((10, 4), 0.25))
    assert float(gate_penalty(uniform, "load_balance")) == pytest.approx(0.0, abs=1e-7)
    assert float(gate_penalty(uniform, "entropy")) == pytest.approx(math.log(4), rel=1e-6)
    skew = GateOutput(torch.tensor([[1.0, 0, 0, 0]]).expand(10, 4))
    # importance (10, 0, 0, 0): CV^2 = var / mean^2 = 3
    assert float(gate_penalty(skew, "load_balance")) == pytest.approx(3.0, rel=1e-6)
    assert float(gate_penalty(skew, "entropy")) == pytest.approx(0.0, abs=1e-6)
    assert gate_penalty(uniform, "none") is None


def test_aux_loss_is_weighted_and_off_by_default() -> None:
    b = batch(32).features
    assert build("ple")(b).aux_losses == {}
    assert build("mmoe")(b).aux_losses == {}
    one = build("ple", gate_regularizer="load_balance", gate_reg_weight=1.0).eval()(b)
    half = build("ple", gate_regularizer="load_balance", gate_reg_weight=0.5).eval()(b)
    v1, v2 = one.aux_losses["gate_load_balance"], half.aux_losses["gate_load_balance"]
    assert float(v1.detach()) > 0
    torch.testing.assert_close(v2, 0.5 * v1)


def test_bad_gate_options_are_config_errors() -> None:
    for over in ({"gate_type": "topk"}, {"experts_per_task": 0}, {"gate_dropout": 1.0}):
        with pytest.raises(ConfigError):
            build("ple", **over)
    with pytest.raises(ValueError, match="kind"):
        Gate(4, 3, kind="topk")
