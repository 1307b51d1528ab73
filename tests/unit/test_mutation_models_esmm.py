"""Tests that kill the mutants of ``mtlrec.models.esmm``, ``mtlrec.models.dbmtl`` and
``mtlrec.models.shared_bottom`` the rest of the suite let live (``python benchmarks/mutation.py
models``): the forward passes rebuilt by hand from the models' own blocks (bottom layer by
layer, then every tower layer by layer, with a non-default activation and three-layer bottoms
and towers, deeper than the defaults), the tower inputs the models report, dropout in the
bottoms and in DBMTL's towers, the exact messages of ESMM's config errors, the last shared
layer, and the task (group) parameters."""

from __future__ import annotations

import re

import pytest
import torch
from _model_refs import mlp_ref
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.models.base import MultiTaskModel
from mtlrec.nn.mlp import MLP
from mtlrec.schema import Schema, TaskSpec
from mtlrec.testing import tiny_dataset, tiny_funnel_dataset

BOTTOM = (8, 5, 6)  # three layers: [1] != [-1] and [-2] != [-1]
TOWER = (5, 3)  # two hidden tower layers plus the logit layer


@pytest.fixture(scope="module")
def tiny():
    return tiny_dataset(n=32)


@pytest.fixture(scope="module")
def funnel():
    return tiny_funnel_dataset(n=32)


def _build(data, name: str, schema: Schema | None = None, seed: int = 0, **params):
    pre, _ = data
    torch.manual_seed(seed)
    return build_model(name, schema or pre.schema, pre.table_sizes(), params)


def _feats(data, n: int = 16) -> Features:
    return data[1].features_at(slice(0, n))


def _funnel_plus_watch(funnel) -> Schema:
    """The funnel schema with a fourth, ordinary task ``watch`` (its own tower on the base)."""
    base = funnel[0].schema
    extra = TaskSpec(name="watch", kind="regression", label="click")
    return Schema(features=base.features, tasks=(*base.tasks, extra))


# -- references -----------------------------------------------------------------------------
def _mlp_ref(mlp: MLP, x: Tensor, widths: tuple[int, ...], act, last_act: bool) -> Tensor:
    """``mlp`` as linear layers of widths ``widths`` (checked) with ``act`` after each (the last
    only when ``last_act``), computed from its weights."""
    assert [lin.out_features for lin in mlp.layers] == list(widths)
    return mlp_ref(mlp, x, act, last_act)


def _zero_fraction(x: Tensor) -> float:
    return (x == 0).float().mean().item()


def _ids(params: list[nn.Parameter]) -> list[int]:
    return [id(p) for p in params]


# -- ESMM -----------------------------------------------------------------------------------
def test_esmm_shared_bottom_forward_is_rebuilt_from_its_blocks(funnel) -> None:
    model = _build(
        funnel, "esmm", base="shared_bottom", bottom_hidden=BOTTOM, tower_hidden=TOWER,
        activation="tanh",
    ).eval()  # fmt: skip
    feats = _feats(funnel)
    with torch.no_grad():
        out = model(feats)
        # the bottom: tanh after every layer; every tower reads its [B, BOTTOM[-1]] output
        h = _mlp_ref(model.bottom, model.embedding(feats).flat, BOTTOM, torch.tanh, True)
        assert h.shape == (16, BOTTOM[-1])
        assert set(out.tower_inputs) == {"ctr", "cvr"}
        z = {}
        for t in ("ctr", "cvr"):
            torch.testing.assert_close(out.tower_inputs[t], h)
            z[t] = _mlp_ref(model.heads.towers[t], h, (*TOWER, 1), torch.tanh, False)
            torch.testing.assert_close(out.logits[t], z[t].squeeze(-1))
    # Ma et al. Eq. 2: pCTCVR = pCTR * pCVR
    p = torch.sigmoid(z["ctr"].double()) * torch.sigmoid(z["cvr"].double())
    torch.testing.assert_close(out.log_probs["ctcvr"].double().exp(), p.squeeze(-1))


def test_esmm_embedding_base_reports_the_embedding_as_tower_input(funnel) -> None:
    model = _build(funnel, "esmm", tower_hidden=TOWER).eval()
    feats = _feats(funnel)
    with torch.no_grad():
        out = model(feats)
        flat = model.embedding(feats).flat
    assert set(out.tower_inputs) == {"ctr", "cvr"}
    for t in ("ctr", "cvr"):
        torch.testing.assert_close(out.tower_inputs[t], flat)


def test_esmm_shared_bottom_applies_dropout(funnel) -> None:
    # tanh is never exactly 0 on these inputs: zeros in the bottom output come from dropout
    model = _build(
        funnel, "esmm", base="shared_bottom", bottom_hidden=BOTTOM, tower_hidden=TOWER,
        activation="tanh", dropout=0.5,
    ).train()  # fmt: skip
    out = model(_feats(funnel))
    assert _zero_fraction(out.tower_inputs["ctr"]) > 0.2
    model.eval()
    with torch.no_grad():
        assert _zero_fraction(model(_feats(funnel)).tower_inputs["ctr"]) == 0.0


def test_esmm_last_shared_layer_is_the_ctr_output_layer_without_other_tasks(funnel) -> None:
    # CTR loss reaches the CTR tower, CTCVR loss both towers: the CTR tower's logit layer
    for base in ("embedding", "shared_bottom"):
        model = _build(funnel, "esmm", base=base, bottom_hidden=BOTTOM, tower_hidden=TOWER)
        w = model.last_shared_layer()
        assert w is model.heads.towers["ctr"].layers[2].weight
        assert w.shape == (1, TOWER[-1])


def test_esmm_last_shared_layer_with_another_task_is_the_bottom_or_none(funnel) -> None:
    schema = _funnel_plus_watch(funnel)
    model = _build(
        funnel, "esmm", schema, base="shared_bottom", bottom_hidden=BOTTOM, tower_hidden=TOWER
    )
    w = model.last_shared_layer()
    assert w is model.bottom.layers[2].weight
    assert w.shape == (BOTTOM[2], BOTTOM[1])
    # on the embedding base the towers share no dense layer
    assert _build(funnel, "esmm", schema, tower_hidden=TOWER).last_shared_layer() is None


def test_esmm_task_parameters_are_the_tower_of_an_ordinary_task(funnel) -> None:
    model = _build(funnel, "esmm", _funnel_plus_watch(funnel), tower_hidden=TOWER)
    own = model.task_parameters("watch")
    assert _ids(own) == _ids(list(model.heads.towers["watch"].parameters()))
    assert len(own) == 2 * (len(TOWER) + 1)  # weight and bias per layer
    for t in ("ctr", "cvr", "ctcvr"):  # they serve pCTCVR: shared
        assert model.task_parameters(t) == []


def test_esmm_mask_error_message_is_exact(funnel) -> None:
    base = funnel[0].schema
    tasks = [
        TaskSpec(**{**t.model_dump(), "mask": "click"}) if t.name == "ctcvr" else t
        for t in base.tasks
    ]
    schema = Schema(features=base.features, tasks=tasks)
    msg = (
        "esmm: task 'ctcvr' has mask 'click', but ESMM trains its CTR and CTCVR "
        "tasks over the entire space of impressions (Ma et al., SIGIR 2018, Eq. 3): "
        "a mask would restrict pCTCVR to a sub-space and bring back the sample "
        "selection bias that ESMM removes; drop the mask (only the CVR task keeps "
        "its click mask, for evaluation)"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        _build(funnel, "esmm", schema, tower_hidden=TOWER)


@pytest.mark.parametrize("option", ["fm_tasks", "wide_tasks"])
@pytest.mark.parametrize("task", ["ctr", "cvr", "ctcvr"])
def test_esmm_refuses_fm_and_wide_on_its_roles_with_the_exact_message(
    funnel, option: str, task: str
) -> None:
    msg = f"esmm: {option} cannot include the ctr, cvr or ctcvr task"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        _build(funnel, "esmm", tower_hidden=TOWER, **{option: [task]})


# -- DBMTL ----------------------------------------------------------------------------------
def test_dbmtl_forward_is_rebuilt_from_its_blocks(tiny) -> None:
    hidden = (4, 3)
    model = _build(
        tiny, "dbmtl", bottom_hidden=BOTTOM, tower_hidden=hidden, activation="tanh"
    ).eval()
    feats = _feats(tiny)
    with torch.no_grad():
        out = model(feats)
        s = _mlp_ref(model.bottom, model.embedding(feats).flat, BOTTOM, torch.tanh, True)
        # Wang et al.: h_click = f([s]); h_watch = f([s; h_click]); z_k = w_k h_k + b_k
        reads = {"click": s}
        h_click = _mlp_ref(model.towers.bodies["click"], s, hidden, torch.tanh, True)
        reads["watch"] = torch.cat([s, h_click], dim=-1)
        assert set(out.tower_inputs) == {"click", "watch"}
        for t, x in reads.items():
            torch.testing.assert_close(out.tower_inputs[t], x)
            h = _mlp_ref(model.towers.bodies[t], x, hidden, torch.tanh, True)
            lin = model.towers.outputs[t]
            torch.testing.assert_close(out.logits[t], (h @ lin.weight.T + lin.bias).squeeze(-1))


def test_dbmtl_applies_dropout_in_the_bottom_and_the_towers(tiny) -> None:
    hidden = (6,)
    model = _build(
        tiny, "dbmtl", bottom_hidden=BOTTOM, tower_hidden=hidden, activation="tanh",
        dropout=0.5,
    ).train()  # fmt: skip
    read = model(_feats(tiny)).tower_inputs["watch"]  # [s; h_click]
    s, h_click = read[:, : BOTTOM[-1]], read[:, BOTTOM[-1] :]
    # tanh is never exactly 0 here: zeros come from dropout (bottom, then the click tower)
    assert _zero_fraction(s) > 0.2
    assert _zero_fraction(h_click) > 0.2
    model.eval()
    with torch.no_grad():
        assert _zero_fraction(model(_feats(tiny)).tower_inputs["watch"]) == 0.0


def test_dbmtl_last_shared_layer_is_the_last_bottom_layer(tiny) -> None:
    model = _build(tiny, "dbmtl", bottom_hidden=BOTTOM, tower_hidden=(4,))
    w = model.last_shared_layer()
    assert w is model.bottom.layers[2].weight
    assert w.shape == (BOTTOM[2], BOTTOM[1])


def test_dbmtl_task_and_group_parameters(tiny) -> None:
    model = _build(tiny, "dbmtl", bottom_hidden=BOTTOM, tower_hidden=(4, 3))
    towers = model.towers
    body = {t: list(towers.bodies[t].parameters()) for t in ("click", "watch")}
    outp = {t: list(towers.outputs[t].parameters()) for t in ("click", "watch")}
    # click's hidden layers feed watch's tower: only its output layer is its own
    assert _ids(model.task_parameters("click")) == _ids(outp["click"])
    # watch has no child: body and output layer
    assert _ids(model.task_parameters("watch")) == _ids(body["watch"] + outp["watch"])
    # the optimiser group of a task: its whole tower, body then output layer
    for t in ("click", "watch"):
        group = model.task_group_parameters(t)
        assert _ids(group) == _ids(body[t] + outp[t])
        assert len(group) == 2 * 2 + 2
    detached = _build(tiny, "dbmtl", bottom_hidden=BOTTOM, tower_hidden=(4,), detach_parents=True)
    ref = list(detached.towers.bodies["click"].parameters())
    ref += list(detached.towers.outputs["click"].parameters())
    assert _ids(detached.task_parameters("click")) == _ids(ref)


# -- Shared-Bottom --------------------------------------------------------------------------
def test_shared_bottom_forward_is_rebuilt_from_its_blocks(tiny) -> None:
    model = _build(
        tiny, "shared_bottom", bottom_hidden=BOTTOM, tower_hidden=TOWER, activation="tanh"
    ).eval()
    feats = _feats(tiny)
    with torch.no_grad():
        out = model(feats)
        h = _mlp_ref(model.bottom, model.embedding(feats).flat, BOTTOM, torch.tanh, True)
        assert set(out.tower_inputs) == {"click", "watch"}
        for t in ("click", "watch"):
            torch.testing.assert_close(out.tower_inputs[t], h)
            ref = _mlp_ref(model.heads.towers[t], h, (*TOWER, 1), torch.tanh, False)
            torch.testing.assert_close(out.logits[t], ref.squeeze(-1))


def test_shared_bottom_applies_dropout_in_the_bottom(tiny) -> None:
    model = _build(
        tiny, "shared_bottom", bottom_hidden=BOTTOM, tower_hidden=TOWER, activation="tanh",
        dropout=0.5,
    ).train()  # fmt: skip
    assert _zero_fraction(model(_feats(tiny)).tower_inputs["click"]) > 0.2


def test_shared_bottom_last_shared_layer_is_the_last_bottom_layer(tiny) -> None:
    model: MultiTaskModel = _build(tiny, "shared_bottom", bottom_hidden=BOTTOM, tower_hidden=TOWER)
    w = model.last_shared_layer()
    assert w is model.bottom.layers[2].weight
    assert w.shape == (BOTTOM[2], BOTTOM[1])
