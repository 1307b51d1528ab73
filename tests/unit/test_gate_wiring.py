"""Which input every gate and every expert group of the multi-level gated models reads.

PLE (Tang et al., RecSys 2020, Section 4.3): at level j > 1, task k's experts and task k's gate
read task k's output of level j-1; the shared experts and the shared gate read the shared
output; every gate and expert of the first level reads the embedding. ML-MMoE: at level j > 1
task k's gate reads task k's output of level j-1 and the (shared) experts read every task's
output, each task's pass apart. The tests perturb one stream between two levels and check
exactly which gates' weights (``ModelOutput.gates``) and which experts' outputs (a forward hook
on the level's bank) move: a gate or an expert group reading another stream fails them.
Expert order within a level: task 0's experts, task 1's, ..., then the shared ones.

Also here: the permutation hooks of the blocks (``permute_members_``, ``permute_outputs_``,
``permute_experts_``) that the expert-permutation property of every model relies on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.data.preprocess import Preprocessor
from mtlrec.models import build_model
from mtlrec.models.base import ModelOutput, MultiTaskModel
from mtlrec.nn.experts import ExpertBank, GroupedParallelMLP
from mtlrec.nn.extraction import ExtractionLevel, StackedMoELevel
from mtlrec.nn.gates import Gate, GateBank
from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec

TASKS = ("a", "b", "c")
MOVED = 1e-6  # an output "moves" when it changes by more than this


@cache
def data() -> tuple[Preprocessor, Features]:
    """Three binary tasks over two sparse fields and a dense one; 12 rows of features."""
    rng = np.random.default_rng(0)
    n = 12
    table = pa.table(
        {
            "user": pa.array([f"u{u}" for u in rng.integers(0, 6, n)]),
            "item": pa.array([f"i{i}" for i in rng.integers(0, 8, n)]),
            "price": pa.array(rng.normal(size=n)),
            **{t: pa.array(rng.integers(0, 2, n)) for t in TASKS},
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
    return pre, pre.encode(table).features_at(slice(0, n))


def build(name: str, **params: Any) -> MultiTaskModel:
    pre, _ = data()
    torch.manual_seed(0)
    # tanh: no expert is dead (constant zero) on the batch, so every reader of a stream moves
    base = {"expert_hidden": (6, 5), "tower_hidden": (3,), "activation": "tanh"}
    return build_model(name, pre.schema, pre.table_sizes(), base | params).eval()


def moved(a: Tensor, b: Tensor) -> bool:
    return bool((a - b).abs().max() > MOVED)


EMBEDDING = -1  # ``level`` of the embedding: what the first level reads


@contextmanager
def perturbed(model: MultiTaskModel, level: int | None, stream: int) -> Iterator[list[Tensor]]:
    """Run ``model`` with stream ``stream`` of level ``level``'s output shifted by noise
    (``EMBEDDING``: the first level's input, which all its gates and experts read; None: no
    perturbation); yields the list that collects every level's expert outputs."""
    experts: list[Tensor] = []
    hooks = [
        lvl.experts.register_forward_hook(lambda _m, _i, o: experts.append(o))
        for lvl in model.levels
    ]
    gen = torch.Generator().manual_seed(1)

    def noise(h: Tensor) -> Tensor:
        return torch.randn(h.shape, generator=gen)

    def shift_input(_m: nn.Module, args: tuple) -> tuple:
        return (args[0] + noise(args[0]),)  # [B, D]

    def shift_stream(_m: nn.Module, _i: Any, out: tuple) -> tuple:
        h = out[0].clone()  # [T (+1), B, H]: the task streams, then the shared one
        h[stream] += noise(h[stream])
        return (h, *out[1:])

    if level == EMBEDDING:
        hooks.append(model.levels[0].register_forward_pre_hook(shift_input))
    elif level is not None:
        hooks.append(model.levels[level].register_forward_hook(shift_stream))
    try:
        yield experts
    finally:
        for h in hooks:
            h.remove()


def run(
    model: MultiTaskModel, level: int | None = None, stream: int = 0
) -> tuple[ModelOutput, list[Tensor]]:
    """The model's output and every level's expert outputs, perturbed as in :func:`perturbed`."""
    with torch.no_grad(), perturbed(model, level, stream) as experts:
        out = model(data()[1])
    return out, experts


def level_gates(model: MultiTaskModel, j: int) -> set[str]:
    """The names in ``ModelOutput.gates`` of level ``j``'s gates."""
    last = len(model.levels) - 1
    prefix = "" if j == last else f"level{j}."
    shared = (
        {f"{prefix}shared"} if isinstance(model.levels[j], ExtractionLevel) and j < last else set()
    )
    return {prefix + t for t in TASKS} | shared


def moved_gates(ref: ModelOutput, out: ModelOutput, names: set[str]) -> set[str]:
    return {g for g in names if moved(out.gates[g], ref.gates[g])}


# -- CGC / PLE ---------------------------------------------------------------------------------
def group_experts(group: int, m: int, s: int) -> set[int]:
    """The experts of task ``group`` (``group == T``: the shared experts) in a level."""
    t = len(TASKS)
    return set(range(group * m, (group + 1) * m)) if group < t else set(range(t * m, t * m + s))


EXTRACTION = [
    ("cgc", {"experts_per_task": 2, "shared_experts": 1}),
    ("cgc", {"experts_per_task": 2, "shared_experts": 3}),
    ("ple", {"num_levels": 2, "experts_per_task": 2, "shared_experts": 1}),
    ("ple", {"num_levels": 2, "experts_per_task": 2, "shared_experts": 3}),
    ("ple", {"num_levels": 3, "experts_per_task": 2, "shared_experts": 1}),
    ("ple", {"num_levels": 3, "experts_per_task": 2, "shared_experts": 3, "gate_hidden": (4,)}),
    ("ple", {"num_levels": 3, "experts_per_task": 1, "shared_experts": 2}),
]


@pytest.mark.parametrize(("name", "params"), EXTRACTION)
def test_every_first_level_gate_and_expert_reads_the_embedding(name: str, params: dict) -> None:
    model = build(name, **params)
    ref, ref_e = run(model)
    out, out_e = run(model, EMBEDDING)
    assert moved_gates(ref, out, level_gates(model, 0)) == level_gates(model, 0)
    e = model.levels[0].num_experts
    assert {i for i in range(e) if moved(out_e[0][i], ref_e[0][i])} == set(range(e))


@pytest.mark.parametrize(("name", "params"), [c for c in EXTRACTION if c[0] == "ple"])
def test_ple_gates_and_experts_read_their_own_stream_of_the_level_below(
    name: str, params: dict
) -> None:
    # level j's task-k gate and experts read task k's output of level j-1; its shared gate
    # (every level but the last) and shared experts read the shared output; nothing else moves
    model = build(name, **params)
    t, m, s = len(TASKS), params["experts_per_task"], params["shared_experts"]
    last = len(model.levels) - 1
    ref, ref_e = run(model)
    for j in range(1, last + 1):
        prefix = "" if j == last else f"level{j}."
        for k in range(t + 1):  # perturb stream k (k == T: the shared one) of level j-1's output
            out, out_e = run(model, j - 1, k)
            if k < t:
                want_gates = {prefix + TASKS[k]}
            else:
                want_gates = {f"{prefix}shared"} if j < last else set()
            got = moved_gates(ref, out, level_gates(model, j))
            assert got == want_gates, f"level {j}, stream {k}: gates {got} moved"
            got_e = {i for i in range(t * m + s) if moved(out_e[j][i], ref_e[j][i])}
            assert got_e == group_experts(k, m, s), f"level {j}, stream {k}: experts {got_e}"
            for i in range(j):  # the levels below are untouched
                assert not moved(out_e[i], ref_e[i])


@pytest.mark.parametrize(("t", "m", "s"), [(3, 2, 1), (3, 2, 3), (2, 3, 1), (4, 1, 2)])
@pytest.mark.parametrize("shared_gate", [True, False])
def test_extraction_level_reads_each_stream_into_its_gate_and_experts(
    t: int, m: int, s: int, shared_gate: bool
) -> None:
    torch.manual_seed(0)
    lvl = ExtractionLevel(
        t, m, s, 5, [4, 3], shared_gate=shared_gate, first=False, activation="tanh"
    ).eval()
    seen: list[Tensor] = []
    lvl.experts.register_forward_hook(lambda _m, _i, o: seen.append(o))
    x = torch.randn(t + 1, 7, 5)  # the task streams, then the shared one
    with torch.no_grad():
        _, ref = lvl(x)
        for k in range(t + 1):
            y = x.clone()
            y[k] += torch.randn(7, 5)
            _, out = lvl(y)
            tasks = {g for g in range(t) if moved(out[0].weights[g], ref[0].weights[g])}
            assert tasks == ({k} if k < t else set()), (k, tasks)
            if shared_gate:
                assert moved(out[1].weights, ref[1].weights) == (k == t)
            own = set(range(k * m, (k + 1) * m)) if k < t else set(range(t * m, t * m + s))
            assert {e for e in range(t * m + s) if moved(seen[-1][e], seen[0][e])} == own


# -- ML-MMoE -----------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [2, 3])
def test_ml_mmoe_gates_and_experts_read_their_task_stream_of_the_level_below(levels: int) -> None:
    # level j's task-k gate reads task k's output of level j-1; the level's experts (shared)
    # read every task's output, task k's pass moving only with task k's stream
    model = build("ml_mmoe", num_levels=levels, num_experts=3)
    t, e, rows = len(TASKS), 3, 12
    ref, ref_e = run(model)
    out0, out0_e = run(model, EMBEDDING)  # the first level's gates and experts read it all
    assert moved_gates(ref, out0, level_gates(model, 0)) == level_gates(model, 0)
    assert all(moved(out0_e[0][i], ref_e[0][i]) for i in range(e))
    for j in range(1, levels):
        prefix = "" if j == levels - 1 else f"level{j}."
        for k in range(t):
            out, out_e = run(model, j - 1, k)
            got = moved_gates(ref, out, level_gates(model, j))
            assert got == {prefix + TASKS[k]}, f"level {j}, stream {k}: gates {got} moved"
            a = out_e[j].unflatten(1, (t, rows))  # [E, T, B, H]: the task passes apart
            b = ref_e[j].unflatten(1, (t, rows))
            passes = {(i, u) for i in range(e) for u in range(t) if moved(a[i, u], b[i, u])}
            assert passes == {(i, k) for i in range(e)}, f"level {j}, stream {k}: {passes}"


# -- the permutation hooks of the blocks ---------------------------------------------------------
@pytest.mark.parametrize("groups", [None, (2, 2, 1)])
@pytest.mark.parametrize("shared_input", [True, False])
@pytest.mark.parametrize("dims", [[6], [6, 3]])
def test_permute_members_reorders_every_layer(groups, shared_input: bool, dims: list) -> None:
    torch.manual_seed(0)
    net = GroupedParallelMLP(5, 4, dims, groups=groups, shared_input=shared_input)
    x = torch.randn(7, 4) if shared_input else torch.randn(5, 7, 4)
    perm = torch.tensor([3, 0, 4, 1, 2])  # across the groups too
    with torch.no_grad():
        ref = net(x)
        net.permute_members_(perm)
        out = net(x if shared_input else x[perm])  # member j reads slice j: it moves along
    torch.testing.assert_close(out, ref[perm])
    with pytest.raises(ValueError, match="permutation"):
        net.permute_members_(torch.tensor([0, 0, 1, 2, 3]))


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("hidden", [(), (3,)])
def test_gate_permute_experts_reorders_the_weight_columns(separate: bool, hidden: tuple) -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 6)
    gate = Gate(6, 4, hidden=hidden)
    bank = GateBank(3, 6, 4, hidden=hidden, separate=separate)
    perms = torch.stack([torch.tensor(p) for p in ([2, 0, 3, 1], [1, 0, 2, 3], [3, 2, 1, 0])])
    with torch.no_grad():
        ref_g, ref_b = gate(x), bank(x)
        gate.permute_experts_(perms[0])
        bank.permute_experts_(perms)  # gate g: its own permutation
        torch.testing.assert_close(gate(x), ref_g[:, perms[0]])
        torch.testing.assert_close(bank(x), ref_b.gather(2, perms[:, None].expand(-1, 7, -1)))
    with pytest.raises(ValueError, match="softmax"):
        Gate(6, 4, kind="dselect").permute_experts_(perms[0])


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("shared_gate", [True, False])
def test_extraction_level_permutation_within_groups_keeps_its_outputs(
    first: bool, shared_gate: bool
) -> None:
    torch.manual_seed(0)
    t, m, s = 3, 2, 2
    lvl = ExtractionLevel(t, m, s, 5, [4, 3], shared_gate=shared_gate, first=first).eval()
    x = torch.randn(7, 5) if first else torch.randn(t + 1, 7, 5)
    perm = torch.tensor([1, 0, 2, 3, 5, 4, 7, 6])  # within task 0's, task 2's, the shared group
    with torch.no_grad():
        ref, ref_g = lvl(x)
        lvl.permute_experts_(perm)
        out, out_g = lvl(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_g[0].weights[0], ref_g[0].weights[0][:, [1, 0, 3, 2]])
    torch.testing.assert_close(out_g[0].weights[1], ref_g[0].weights[1][:, [0, 1, 3, 2]])
    if shared_gate:
        torch.testing.assert_close(out_g[1].weights, ref_g[1].weights[:, perm])
    with pytest.raises(ValueError, match="groups"):
        lvl.permute_experts_(torch.tensor([2, 1, 0, 3, 4, 5, 6, 7]))  # task 0 <-> task 1


def test_stacked_moe_level_permutation_keeps_its_outputs() -> None:
    torch.manual_seed(0)
    lvl = StackedMoELevel(3, 4, 5, [4, 3], first=False).eval()
    x = torch.randn(3, 7, 5)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        ref, ref_g = lvl(x)
        lvl.permute_experts_(perm)
        out, out_g = lvl(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_g.weights, ref_g.weights[..., perm])
    assert isinstance(lvl.experts, ExpertBank)
