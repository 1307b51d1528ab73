"""Tests that kill the mutants of ``mtlrec.models.esm2`` the rest of the suite lets live
(``python benchmarks/mutation.py models``): ESM²'s forward pass over a shared bottom rebuilt by
hand from its own weights (plain matmuls with the configured activation, the entire-space
products of Wen et al., SIGIR 2020, in float64), the options the bottom and the towers must
receive (widths, activation, dropout), the tower inputs it reports, the exact messages of its
configuration errors (roles, masks, reserved names, logit add-ons), its task-specific parameters
and its last shared layer."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from _model_refs import mlp_ref
from torch import nn

from mtlrec.batch import Features
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.models.base import MultiTaskModel
from mtlrec.models.esm2 import ACTION, BUY_AFTER_ACTION, BUY_AFTER_OTHER
from mtlrec.nn.mlp import MLP
from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec

N = 24
ROLES = ("ctr", "ctavr", "cvr", "ctcvr")
FOUR = ("ctr", ACTION, BUY_AFTER_ACTION, BUY_AFTER_OTHER)  # y1..y4 of the paper


@cache
def _table() -> pa.Table:
    """A small funnel (click -> action -> buy) over two sparse fields, a dense one and a
    position ``pos`` (a ``role: bias`` feature in the schemas that have one)."""
    rng = np.random.default_rng(0)
    user, item, price = rng.integers(0, 6, N), rng.integers(0, 7, N), rng.normal(size=N)
    click = (user % 2 == 0).astype(np.int64)
    return pa.table(
        {
            "user": pa.array([f"u{u}" for u in user]),
            "item": pa.array([f"i{i}" for i in item]),
            "price": pa.array(price),
            "pos": pa.array([f"p{p}" for p in rng.integers(0, 3, N)]),
            "click": pa.array(click),
            "action": pa.array((click * (price > 0)).astype(np.int64)),
            "buy": pa.array((click * (item % 2 == 0)).astype(np.int64)),
        }
    )


@cache
def _pre(bias: bool) -> Preprocessor:
    return Preprocessor.fit(_schema(bias=bias), _table())


def _schema(
    extra: tuple[TaskSpec, ...] = (), bias: bool = False, ctr_mask: str | None = None
) -> Schema:
    features: tuple[Any, ...] = (
        SparseFeature(name="user", embedding_dim=3),
        SparseFeature(name="item", embedding_dim=3),
        DenseFeature(name="price"),
    )
    if bias:
        features = (*features, SparseFeature(name="pos", embedding_dim=2, role="bias"))
    tasks = (
        TaskSpec(name="ctr", kind="binary", label="click", mask=ctr_mask),
        TaskSpec(name="ctavr", kind="binary", label="action"),
        TaskSpec(name="cvr", kind="binary", label="buy", mask="click"),
        TaskSpec(name="ctcvr", kind="binary", label="buy"),
        *extra,
    )
    return Schema(features=features, tasks=tasks)


LIKE = TaskSpec(name="like", kind="binary", label="click")  # an ordinary (non-role) task


def _build(schema: Schema | None = None, seed: int = 0, **params: Any) -> MultiTaskModel:
    schema = schema or _schema()
    torch.manual_seed(seed)
    sizes = _pre(bool(schema.bias_features)).table_sizes()
    return build_model("esm2", schema, sizes, params)


def _features() -> Features:
    return _pre(False).encode(_table()).features_at(slice(0, N))


def _ids(params: list[nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


def _exact(msg: str) -> str:
    return f"^{re.escape(msg)}$"


# -- the forward pass ----------------------------------------------------------------------------
def test_shared_bottom_forward_is_bottom_then_four_towers_then_entire_space_products() -> None:
    # h = bottom(e) (tanh after every bottom layer); z_k = tower_k(h); y_k = sigmoid(z_k);
    # pCTAVR = y1 y2, pCVR = y2 y3 + (1 - y2) y4, pCTCVR = y1 pCVR (Wen et al., SIGIR 2020)
    model = _build(
        base="shared_bottom", bottom_hidden=(8, 7, 5), tower_hidden=(6, 4), activation="tanh"
    ).eval()
    feats = _features()
    with torch.no_grad():
        out = model(feats)
        emb = model.embedding(feats).flat
        h = mlp_ref(model.bottom, emb, torch.tanh, last=True)
        z = {t: mlp_ref(model.heads.towers[t], h, torch.tanh, last=False) for t in FOUR}
    assert isinstance(model.bottom, MLP)
    assert model.bottom.layers[0].in_features == emb.shape[1]
    assert [lin.out_features for lin in model.bottom.layers] == [8, 7, 5]
    for t in FOUR:
        # every tower reads the bottom's last width (5) and has the asked hidden layers
        tower = model.heads.towers[t]
        assert [(lin.in_features, lin.out_features) for lin in tower.layers] == [
            (5, 6),
            (6, 4),
            (4, 1),
        ]
    assert h.shape == (N, 5)
    torch.testing.assert_close(out.logits["ctr"], z["ctr"].squeeze(-1))
    y1, y2, y3, y4 = (torch.sigmoid(z[t].squeeze(-1).double()) for t in FOUR)
    cvr = y2 * y3 + (1 - y2) * y4
    want = {"ctavr": y1 * y2, "cvr": cvr, "ctcvr": y1 * cvr}
    assert set(out.log_probs) == set(want)
    for task, p in want.items():
        torch.testing.assert_close(out.log_probs[task].double(), torch.log(p), rtol=1e-5, atol=1e-6)
    # the click tower read the bottom's output
    assert set(out.tower_inputs) == {"ctr"}
    torch.testing.assert_close(out.tower_inputs["ctr"], h)


def test_embedding_base_towers_read_the_embedding_and_report_it() -> None:
    model = _build(_schema(extra=(LIKE,)), tower_hidden=(6,), activation="tanh").eval()
    feats = _features()
    with torch.no_grad():
        out = model(feats)
        emb = model.embedding(feats).flat
    assert isinstance(model.bottom, nn.Identity)
    assert set(out.logits) == {"ctr", "like"}
    assert set(out.tower_inputs) == {"ctr", "like"}
    for t in ("ctr", "like"):
        torch.testing.assert_close(out.tower_inputs[t], emb)
        ref = mlp_ref(model.heads.towers[t], emb, torch.tanh, last=False).squeeze(-1)
        torch.testing.assert_close(out.logits[t], ref)


def test_shared_bottom_applies_dropout() -> None:
    # bottom = MLP(..., dropout=0.5): in training about half of its outputs are exact zeros
    # (tanh of a non-zero pre-activation is never 0), in eval none
    model = _build(base="shared_bottom", bottom_hidden=(16,), activation="tanh", dropout=0.5)
    emb = model.embedding(_features()).flat.detach()
    with torch.no_grad():
        model.eval()
        assert bool((model.bottom(emb) != 0).all())
        model.train()
        torch.manual_seed(1)
        dropped = (model.bottom(emb) == 0).float().mean()
    assert 0.3 < float(dropped) < 0.7


# -- configuration errors ------------------------------------------------------------------------
def test_unknown_role_task_message_without_the_ctavr_hint() -> None:
    msg = (
        "esm2: model.params.ctr_task is 'nope' but the schema has no binary task of that name "
        "(tasks: ['ctr', 'ctavr', 'cvr', 'ctcvr'])"
    )
    with pytest.raises(ConfigError, match=_exact(msg)):
        _build(ctr_task="nope")


def test_unknown_ctavr_task_message_has_the_null_hint() -> None:
    msg = (
        "esm2: model.params.ctavr_task is 'nope' but the schema has no binary task of that name "
        "(tasks: ['ctr', 'ctavr', 'cvr', 'ctcvr']); set ctavr_task: null when there is no "
        "action label"
    )
    with pytest.raises(ConfigError, match=_exact(msg)):
        _build(ctavr_task="nope")


def test_masked_entire_space_task_message() -> None:
    msg = (
        "esm2: task 'ctr' has mask 'click', but ESM² trains pCTR, pCTAVR and pCTCVR over the "
        "entire space of impressions (Wen et al., SIGIR 2020): drop the mask (only the CVR "
        "task keeps its click mask, for evaluation)"
    )
    with pytest.raises(ConfigError, match=_exact(msg)):
        _build(_schema(ctr_mask="click"))


def test_reserved_tower_name_message() -> None:
    reserved = TaskSpec(name=BUY_AFTER_ACTION, kind="binary", label="buy")
    msg = "esm2: task name 'esm2:buy|action' is reserved for its own towers"
    with pytest.raises(ConfigError, match=_exact(msg)):
        _build(_schema(extra=(reserved,)))


@pytest.mark.parametrize(
    ("option", "value"),
    [("fm_tasks", ("ctr",)), ("wide_tasks", ("ctcvr",)), ("bias_tower", {"tasks": ("ctr",)})],
)
def test_logit_addons_on_role_tasks_are_refused(option: str, value: Any) -> None:
    name = "bias_tower.tasks" if option == "bias_tower" else option
    msg = (
        f"esm2: {name} cannot include the ctr, ctavr, cvr or ctcvr task (the entire-space "
        "products are formed from the towers' own logits)"
    )
    schema = _schema(extra=(LIKE,), bias=option == "bias_tower")
    with pytest.raises(ConfigError, match=_exact(msg)):
        _build(schema, **{option: value})
    # the same add-on on the ordinary task is accepted
    ok = {"tasks": ("like",)} if option == "bias_tower" else ("like",)
    _build(schema, **{option: ok})


# -- parameter bookkeeping -----------------------------------------------------------------------
def test_task_parameters_own_tower_for_ordinary_tasks_none_for_roles() -> None:
    model = _build(_schema(extra=(LIKE,)), tower_hidden=(6,))
    own = list(model.heads.towers["like"].parameters())
    assert len(own) == 4
    assert _ids(model.task_parameters("like")) == _ids(own)
    for t in ROLES:
        assert model.task_parameters(t) == []


def test_last_shared_layer_is_the_click_towers_output_layer_with_roles_only() -> None:
    # every role loss contains y1: the click tower's last Linear, [1, tower_hidden[-1]]
    model = _build(tower_hidden=(6, 4))
    w = model.last_shared_layer()
    assert w is model.heads.towers["ctr"].layers[-1].weight
    assert w.shape == (1, 4)


def test_last_shared_layer_is_the_bottoms_last_layer_with_other_tasks() -> None:
    model = _build(_schema(extra=(LIKE,)), base="shared_bottom", bottom_hidden=(8, 7, 5))
    w = model.last_shared_layer()
    assert w is model.bottom.layers[-1].weight
    assert w.shape == (5, 7)
    # on the embedding there is no shared layer
    assert _build(_schema(extra=(LIKE,))).last_shared_layer() is None
