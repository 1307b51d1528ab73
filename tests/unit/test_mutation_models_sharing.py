"""Tests that kill the mutants of ``mtlrec.models.sharing`` and ``mtlrec.models.soft_sharing``
the rest of the suite let live (``python benchmarks/mutation.py models``): the forward passes of
asymmetric, customized and soft sharing rebuilt by hand from the models' own blocks (bottoms
member by member, then every tower layer by layer, with a non-default activation and deeper
bottoms than the defaults of the other tests), which bottom each tower reads and the tower
inputs the models report, dropout in the bottoms, the exact messages of bad ``feeds``, the last
shared layer and the task parameters, the pairwise L2 tie on a ``[T, P]`` stack and which
penalties soft sharing reports (and when)."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.models.base import MultiTaskModel
from mtlrec.models.soft_sharing import l2_tie
from mtlrec.nn.mlp import MLP, ParallelMLP
from mtlrec.testing import tiny_dataset

TASKS = ("click", "watch")
TOWER = (5, 3)  # two hidden tower layers: a dropped tower_hidden leaves one


@pytest.fixture(scope="module")
def tiny():
    return tiny_dataset(n=64)


def _build(tiny, name: str, seed: int = 0, **params) -> MultiTaskModel:
    pre, _ = tiny
    torch.manual_seed(seed)
    return build_model(name, pre.schema, pre.table_sizes(), params)


def _feats(tiny, n: int = 16) -> Features:
    return tiny[1].features_at(slice(0, n))


# -- references -----------------------------------------------------------------------------
def _bottom_ref(mlp: ParallelMLP, x: Tensor, act) -> list[Tensor]:
    """Every member of a stacked bottom run on its own: ``act(x W_k^l + b_k^l)`` per layer."""
    outs = []
    for k in range(mlp.num):
        h = x
        for layer, b in enumerate(mlp.biases):
            bias = b.view(mlp.num, -1)[k] if b.dim() == 1 else b[k, 0]
            h = act(h @ mlp.member_weight(layer, k) + bias)
        outs.append(h)
    return outs


def _tower_ref(tower: MLP, x: Tensor, hidden: tuple[int, ...], act) -> Tensor:
    """The tower as ``hidden`` linear layers with ``act`` and a linear width-1 logit layer."""
    widths = [lin.out_features for lin in tower.layers]
    assert widths == [*hidden, 1]
    for i, lin in enumerate(tower.layers):
        x = x @ lin.weight.T + lin.bias
        if i < len(tower.layers) - 1:
            x = act(x)
    return x.squeeze(-1)


def _check_forward(model: MultiTaskModel, feats: Features, reps: dict[str, Tensor]) -> None:
    """The model's logits and tower inputs against ``reps`` (the tower inputs rebuilt by hand)
    fed through hand-run tanh towers of widths ``TOWER``."""
    out = model(feats)
    assert set(out.tower_inputs) == set(TASKS)
    for t in TASKS:
        torch.testing.assert_close(out.tower_inputs[t], reps[t])
        ref = _tower_ref(model.heads.towers[t], reps[t], TOWER, torch.tanh)
        torch.testing.assert_close(out.logits[t], ref)


def _zero_fraction(x: Tensor) -> float:
    return (x == 0).float().mean().item()


# -- asymmetric sharing ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "feeds, reads",
    [
        # default: every task reads the bottoms of the tasks before it
        (None, {"click": [0], "watch": [1, 0]}),
        # a task missing from feeds reads only its own bottom
        ({"click": ["watch"]}, {"click": [0, 1], "watch": [1]}),
        ({}, {"click": [0], "watch": [1]}),
    ],
)
def test_asymmetric_forward_is_own_bottom_then_fed_bottoms_zero_padded(
    tiny, feeds: dict | None, reads: dict[str, list[int]]
) -> None:
    extra = {} if feeds is None else {"feeds": feeds}
    hidden = (8, 5, 6)
    model = _build(
        tiny, "asymmetric_sharing", bottom_hidden=hidden, tower_hidden=TOWER,
        activation="tanh", **extra,
    ).eval()  # fmt: skip
    feats = _feats(tiny)
    h = _bottom_ref(model.bottoms, model.embedding(feats).flat, torch.tanh)
    # PLE Fig. 1(c): [h_t, h_s for s in feeds[t]], zero-padded to the widest such input
    width = hidden[-1] * max(len(v) for v in reads.values())
    reps = {}
    for t, idx in reads.items():
        x = torch.cat([h[j] for j in idx], dim=-1)
        reps[t] = torch.cat([x, torch.zeros(x.shape[0], width - x.shape[1])], dim=-1)
    assert all(r.shape == (16, width) for r in reps.values())
    _check_forward(model, feats, reps)


def test_asymmetric_rejects_unknown_tasks_with_the_exact_message(tiny) -> None:
    for feeds, dst, srcs in (
        ({"watch": ["nope"]}, "watch", ["nope"]),
        ({"nope": ["click"]}, "nope", ["click"]),
    ):
        bad = [s for s in [dst, *srcs] if s not in TASKS]
        msg = f"model.params.feeds: {dst!r} <- {srcs}: unknown tasks {bad}"
        with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
            _build(tiny, "asymmetric_sharing", feeds=feeds)


def test_asymmetric_rejects_a_self_feed_with_the_exact_message(tiny) -> None:
    msg = "model.params.feeds: 'watch' <- ['click', 'watch']: a task cannot feed itself"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        _build(tiny, "asymmetric_sharing", feeds={"watch": ["click", "watch"]})


# -- customized sharing ---------------------------------------------------------------------
def test_customized_fused_stack_has_the_shared_bottom_as_member_zero(tiny) -> None:
    hidden = (8, 6)
    model = _build(
        tiny, "customized_sharing", shared_hidden=hidden, specific_hidden=hidden,
        tower_hidden=TOWER, activation="tanh",
    ).eval()  # fmt: skip
    # equal widths: one stack of T + 1 members, no separate shared network
    assert model.bottoms.num == len(TASKS) + 1
    assert not hasattr(model, "shared")
    feats = _feats(tiny)
    h = _bottom_ref(model.bottoms, model.embedding(feats).flat, torch.tanh)
    # PLE Fig. 1(d): task t reads [h_shared, h_t]; member 0 shared, member 1 + i task i's
    reps = {t: torch.cat([h[0], h[1 + i]], dim=-1) for i, t in enumerate(TASKS)}
    _check_forward(model, feats, reps)


def test_customized_separate_stacks_when_widths_differ(tiny) -> None:
    model = _build(
        tiny, "customized_sharing", shared_hidden=(8, 7), specific_hidden=(6,),
        tower_hidden=TOWER, activation="tanh",
    ).eval()  # fmt: skip
    assert model.shared.num == 1 and model.bottoms.num == len(TASKS)
    feats = _feats(tiny)
    x = model.embedding(feats).flat
    (shared,) = _bottom_ref(model.shared, x, torch.tanh)
    h = _bottom_ref(model.bottoms, x, torch.tanh)
    reps = {t: torch.cat([shared, h[i]], dim=-1) for i, t in enumerate(TASKS)}
    assert all(r.shape == (16, 7 + 6) for r in reps.values())
    _check_forward(model, feats, reps)


# -- soft sharing ---------------------------------------------------------------------------
def test_soft_sharing_forward_is_each_tasks_own_bottom(tiny) -> None:
    hidden = (8, 5, 6)
    model = _build(
        tiny, "soft_sharing", bottom_hidden=hidden, tower_hidden=TOWER, activation="tanh"
    ).eval()
    feats = _feats(tiny)
    h = _bottom_ref(model.bottoms, model.embedding(feats).flat, torch.tanh)
    _check_forward(model, feats, {t: h[i] for i, t in enumerate(TASKS)})


def test_soft_sharing_penalties_in_training_only() -> None:
    pre, ds = tiny_dataset(n=16)
    torch.manual_seed(0)
    model = build_model("soft_sharing", pre.schema, pre.table_sizes(), {"bottom_hidden": (4,)})
    feats = ds.features_at(slice(0, 4))
    assert set(model.train()(feats).aux_losses) == {"l2_tie"}
    assert model.eval()(feats).aux_losses == {}


@pytest.mark.parametrize(
    "l2, trace, keys",
    [
        (1e-3, 0.0, {"l2_tie"}),  # the defaults: no trace norm
        (0.0, 0.3, {"trace_norm"}),
        (0.0, 0.0, set()),
        (0.2, 0.3, {"l2_tie", "trace_norm"}),
    ],
)
def test_soft_sharing_reports_only_penalties_with_a_positive_weight(
    tiny, l2: float, trace: float, keys: set[str]
) -> None:
    model = _build(tiny, "soft_sharing", bottom_hidden=(4,), l2_weight=l2, trace_norm_weight=trace)
    assert set(model.train().penalties()) == keys
    assert set(model(_feats(tiny, 4)).aux_losses) == keys


def test_l2_tie_of_a_flat_stack_is_the_pairwise_sum() -> None:
    torch.manual_seed(0)
    for w in (torch.randn(4, 5, dtype=torch.float64), torch.randn(3, 2, 3, 2)):
        ref = sum((w[s] - w[t]).square().sum() for s, t in itertools.combinations(range(len(w)), 2))
        torch.testing.assert_close(l2_tie(w), ref)


# -- all three: dropout in the bottoms, last shared layer, task parameters ------------------
CONFIGS = {
    "asymmetric": ("asymmetric_sharing", {"bottom_hidden": (8, 5, 6)}),
    "customized_fused": (
        "customized_sharing",
        {"shared_hidden": (8, 6), "specific_hidden": (8, 6)},
    ),
    "customized": ("customized_sharing", {"shared_hidden": (8, 5, 6), "specific_hidden": (7,)}),
    "soft": ("soft_sharing", {"bottom_hidden": (8, 5, 6)}),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_bottoms_apply_dropout_in_training(tiny, config: str) -> None:
    name, params = CONFIGS[config]
    model = _build(tiny, name, activation="tanh", dropout=0.5, tower_hidden=(4,), **params)
    feats = _feats(tiny, 64)
    for t in TASKS:
        # the bottoms' part of the tower input (asymmetric: click's own bottom, then padding);
        # tanh is never exactly 0, dropout zeroes about half the entries
        x = model.eval()(feats).tower_inputs[t][:, :6]
        assert _zero_fraction(x) == 0.0
        x = model.train()(feats).tower_inputs[t]
        width = 6 if config.startswith("asymmetric") else x.shape[1]
        assert 0.3 < _zero_fraction(x[:, :width]) < 0.7
        if config == "customized":  # the shared bottom and the task's own, apart
            assert 0.3 < _zero_fraction(x[:, :6]) < 0.7 and 0.3 < _zero_fraction(x[:, 6:]) < 0.7


@pytest.mark.parametrize(
    "config, shape",
    [
        ("asymmetric", (2, 5, 6)),  # the bottoms' last layer, [T, in, out]
        ("customized_fused", (3, 8, 6)),  # the fused stack's last layer (shared = member 0)
        ("customized", (1, 5, 6)),  # the separate shared bottom's last layer
        ("soft", (2, 5, 6)),
    ],
)
def test_last_shared_layer_is_the_last_layer_of_the_shared_stack(
    tiny, config: str, shape: tuple[int, ...]
) -> None:
    name, params = CONFIGS[config]
    model = _build(tiny, name, **params)
    w = model.last_shared_layer()
    assert isinstance(w, nn.Parameter) and tuple(w.shape) == shape
    stack = model.shared if config == "customized" else model.bottoms
    assert w is stack.weights[len(stack.dims) - 1]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_task_parameters_are_the_tasks_tower(tiny, config: str) -> None:
    name, params = CONFIGS[config]
    model = _build(tiny, name, **params)
    for t in TASKS:
        own = model.task_parameters(t)
        assert [id(p) for p in own] == [id(p) for p in model.heads.towers[t].parameters()]
        assert len(own) == 2 * len(model.heads.towers[t].layers)
    shared = {id(p) for p in model.shared_parameters()}
    assert id(model.last_shared_layer()) in shared
    assert not shared & {id(p) for t in TASKS for p in model.heads.towers[t].parameters()}
