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
from mtlrec.testing import tiny_dataset

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
    """Sum of |gradient| of every expert of a bank, ``[E]``, from the grads of its stacked
    weights and biases (layer by layer: weights, then biases)."""
    e = bank.num_experts
    n = len(bank.dims)
    total = torch.zeros(e)
    for i, g in enumerate(grads):
        if i == 0 and bank.shared_input:
            total += g.abs().view(g.shape[0], e, -1).sum((0, 2))  # weight [in, E*d]
        elif i == n and bank.shared_input:
            total += g.abs().view(e, -1).sum(1)  # first bias [E*d]
        else:
            total += g.abs().flatten(1).sum(1)  # [E, ...]
    return total


def stacked(bank: ExpertBank, layer: int, kind: str, per_group: list[Tensor]) -> Tensor:
    """One layer's tensors of every group of a bank (``per_group``), stacked over experts."""
    axis = 1 if layer == 0 and bank.shared_input and kind == "weights" else 0
    return torch.cat(per_group, dim=axis)


def bank_grads(model: MultiTaskModel, loss: Tensor, bank: ExpertBank) -> Tensor:
    groups = list(bank.groups) if bank.grouped else [bank]
    n = len(bank.dims)
    params = [
        getattr(grp, kind)[i] for kind in ("weights", "biases") for i in range(n) for grp in groups
    ]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    k = len(groups)
    per_layer = [
        stacked(bank, i, kind, grads[(j * n + i) * k : (j * n + i + 1) * k])
        for j, kind in enumerate(("weights", "biases"))
        for i in range(n)
    ]
    return per_expert_grad(bank, per_layer)


def expert_last_bias(bank: ExpertBank, e: int) -> Tensor:
    """Expert ``e``'s bias of the bank's last layer (a view of its group's parameter)."""
    lo = 0
    for g, size in enumerate(bank.group_sizes):
        if e < lo + size:
            return bank.groups[g].biases[-1][e - lo]
        lo += size
    raise IndexError(e)


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
                expert_last_bias(lvl.experts, e).add_(1.0)
                out, _ = lvl(x)
                expert_last_bias(lvl.experts, e).sub_(1.0)
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
    gates = model.levels[-1].task_gates  # one parameter group per task gate
    for k, task in enumerate(TASKS):
        loss = task_loss(model, task)
        for j in range(3):
            own = gates.gate_parameters(j)
            grads = torch.autograd.grad(loss, own, retain_graph=True, allow_unused=True)
            reached = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
            assert reached == (j == k), (task, j)


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


# -- per-task parameter groups (issue 12.11) ---------------------------------------------------
def build_any(name: str, **over: Any) -> tuple[MultiTaskModel, Preprocessor, ColumnarDataset]:
    """A gated model on the three-task data (MoSE, which needs a sequence, on the tiny data)."""
    if name == "mose":
        pre, ds = tiny_dataset(n=96, seed=0)
        torch.manual_seed(1)
        p = {"bottom_hidden": 6, "num_experts": 3, "expert_hidden": 5, **over}
        return build_model("mose", pre.schema, pre.table_sizes(), p), pre, ds
    pre, ds = data3()
    torch.manual_seed(1)
    p = {"expert_hidden": (8, 6), **over}
    return build_model(name, pre.schema, pre.table_sizes(), p), pre, ds


def own_group_size(name: str, model: MultiTaskModel, p: dict[str, Any]) -> int:
    """Closed form of the size of one task's group: its tower, its gate(s) and its own
    experts (and STEM's own embedding tables), from the model's options only."""
    d = model.embedding.out_dim if name != "stem" else model.embeddings["__shared__"].out_dim
    h, gh, tw = list(p.get("expert_hidden", ())), list(p.get("gate_hidden", ())), [4]
    if name == "mose":
        return _mlp_params([5 + d, *tw, 1]) + _mlp_params([6 + d, *gh, 3])
    tower = _mlp_params([h[-1], *tw, 1])
    if name == "omoe":
        return tower  # one gate for every task: nothing but the tower is the task's
    if name == "mmoe":
        return tower + _mlp_params([d, *gh, p["num_experts"]])
    if name == "ml_mmoe":
        ins = [d] + [h[-1]] * (p["num_levels"] - 1)
        return tower + sum(_mlp_params([i, *gh, p["num_experts"]]) for i in ins)
    if name == "stem":
        t = len(model.task_names)
        return tower + _mlp_params([2 * d, *gh, t + 1]) + _mlp_params([d, *h]) + _emb_params(model)
    m, s_, levels = p["experts_per_task"], p["shared_experts"], p.get("num_levels", 1)
    ins = [d] + [h[-1]] * (levels - 1)
    return tower + sum(m * _mlp_params([i, *h]) + _mlp_params([i, *gh, m + s_]) for i in ins)


GROUPED_CASES: list[tuple[str, dict[str, Any]]] = [
    ("mmoe", {"num_experts": 3}),
    ("omoe", {"num_experts": 3}),
    ("cgc", {"experts_per_task": 2, "shared_experts": 1}),
    ("ple", {"num_levels": 2, "experts_per_task": 2, "shared_experts": 1}),
    ("ple", {"num_levels": 3, "experts_per_task": 1, "shared_experts": 2, "gate_hidden": (5,)}),
    ("ml_mmoe", {"num_levels": 2, "num_experts": 3}),
    ("ml_mmoe", {"num_levels": 3, "num_experts": 2, "gate_hidden": (5,)}),
    ("stem", {}),
    ("mose", {}),
]


@pytest.mark.parametrize(("name", "over"), GROUPED_CASES, ids=[n for n, _ in GROUPED_CASES])
def test_a_task_group_holds_its_tower_gates_and_own_experts(name: str, over: dict) -> None:
    """``task_group_parameters`` (a task's optimiser group, ``task_lr``) holds the task's tower,
    gate(s) and task-specific experts at every level, as docs/balancing.md says; it is a
    superset of ``task_parameters`` (used by gradient strategies); groups are disjoint."""
    # tanh: no dead ReLU unit can hide a parameter from its task's loss
    p = {"expert_hidden": (8, 6), "tower_hidden": (4,), "activation": "tanh", **over}
    if name == "mose":
        p = {"tower_hidden": (4,), "activation": "tanh", **over}
    model, pre, ds = build_any(name, **p)
    every = {id(q) for q in model.parameters()}
    tables = {id(q) for q in model.embedding_parameters()}
    seen: set[int] = set()
    b = ds.take(slice(0, len(ds)))
    for task in model.task_names:
        group = model.task_group_parameters(task)
        ids = [id(q) for q in group]
        assert len(ids) == len(set(ids)) and set(ids) <= every, f"{name}: duplicates or strays"
        assert not set(ids) & seen, f"{name}: {task}'s group overlaps another task's"
        seen |= set(ids)
        assert {id(q) for q in model.task_parameters(task)} <= set(ids), f"{name}: {task}"
        if name != "stem":  # STEM's task embedding is the task's own table
            assert not set(ids) & tables, f"{name}: an embedding table in {task}'s group"
        size = sum(q.numel() for q in group)
        assert size == own_group_size(name, model, p), f"{name}: {task}'s group size {size}"
        # every parameter of the group works for this task: its loss reaches each of them
        spec = next(t for t in pre.schema.tasks if t.name == task)
        loss = MultiTaskLoss([spec])(model(b.features), b)[task]
        grads = torch.autograd.grad(loss, group, allow_unused=True)
        for q, g in zip(group, grads, strict=True):
            assert g is not None and bool(g.any()), f"{name}: {task} does not reach {q.shape}"


def test_ple_lower_level_task_experts_are_grouped_but_shared() -> None:
    """PLE's task experts below the last level belong to their task's optimiser group, yet
    every task's loss reaches them (through the next level's shared gate): gradient strategies
    must still see them as shared parameters, and the last level's as the task's own."""
    model = build("ple", num_levels=3, experts_per_task=2, shared_experts=1)
    shared = {id(q) for q in model.shared_parameters()}
    for k, task in enumerate(TASKS):
        group = {id(q) for q in model.task_group_parameters(task)}
        own = {id(q) for q in model.task_parameters(task)}
        for i, lvl in enumerate(model.levels):
            experts = {id(q) for q in lvl.task_experts_parameters(k)}
            gate = {id(q) for q in lvl.task_gate_parameters(k)}
            assert experts <= group and gate <= group, (task, i)
            last = i == len(model.levels) - 1
            assert (experts <= own) == last and (experts <= shared) == (not last), (task, i)
            assert (gate <= own) == (i >= len(model.levels) - 2), (task, i)  # see task_parameters
        other = TASKS[(k + 1) % 3]
        g = torch.autograd.grad(
            task_loss(model, other), model.levels[0].task_experts_parameters(k), allow_unused=True
        )
        assert any(x is not None and bool(x.any()) for x in g), "lower experts are not shared"


@pytest.mark.parametrize("name", ["cgc", "ple", "ml_mmoe"])
def test_checkpoints_of_the_stacked_layout_load_into_the_grouped_banks(name: str) -> None:
    """Before the per-task groups, a level's experts and gates were stacked tensors
    (``weights.<layer>``); such a state dict loads (split by owner) and predicts the same."""
    model = build(name).eval()
    state = model.state_dict()
    stacked: dict[str, Tensor] = {}
    for key, v in state.items():
        head, sep, rest = key.partition(".groups.")
        if not sep:
            stacked[key] = v
            continue
        _, kind, layer = rest.split(".")
        net = model.get_submodule(head)
        sizes = net.group_sizes
        pieces = [state[f"{head}.groups.{g}.{kind}.{layer}"] for g in range(len(sizes))]
        axis = 1 if int(layer) == 0 and net.shared_input and kind == "weights" else 0
        stacked[f"{head}.{kind}.{layer}"] = torch.cat(pieces, dim=axis)
    assert any(".groups." in k for k in state) and not any(".groups." in k for k in stacked)
    fresh = build(name, seed=7).eval()
    fresh.load_state_dict(stacked)
    with torch.no_grad():
        a, b = model(batch(16).features).logits, fresh(batch(16).features).logits
    for t in TASKS:
        torch.testing.assert_close(a[t], b[t], rtol=0, atol=0)


def test_per_task_learning_rate_moves_only_the_tasks_group() -> None:
    """A task's learning rate reaches its own experts and gate: with every other group frozen
    (lr 0), a step changes exactly the parameters of that task's group."""
    model = build("cgc", experts_per_task=2, shared_experts=1)
    groups = {t: model.task_group_parameters(t) for t in TASKS}
    taken = {id(q) for g in groups.values() for q in g}
    rest = [q for q in model.parameters() if id(q) not in taken]
    opt = torch.optim.SGD(
        [{"params": groups["b"], "lr": 0.1}, {"params": groups["a"] + groups["c"] + rest}], lr=0.0
    )
    before = {id(q): q.detach().clone() for q in model.parameters()}
    b = batch()
    losses = MultiTaskLoss(data3()[0].schema.tasks)(model(b.features), b)
    sum(losses.values()).backward()
    opt.step()
    moved = {id(q) for q in model.parameters() if not torch.equal(q.detach(), before[id(q)])}
    assert moved == {id(q) for q in groups["b"]}
    lvl = model.levels[0]
    assert {id(q) for q in lvl.task_parameters(1)} <= moved  # b's own experts and gate


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
        for k, t in enumerate(TASKS):
            gate = lvl.gates.net.groups[k]  # gate k's first layer: [in, E], [E]
            mm.gates[t].net.layers[0].weight.copy_(gate.weights[0].T)
            mm.gates[t].net.layers[0].bias.copy_(gate.biases[0])
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


def test_one_task_mmoe_keeps_a_gate_named_by_its_task() -> None:
    """MMoE has one gate per task even with a single task (OMoE's gate is the 'shared' one):
    a one-task MMoE's task parameters hold its gate (warm starts and per-task groups ask)."""
    from mtlrec.testing import tiny_dataset

    pre, ds = tiny_dataset(n=32)
    schema = ds.schema.select_tasks(["click"])
    m = build_model("mmoe", schema, pre.table_sizes(), {"num_experts": 2, "expert_hidden": [4]})
    assert tuple(m.gates) == ("click",)
    own = {id(p) for p in m.task_parameters("click")}
    assert all(id(p) in own for p in m.gates["click"].parameters())
    o = build_model("omoe", schema, pre.table_sizes(), {"num_experts": 2, "expert_hidden": [4]})
    assert tuple(o.gates) == ("shared",)
