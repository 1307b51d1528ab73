"""Tests that kill the mutants of ``mtlrec.models.aitm``, ``single_task`` and ``ml_mmoe`` the rest
of the suite let live (``python benchmarks/mutation.py models``): each model's forward pass rebuilt
by hand from its own weights (plain matmuls with the configured activation), the options every
block must receive (activation, dropout, hidden widths), the tower inputs a model reports, AITM's
calibration loss (training only, positive weight), its error message, its task-specific
parameters and the last shared layer of AITM and ML-MMoE."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from _model_refs import mlp_ref
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.models.aitm import AITM
from mtlrec.models.base import MultiTaskModel
from mtlrec.models.ml_mmoe import MLMMoE
from mtlrec.models.single_task import SingleTask
from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec

TASKS = ("a", "b", "c")
N = 24


@cache
def _data() -> tuple[Preprocessor, ColumnarDataset]:
    """Three binary tasks (the steps of a path for AITM) over two sparse fields and a dense one."""
    rng = np.random.default_rng(0)
    user, item, price = rng.integers(0, 6, N), rng.integers(0, 7, N), rng.normal(size=N)
    table = pa.table(
        {
            "user": pa.array([f"u{u}" for u in user]),
            "item": pa.array([f"i{i}" for i in item]),
            "price": pa.array(price),
            "a": pa.array((user % 2 == 0).astype(np.int64)),
            "b": pa.array((price > 0).astype(np.int64)),
            "c": pa.array(((price > 0) & (item % 2 == 0)).astype(np.int64)),
        }
    )
    schema = Schema(
        features=(
            SparseFeature(name="user", embedding_dim=3),
            SparseFeature(name="item", embedding_dim=3),
            DenseFeature(name="price"),
        ),
        tasks=tuple(TaskSpec(name=t, kind="binary") for t in TASKS),
    )
    pre = Preprocessor.fit(schema, table)
    return pre, pre.encode(table)


_CLASSES = {"aitm": AITM, "single_task": SingleTask, "ml_mmoe": MLMMoE}


def _build(
    name: str, tasks: tuple[str, ...] = TASKS, seed: int = 0, **params: Any
) -> MultiTaskModel:
    pre, _ = _data()
    torch.manual_seed(seed)
    model = build_model(name, pre.schema.select_tasks(tasks), pre.table_sizes(), params)
    assert isinstance(model, _CLASSES[name])  # the registry builds the class under test
    return model


def _features() -> Features:
    return _data()[1].features_at(slice(0, N))


def _parallel_ref(net: nn.Module, x: Tensor, act: Callable[[Tensor], Tensor]) -> Tensor:
    """A shared-input :class:`ParallelMLP` (every layer activated, no dropout), member by member:
    the first layer's member m owns the columns ``[m*d, (m+1)*d)`` of the fused weight, the
    deeper layers are stacked ``[num, in, out]``. ``[B, in] -> [num, B, out]``."""
    outs = []
    for m in range(net.num):
        h = x
        for layer, d in enumerate(net.dims):
            w, b = net.weights[layer], net.biases[layer]
            if layer == 0:
                w, b = w[:, m * d : (m + 1) * d], b[m * d : (m + 1) * d]
            else:
                w, b = w[m], b[m, 0]
            h = act(h @ w + b)
        outs.append(h)
    return torch.stack(outs)


def _dropout_acts(module: nn.Module, x: Tensor) -> bool:
    """Whether ``module`` drops activations in training: its train-mode output differs from its
    eval-mode one (with p = 0.5 every unit is dropped with probability 1/2)."""
    module.eval()
    with torch.no_grad():
        ref = module(x)
        module.train()
        torch.manual_seed(1)
        out = module(x)
    return not torch.equal(out, ref)


def _ids(params: list[nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


# -- AITM ----------------------------------------------------------------------------------------
def test_aitm_with_one_task_names_the_conversion_path() -> None:
    msg = "aitm needs at least two tasks (the steps of a conversion path)"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        _build("aitm", tasks=("a",))


def test_aitm_forward_is_towers_then_transfers_then_heads() -> None:
    # Xi et al. 2021: q_t = tower_t(e); z_1 = q_1, z_t = AIT(z_{t-1}, q_t); logit_t = head_t(z_t)
    model = _build("aitm", tower_hidden=(6, 5), head_hidden=(3,), activation="tanh").eval()
    feats = _features()
    with torch.no_grad():
        out = model(feats)
        emb = model.embedding(feats).flat
        q = _parallel_ref(model.towers, emb, torch.tanh)  # [T, B, k], tanh after every layer
        z = {"a": q[0]}
        gates = {}
        for i, t in enumerate(TASKS[1:], start=1):
            z[t], gates[f"ait_{t}"] = model.transfers[t](z[TASKS[i - 1]], q[i])
    assert q.shape == (3, N, 5)
    for t in TASKS:
        # the heads have the hidden layer asked for, then the width-1 logit
        assert [lin.out_features for lin in model.heads.towers[t].layers] == [3, 1]
        torch.testing.assert_close(out.tower_inputs[t], z[t])
        logit = mlp_ref(model.heads.towers[t], z[t], torch.tanh, last=False).squeeze(-1)
        torch.testing.assert_close(out.logits[t], logit)
    assert set(out.gates) == set(gates)
    for g, w in gates.items():
        torch.testing.assert_close(out.gates[g], w)


def test_aitm_deep_towers_transfer_the_last_tower_width() -> None:
    # the transfers and heads read the towers' output width, tower_hidden[-1] (here 5, not 6)
    model = _build("aitm", tower_hidden=(7, 6, 5)).eval()
    out = model(_features())
    assert all(x.shape == (N, 5) for x in out.tower_inputs.values())
    assert model.transfers["b"].value.in_features == 5
    assert all(v.shape == (N,) for v in out.logits.values())


def test_aitm_towers_and_heads_apply_dropout() -> None:
    model = _build("aitm", tower_hidden=(6, 5), head_hidden=(3,), activation="tanh", dropout=0.5)
    emb = model.embedding(_features()).flat.detach()
    assert _dropout_acts(model.towers, emb)
    assert _dropout_acts(model.heads.towers["b"], torch.randn(N, 5))


def test_aitm_calibration_only_in_training_with_a_positive_weight() -> None:
    feats = _features()
    model = _build("aitm", tower_hidden=(4,), calibration_weight=0.6)
    out = model.train()(feats)
    # L_lc = alpha * sum_t mean_i max(p_t(i) - p_{t-1}(i), 0) over consecutive binary steps
    p = {t: torch.sigmoid(out.logits[t]) for t in TASKS}
    ref = 0.6 * sum((p[c] - p[b]).clamp_min(0).mean() for b, c in itertools.pairwise(TASKS))
    assert set(out.aux_losses) == {"calibration"}
    torch.testing.assert_close(out.aux_losses["calibration"], ref)
    assert model.eval()(feats).aux_losses == {}  # a training regulariser only
    off = _build("aitm", tower_hidden=(4,), calibration_weight=0.0).train()
    assert off(feats).aux_losses == {}  # alpha = 0: no term at all


def test_aitm_task_parameters_are_the_head_and_only_the_last_transfer() -> None:
    # z_t feeds every later step, so only the last step's transfer is its own
    model = _build("aitm", tower_hidden=(4,), head_hidden=(3,))
    head = {t: list(model.heads.towers[t].parameters()) for t in TASKS}
    assert _ids(model.task_parameters("a")) == _ids(head["a"])
    assert _ids(model.task_parameters("b")) == _ids(head["b"])
    last = [*model.transfers["c"].parameters(), *head["c"]]
    assert _ids(model.task_parameters("c")) == _ids(last)
    assert len(model.task_parameters("c")) == len(last)  # no duplicates
    # with two steps the second one owns its transfer too
    two = _build("aitm", tasks=("a", "b"), tower_hidden=(4,))
    own = [*two.transfers["b"].parameters(), *two.heads.towers["b"].parameters()]
    assert _ids(two.task_parameters("b")) == _ids(own)
    assert _ids(two.task_parameters("a")) == _ids(two.heads.towers["a"].parameters())


def test_aitm_last_shared_layer_is_the_towers_last_weight() -> None:
    model = _build("aitm", tower_hidden=(7, 6, 5))
    w = model.last_shared_layer()
    assert w is model.towers.weights[2]
    assert w.shape == (3, 6, 5)  # [T, in, out] of the third tower layer


# -- single task ---------------------------------------------------------------------------------
def test_single_task_forward_is_bottom_then_tower_per_task() -> None:
    model = _build("single_task", bottom_hidden=(6, 5), tower_hidden=(3,), activation="tanh").eval()
    feats = _features()
    with torch.no_grad():
        out = model(feats)
        for t in TASKS:
            bottom = model.bottoms[t]
            assert [lin.out_features for lin in bottom.layers] == [6, 5]
            assert [lin.out_features for lin in model.heads.towers[t].layers] == [3, 1]
            emb = model.embeddings[t](feats).flat
            rep = mlp_ref(bottom, emb, torch.tanh, last=True)  # every bottom layer activated
            torch.testing.assert_close(out.tower_inputs[t], rep)
            logit = mlp_ref(model.heads.towers[t], rep, torch.tanh, last=False).squeeze(-1)
            torch.testing.assert_close(out.logits[t], logit)


def test_single_task_with_one_task_is_a_plain_network() -> None:
    model = _build("single_task", tasks=("a",), bottom_hidden=(5,)).eval()
    out = model(_features())
    assert set(out.logits) == {"a"} and out.logits["a"].shape == (N,)
    assert out.tower_inputs["a"].shape == (N, 5)


def test_single_task_without_bottom_towers_read_the_embedding() -> None:
    model = _build("single_task", bottom_hidden=(), tower_hidden=(3,)).eval()
    feats = _features()
    out = model(feats)
    for t in TASKS:
        emb = model.embeddings[t](feats).flat
        torch.testing.assert_close(out.tower_inputs[t], emb)  # the empty MLP is the identity
        assert model.heads.towers[t].layers[0].in_features == emb.shape[1]


def test_single_task_bottoms_and_towers_apply_dropout() -> None:
    model = _build(
        "single_task", bottom_hidden=(6, 5), tower_hidden=(3,), activation="tanh", dropout=0.5
    )
    emb = model.embeddings["a"](_features()).flat.detach()
    assert _dropout_acts(model.bottoms["a"], emb)
    assert _dropout_acts(model.heads.towers["a"], torch.randn(N, 5))


# -- ML-MMoE -------------------------------------------------------------------------------------
def test_ml_mmoe_experts_use_the_activation_at_every_level() -> None:
    model = _build(
        "ml_mmoe", num_levels=2, num_experts=2, expert_hidden=(6, 5), activation="tanh"
    ).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for level in model.levels:
            x = torch.randn(N, level.experts.in_dim)
            ref = _parallel_ref(level.experts, x, torch.tanh)
            torch.testing.assert_close(level.experts(x), ref)


def test_ml_mmoe_experts_apply_dropout_at_every_level() -> None:
    model = _build(
        "ml_mmoe", num_levels=2, num_experts=2, expert_hidden=(6, 5), activation="tanh",
        dropout=0.5,
    )  # fmt: skip
    torch.manual_seed(2)
    for level in model.levels:
        assert _dropout_acts(level.experts, torch.randn(N, level.experts.in_dim))


def test_ml_mmoe_single_layer_experts_chain_their_width() -> None:
    # levels j > 1 and the towers read the experts' output width, expert_hidden[-1]
    model = _build("ml_mmoe", num_levels=2, num_experts=2, expert_hidden=(5,)).eval()
    out = model(_features())
    assert model.levels[1].experts.in_dim == 5
    assert all(x.shape == (N, 5) for x in out.tower_inputs.values())
    assert all(v.shape == (N,) for v in out.logits.values())


def test_ml_mmoe_last_shared_layer_is_the_last_levels_last_expert_weight() -> None:
    model = _build("ml_mmoe", num_levels=3, num_experts=2, expert_hidden=(7, 6, 5))
    w = model.last_shared_layer()
    assert w is model.levels[2].experts.weights[2]
    assert w.shape == (2, 6, 5)  # [E, in, out]
