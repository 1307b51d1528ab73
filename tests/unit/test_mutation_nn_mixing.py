"""Tests that kill the mutants of the mixing blocks of ``mtlrec.nn`` the rest of the suite let
live (``python benchmarks/mutation.py nn``), each against an analytic value or an independent
computation: DBMTL's parent order and its errors, conditioned towers against a hand-written
forward (defaults, activation, dropout, gradient through the parents, children), AITM's
adaptive transfer against Eqs. (2)-(4) written out, cross-stitch / sluice / layer-mix units
(their initial matrices, defaults and errors), and the factorization-machine term against a
reference built from its raw table rows (mean-pooled sequences, dense part, initialisation)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mtlrec.batch import PAD_ID, Features
from mtlrec.nn.conditional import ConditionedTowers, parent_order
from mtlrec.nn.embedding import FeatureLayout, FieldSpec, SequenceSpec
from mtlrec.nn.fm import FactorizationMachine
from mtlrec.nn.stitch import CrossStitch, LayerMix, near_identity
from mtlrec.nn.transfer import AdaptiveTransfer
from mtlrec.schema import TaskSpec

F64 = torch.float64


# -- parent order ----------------------------------------------------------------------------
def test_parent_order_accepts_parents_given_for_some_tasks_only() -> None:
    # tasks absent from the mapping have no parents: schema order is kept where allowed
    assert parent_order(("a", "b", "c"), {"c": ["a"]}) == ("a", "b", "c")
    assert parent_order(("a", "b", "c"), {"a": ["c"]}) == ("b", "c", "a")
    assert parent_order(("a", "b"), {}) == ("a", "b")


def test_parent_order_names_only_the_tasks_left_in_a_cycle() -> None:
    # "a" is placed first; "b" and "c" wait on each other
    with pytest.raises(ValueError, match=r"the parents of tasks \['b', 'c'\] form a cycle"):
        parent_order(("a", "b", "c"), {"b": ["c"], "c": ["b"]})


def test_parent_order_names_unknown_tasks_and_the_known_ones() -> None:
    msg = r"^parents of 'c': unknown tasks \['c', 'z'\] \(tasks: \['a', 'b'\]\)$"
    with pytest.raises(ValueError, match=msg):
        parent_order(("a", "b"), {"c": ["a", "z"]})


def test_parent_order_rejects_a_task_that_is_its_own_parent() -> None:
    with pytest.raises(ValueError, match=r"parents of 'b': a task cannot be its own parent"):
        parent_order(("a", "b"), {"b": ["a", "b"]})


# -- conditioned towers ----------------------------------------------------------------------
def _tasks(*names: str) -> list[TaskSpec]:
    return [TaskSpec(name=n, kind="binary") for n in names]


def _mlp_ref(body: nn.Module, x: Tensor, act) -> Tensor:
    """Every layer ``act(W x + b)`` (the towers' MLPs activate their last layer too)."""
    for lin in body.layers:
        x = act(x @ lin.weight.T + lin.bias)
    return x


def test_conditioned_towers_defaults_are_relu_no_dropout_and_attached_parents() -> None:
    torch.manual_seed(0)
    towers = ConditionedTowers(_tasks("a", "b"), 3, [4], parents={"b": ["a"]})
    assert towers.detach_parents is False
    s = torch.randn(6, 3)
    towers.train()  # no dropout by default: two training passes agree
    za, zb = towers(s)[0].values()
    torch.testing.assert_close(towers(s)[0]["b"], zb)
    # reference forward with relu
    ha = _mlp_ref(towers.bodies["a"], s, torch.relu)
    hb = _mlp_ref(towers.bodies["b"], torch.cat([s, ha], -1), torch.relu)
    for z, h, t in [(za, ha, "a"), (zb, hb, "b")]:
        out = towers.outputs[t]
        torch.testing.assert_close(z, (h @ out.weight.T + out.bias).squeeze(-1))
    # attached parents: b's logit reaches a's body
    w = towers.bodies["a"].layers[0].weight
    (g,) = torch.autograd.grad(zb.sum(), w)
    assert g.abs().sum() > 0


def test_conditioned_towers_use_the_given_activation_and_dropout() -> None:
    torch.manual_seed(1)
    towers = ConditionedTowers(
        _tasks("a", "b"), 3, [5, 4], parents={"b": ["a"]}, activation="tanh"
    ).eval()
    s = torch.randn(4, 3)
    logits, read = towers(s)
    ha = _mlp_ref(towers.bodies["a"], s, torch.tanh)
    xb = torch.cat([s, ha], -1)
    torch.testing.assert_close(read["b"], xb)
    hb = _mlp_ref(towers.bodies["b"], xb, torch.tanh)
    torch.testing.assert_close(logits["b"], towers.outputs["b"](hb).squeeze(-1))
    # dropout reaches the bodies: training passes differ, evaluation ones do not
    drop = ConditionedTowers(_tasks("a"), 3, [64], dropout=0.5)
    assert all(body.dropout == 0.5 for body in drop.bodies.values())
    x = torch.randn(8, 3)
    drop.train()
    assert not torch.equal(drop(x)[0]["a"], drop(x)[0]["a"])
    drop.eval()
    assert torch.equal(drop(x)[0]["a"], drop(x)[0]["a"])


def test_detached_parents_stop_the_childs_gradient_at_the_parent() -> None:
    torch.manual_seed(6)
    towers = ConditionedTowers(_tasks("a", "b"), 3, [4], parents={"b": ["a"]}, detach_parents=True)
    zb = towers(torch.randn(6, 3))[0]["b"]
    body_a = list(towers.bodies["a"].parameters())
    grads = torch.autograd.grad(zb.sum(), body_a, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_conditioned_towers_need_a_hidden_layer() -> None:
    with pytest.raises(ValueError, match=r"^conditioned towers need at least one hidden layer$"):
        ConditionedTowers(_tasks("a"), 3, [])


def test_children_of_lists_the_tasks_reading_a_parent() -> None:
    towers = ConditionedTowers(
        _tasks("a", "b", "c", "d"), 3, [2], parents={"b": ["a"], "c": ["a", "b"]}
    )
    assert towers.children_of("a") == ("b", "c")
    assert towers.children_of("b") == ("c",)
    assert towers.children_of("c") == ()
    assert towers.children_of("d") == ()


# -- adaptive information transfer (AITM) ----------------------------------------------------
def test_adaptive_transfer_equals_the_papers_equations() -> None:
    torch.manual_seed(2)
    k = 4
    ait = AdaptiveTransfer(k).double()
    z_prev, q = torch.randn(5, k, dtype=F64), torch.randn(5, k, dtype=F64)
    z, w = ait(z_prev, q)

    def lin(m: nn.Linear, x: Tensor) -> Tensor:
        return x @ m.weight.T + m.bias

    h1 = ait.transfer[0]
    pre = lin(h1, z_prev)
    assert (pre < 0).any()  # the ReLU of h1 matters for this input
    p = torch.relu(pre)  # Eq. (2)
    us = [p, q]
    # Eq. (3): w_u = softmax_u(<h2(u), h3(u)> / sqrt(k))
    scores = torch.stack([(lin(ait.query, u) * lin(ait.key, u)).sum(-1) / math.sqrt(k) for u in us])
    ref_w = torch.exp(scores) / torch.exp(scores).sum(0)  # [2, B]
    ref_z = sum(ref_w[i][:, None] * lin(ait.value, u) for i, u in enumerate(us))  # Eq. (4)
    torch.testing.assert_close(w, ref_w.T)
    torch.testing.assert_close(z, ref_z)


# -- cross-stitch, sluice, layer mixing ------------------------------------------------------
@pytest.mark.parametrize("self_weight", [0.3, 0.9])
def test_near_identity_of_one_unit_is_the_1x1_identity(self_weight: float) -> None:
    out = near_identity(1, self_weight)
    assert out.shape == (1, 1)
    assert torch.equal(out, torch.ones(1, 1))


def test_cross_stitch_defaults_are_one_subspace_and_a_0_9_diagonal() -> None:
    unit = CrossStitch(3)
    assert unit.units == 3 and unit.subspaces == 1
    # Misra et al.'s (0.9, 0.1) split: 0.9 on the diagonal, 0.1 shared by the 2 others
    ref = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]])
    torch.testing.assert_close(unit.alpha.detach(), ref)
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(unit(x), torch.einsum("ts,sbd->tbd", ref, x))
    sluice = CrossStitch(2, subspaces=2)
    assert sluice.units == 2 and sluice.alpha.shape == (4, 4)


def test_cross_stitch_rejects_a_width_not_divisible_into_subspaces() -> None:
    with pytest.raises(ValueError, match="width 5 is not divisible into 2 subspaces"):
        CrossStitch(2, subspaces=2)(torch.randn(2, 3, 5))


def test_layer_mix_starts_as_the_mean_of_the_layers() -> None:
    mix = LayerMix(2, 4)
    torch.testing.assert_close(mix.beta.detach(), torch.full((2, 4), 0.25))
    layers = torch.randn(4, 2, 3, 5)  # [L, T, B, D]
    torch.testing.assert_close(mix(layers), layers.mean(0))


# -- factorization machine -------------------------------------------------------------------
def _fm_layout(size: int = 6) -> FeatureLayout:
    """Two sparse fields (tables a, b), a history over table a, two dense values."""
    return FeatureLayout(
        sparse=(FieldSpec("u", "a", 4), FieldSpec("v", "b", 4)),
        sequences=(SequenceSpec("hist", "a", 4, "sum", 3),),  # the FM mean-pools whatever
        dense=("x", "y"),
        table_sizes={"a": size, "b": size + 1},
        table_dims={"a": 4, "b": 4},
    )


def _fm_features() -> Features:
    sparse = torch.tensor([[2, 3], [4, 1], [5, 6]], dtype=torch.int32)
    hist = torch.tensor([[2, 3, 5], [4, PAD_ID, PAD_ID], [1, 2, PAD_ID]], dtype=torch.int32)
    dense = torch.tensor([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]])
    return Features(sparse, dense, {"hist": hist})


def test_fm_equals_the_reference_from_its_table_rows() -> None:
    torch.manual_seed(3)
    fm = FactorizationMachine(_fm_layout(), 3, init_std=0.3)
    feats = _fm_features()
    w = {t: fm.first.table_weight(t).detach() for t in ("a", "b")}
    v = {t: fm.factors.table_weight(t).detach() for t in ("a", "b")}
    assert w["a"].shape == (6, 1) and v["b"].shape == (7, 3)
    ref = []
    for r in range(3):
        u_id, v_id = (int(i) for i in feats.sparse[r])
        hist = [int(i) for i in feats.sequences["hist"][r] if int(i) != PAD_ID]
        # fields: u, v, and hist mean-pooled
        vecs = [v["a"][u_id], v["b"][v_id], torch.stack([v["a"][i] for i in hist]).mean(0)]
        lin = w["a"][u_id, 0] + w["b"][v_id, 0] + torch.stack([w["a"][i, 0] for i in hist]).mean()
        lin = lin + feats.dense[r] @ fm.dense.weight[0] + fm.dense.bias[0]
        pair = sum(vecs[i] @ vecs[j] for i in range(3) for j in range(i + 1, 3))
        ref.append(fm.bias + lin + pair)
    torch.testing.assert_close(fm(feats), torch.stack(ref).detach())
    assert fm.field_vectors(feats).shape == (3, 3, 3)


def test_fm_passes_init_std_to_both_tables() -> None:
    torch.manual_seed(4)
    fm = FactorizationMachine(_fm_layout(size=400), 8, init_std=0.5)
    for emb in (fm.first, fm.factors):
        std = float(torch.cat([p.detach().flatten() for p in emb.parameters()]).std())
        assert 0.45 < std < 0.55  # normal(0, 0.5) over >= 800 values


def test_fm_defaults_are_width_8_and_std_0_01() -> None:
    torch.manual_seed(5)
    fm = FactorizationMachine(_fm_layout(size=400))
    assert fm.dim == 8
    assert fm.field_vectors(_fm_features()).shape == (3, 3, 8)
    for emb in (fm.first, fm.factors):
        std = float(torch.cat([p.detach().flatten() for p in emb.parameters()]).std())
        assert 0.008 < std < 0.012  # normal(0, 0.01) over >= 800 values


def test_fm_without_dense_inputs_has_no_dense_part() -> None:
    lay = FeatureLayout((FieldSpec("u", "a", 2),), (), (), {"a": 5}, {"a": 2})
    fm = FactorizationMachine(lay, 2)
    assert fm.dense is None
    # parameters: the two tables and the global bias, nothing else
    assert sorted(n for n, _ in fm.named_parameters()) == [
        "bias",
        "factors.tables.d2.weight",
        "first.tables.d1.weight",
    ]
