"""Auxiliary tasks and losses: the gradient-reversal layer (Ganin & Lempitsky, ICML 2015),
DIEN's next-behaviour loss (Zhou et al., AAAI 2019), and auxiliary tasks kept out of export,
serving, fusion and ``mean/<metric>`` epoch selection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _option_runs import options_run
from torch import nn

from mtlrec.batch import FIRST_ID, Features
from mtlrec.config import monitor_key
from mtlrec.errors import ConfigError
from mtlrec.losses import MultiTaskLoss
from mtlrec.models import build_model
from mtlrec.nn.auxiliary import (
    GradientReversal,
    NextBehaviourLoss,
    grad_reverse,
    next_behaviour_loss,
    sample_negatives,
)
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout, SequenceSpec
from mtlrec.schema import Schema
from mtlrec.testing import tiny_bias_dataset, tiny_bias_schema, tiny_bias_table
from mtlrec.train.run import load_run
from mtlrec.train.trainer import monitored_value

SMALL = {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}


# -- gradient reversal -------------------------------------------------------------------------
def _grads(lam: float | None) -> tuple[list, list, torch.Tensor]:
    """Gradients of the layer below and the layer above an optional reversal."""
    torch.manual_seed(0)
    below, above = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    h = below(x)
    h = h if lam is None else grad_reverse(h, lam)
    loss = above(torch.tanh(h)).square().sum()
    loss.backward()
    return [p.grad for p in below.parameters()], [p.grad for p in above.parameters()], loss


@pytest.mark.parametrize("lam", [1.0, 0.3, 2.5])
def test_reversal_flips_exactly_the_gradient_below_it(lam: float) -> None:
    plain_below, plain_above, plain_loss = _grads(None)
    rev_below, rev_above, rev_loss = _grads(lam)
    assert torch.equal(plain_loss, rev_loss)  # the identity forward
    for a, b in zip(rev_above, plain_above, strict=True):
        assert torch.equal(a, b)  # above the layer: untouched
    for a, b in zip(rev_below, plain_below, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, -lam * b, rtol=1e-12, atol=0)  # same size, other sign


def test_reversal_module_and_inference() -> None:
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    GradientReversal(0.0)(x).sum().backward()
    assert x.grad is not None and not x.grad.any()
    with torch.no_grad():
        y = GradientReversal(3.0)(x)
    assert torch.equal(y, x)
    with pytest.raises(ValueError):
        GradientReversal(-1.0)


def _domain_grads(params: dict, loss_task: str) -> dict[str, torch.Tensor]:
    pre, ds = tiny_bias_dataset(64)
    torch.manual_seed(0)
    # gelu: no unit of the tiny tower is dead for every row (relu's can be)
    model = build_model(
        "mmoe", pre.schema, pre.table_sizes(), {**SMALL, "activation": "gelu", **params}
    )
    batch = ds.take(slice(0, 64))
    loss = MultiTaskLoss([pre.schema.task(loss_task)])(model(batch.features), batch)[loss_task]
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_adversarial_task_reverses_its_gradient_into_the_layers_below_its_tower() -> None:
    lam = 0.5
    plain = _domain_grads({}, "domain")
    adv = _domain_grads({"adversarial_tasks": {"domain": lam}}, "domain")
    assert set(plain) == set(adv)
    tower = [k for k in plain if k.startswith("heads.towers.domain")]
    assert tower and any(k.startswith("experts.") and plain[k].any() for k in plain)
    for k in plain:
        if k in tower:  # the domain tower itself learns to predict the domain
            torch.testing.assert_close(adv[k], plain[k])
        else:  # everything below it (experts, embeddings, the domain gate): reversed
            torch.testing.assert_close(adv[k], -lam * plain[k], rtol=1e-5, atol=1e-9)
    # the other tasks' gradients are untouched
    click_plain = _domain_grads({}, "click")
    click_adv = _domain_grads({"adversarial_tasks": {"domain": lam}}, "click")
    for k, v in click_plain.items():
        torch.testing.assert_close(click_adv[k], v)


def test_adversarial_options_are_checked() -> None:
    pre, _ = tiny_bias_dataset(32)
    for bad, msg in (
        ({"click": 1.0}, "must be an auxiliary task"),
        ({"nope": 1.0}, "no task 'nope'"),
        ({"domain": -1.0}, "lambda must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=msg):
            build_model("mmoe", pre.schema, pre.table_sizes(), {**SMALL, "adversarial_tasks": bad})


# -- DIEN's auxiliary loss ---------------------------------------------------------------------
def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_next_behaviour_loss_equals_a_hand_computed_case() -> None:
    h = [[[0.5, -1.0], [2.0, 0.25], [1.0, 1.0]]]  # states h_t: B=1, L=3, E=2
    pos = [[[1.0, 0.0], [-0.5, 2.0], [3.0, 3.0]]]  # e_(t+1)
    neg = [[[[0.0, 1.0], [1.0, 1.0]], [[2.0, -1.0], [0.5, 0.5]], [[9.0, 9.0], [9.0, 9.0]]]]
    valid = [[True, True, False]]  # the last step has no next item
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    total, count = 0.0, 0
    for t in range(3):
        if not valid[0][t]:
            continue
        total += math.log(_sig(dot(h[0][t], pos[0][t])))
        total += sum(math.log(1.0 - _sig(dot(h[0][t], n))) for n in neg[0][t])
        count += 1
    want = -total / count
    f64 = torch.float64
    got = next_behaviour_loss(
        torch.tensor(h, dtype=f64),
        torch.tensor(pos, dtype=f64),
        torch.tensor(neg, dtype=f64),
        torch.tensor(valid),
    )
    assert got.dtype == f64
    assert abs(float(got) - want) < 1e-12, (float(got), want)
    none = torch.zeros(1, 3, dtype=torch.bool)
    assert (
        float(next_behaviour_loss(*(torch.tensor(a, dtype=f64) for a in (h, pos, neg)), none)) == 0
    )


def test_next_behaviour_module_scores_only_real_next_items() -> None:
    lay = FeatureLayout(
        (), (SequenceSpec("hist", "item", 3, "mean", 5),), (), {"item": 9}, {"item": 3}
    )
    emb = EmbeddingCollection(lay, init_std=0.5)
    block = NextBehaviourLoss("hist", "item", 3, 9, negatives=2)
    ids = torch.tensor([[5, 3, 1, 4, 0], [2, 6, 0, 0, 0]], dtype=torch.int32)  # 1: OOV, 0: pad
    feats = Features(torch.zeros(2, 0, dtype=torch.int32), torch.zeros(2, 0), {"hist": ids})
    torch.manual_seed(7)
    got = block(emb, feats)
    # the same by hand: the GRU's states, the next items, the valid positions
    values, _ = emb.embed_sequence(feats, "hist")
    states, _ = block.gru(values)
    valid = torch.tensor([[True, False, True, False], [True, False, False, False]])
    torch.manual_seed(7)
    negs = emb.embed_ids("item", sample_negatives(ids[:, 1:], 9, 2))
    want = next_behaviour_loss(states[:, :-1], values[:, 1:], negs, valid)
    torch.testing.assert_close(got, want)
    got.backward()
    assert block.gru.weight_hh_l0.grad is not None and emb.tables["d3"].weight.grad is not None


def test_sampled_negatives_skip_the_positive_and_cover_the_table() -> None:
    torch.manual_seed(0)
    pos = torch.full((4000,), 4)
    neg = sample_negatives(pos.view(1, -1), rows=8, k=3)  # real ids 2..7
    assert neg.shape == (1, 4000, 3)
    assert (neg != 4).all() and neg.min() >= FIRST_ID and neg.max() <= 7
    counts = torch.bincount(neg.flatten(), minlength=8)[FIRST_ID:]
    share = counts[counts > 0].float() / counts.sum()
    assert len(share) == 5 and (share - 0.2).abs().max() < 0.02  # uniform over the others


def test_next_item_adds_an_auxiliary_loss_in_training_only() -> None:
    pre, ds = tiny_bias_dataset(64)
    model = build_model(
        "shared_bottom",
        pre.schema,
        pre.table_sizes(),
        {"bottom_hidden": [8], "next_item": {"feature": "hist", "weight": 0.5}},
    )
    f = ds.features_at(slice(0, 32))
    out = model.train()(f)
    assert set(out.aux_losses) == {"next_item_hist"} and out.aux_losses["next_item_hist"] > 0
    assert model.eval()(f).aux_losses == {}
    with pytest.raises(ConfigError, match="not a sequence feature"):
        build_model(
            "mmoe", pre.schema, pre.table_sizes(), {**SMALL, "next_item": {"feature": "user"}}
        )


# -- auxiliary tasks stay out of export, serving, fusion and mean/<metric> ------------------------
def test_auxiliary_flag_is_checked_and_keeps_old_fingerprints() -> None:
    s = tiny_bias_schema()
    assert s.primary_task_names == ("click", "watch") and s.task_names[-1] == "domain"
    data = json.loads(s.to_json())
    assert data["tasks"][0]["auxiliary"] is False
    flipped = Schema.from_dict(
        {
            **data,
            "tasks": [{**t, "auxiliary": not t["auxiliary"]} for t in data["tasks"][:1]]
            + data["tasks"][1:],
        }
    )
    assert flipped.fingerprint() != s.fingerprint()
    with pytest.raises(ConfigError, match="every task is auxiliary"):
        Schema.from_dict({**data, "tasks": [{**data["tasks"][2]}]})
    # the default monitor is the first task that is not auxiliary
    first_aux = s.model_copy(update={"tasks": (s.tasks[2], *s.tasks[:2])})
    assert monitor_key(None, first_aux) == ("click", "auc")
    assert monitor_key("domain/auc", s) == ("domain", "auc")


def test_mean_metric_skips_the_auxiliary_tasks() -> None:
    m = {"click": {"auc": 0.7}, "watch": {"mse": 0.1}, "domain": {"auc": 0.2}}
    assert monitored_value(m, ("mean", "auc"), {"domain"}) == 0.7
    assert monitored_value(m, ("mean", "auc")) == pytest.approx(0.45)
    assert monitored_value(m, ("domain", "auc"), {"domain"}) == 0.2  # named: used


@pytest.fixture(scope="module")
def aux_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared-Bottom with an adversarial auxiliary task, selected on mean/auc, two epochs."""
    return options_run(
        tmp_path_factory.mktemp("aux"),
        "shared_bottom",
        options={"adversarial_tasks": {"domain": 1.0}},
        training={"epochs": 2, "monitor": "mean/auc"},
    )


def test_epoch_selection_on_mean_auc_ignores_the_auxiliary_task(aux_run: Path) -> None:
    records = [json.loads(x) for x in (aux_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "monitor" in r]
    assert len(epochs) == 2
    for r in epochs:
        assert "auc" in r["valid"]["domain"]  # trained and measured...
        assert r["monitor"]["value"] == pytest.approx(r["valid"]["click"]["auc"])  # ...not used


def test_auxiliary_task_is_not_exported(aux_run: Path, tmp_path: Path) -> None:
    from mtlrec.export import ExportedModel, export_run

    res = export_run(aux_run, tmp_path / "ts", format="torchscript")
    assert res.outputs == ["click", "watch"]
    man = json.loads((tmp_path / "ts" / "manifest.json").read_text())
    assert man["tasks"] == ["click", "watch"]
    assert [o["name"] for o in man["outputs"]] == ["click", "watch"]
    m = ExportedModel.load(tmp_path / "ts")
    got = m.score_raw(tiny_bias_table(20, seed=4).drop(["click", "watch", "domain"]))
    assert set(got) == {"click", "watch"}
    # the exported graph returns exactly the primary tasks
    module = torch.jit.load(str(tmp_path / "ts" / man["model_file"]))
    from mtlrec.export.graph import features_to_inputs

    loaded = load_run(aux_run)
    ds = loaded.preprocessor.encode(tiny_bias_table(7, seed=4), targets=False)
    outs = module(*features_to_inputs(ds.features_at(slice(0, 7)), loaded.schema))
    assert len(outs) == 2


def test_auxiliary_task_is_not_served(aux_run: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mtlrec.serve import Scorer, create_app

    scorer = Scorer.load(aux_run)
    assert scorer.task_names == ("click", "watch")
    client = TestClient(create_app(scorer))
    rows = tiny_bias_table(6, seed=2).drop(["click", "watch", "domain", "pos", "dev"]).to_pylist()
    for r in rows:
        r["hist"] = [x for x in r["hist"].split("|") if x]
    body = client.post("/score", json={"candidates": rows}).json()
    assert body["tasks"] == ["click", "watch"]
    assert all(set(r["predictions"]) == {"click", "watch"} for r in body["results"])
    meta = client.get("/metadata").json()
    assert [t["name"] for t in meta["tasks"]] == ["click", "watch"]
    r = client.post("/score", json={"candidates": rows, "sort_by": "domain"})
    assert r.status_code == 422


def test_fusion_refuses_the_auxiliary_task(aux_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("mtlrec.fusion")
    from mtlrec.export.common import load_fusion_file
    from mtlrec.fusion import save_fusion
    from mtlrec.fusion.formulas import SumParams, WeightedSum
    from mtlrec.fusion.heldout import run_predictions

    path = tmp_path / "f.json"
    save_fusion(WeightedSum(SumParams(weights={"click": 1.0, "domain": 1.0})), path)
    schema = load_run(aux_run).schema
    with pytest.raises(ConfigError, match="auxiliary tasks \\['domain'\\]"):
        load_fusion_file(path, schema)
    held = run_predictions(aux_run, "valid")
    assert set(held.probs) == {"click", "watch"} and held.binary_tasks == ["click"]
    np.testing.assert_array_equal(held.labels["click"], held.labels["click"])  # present
