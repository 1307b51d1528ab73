"""ESM² (Wen et al., SIGIR 2020) and DBMTL (Wang et al., arXiv:1902.09154) on a conversion
funnel, and the funnel generator (``make_funnel_table``, ``mtlrec synth funnel``)."""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from mtlrec.config import ExperimentConfig
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.synthetic import funnel_schema, make_funnel_table
from mtlrec.errors import ConfigError
from mtlrec.losses import MultiTaskLoss
from mtlrec.models import build_model
from mtlrec.models.base import MultiTaskModel
from mtlrec.models.esm2 import ACTION, BUY_AFTER_ACTION, BUY_AFTER_OTHER, log_cvr
from mtlrec.schema import Schema, TaskSpec

ESM2_SMALL: dict[str, Any] = {"tower_hidden": (6,)}
DBMTL_SMALL: dict[str, Any] = {"bottom_hidden": (8,), "tower_hidden": (5,)}


@cache
def funnel(n: int = 256) -> tuple[Preprocessor, ColumnarDataset]:
    table = make_funnel_table(
        n, num_users=30, num_items=40, num_categories=5, click_shift=1.0, buy_shift=1.5
    )
    pre = Preprocessor.fit(funnel_schema(4), table)
    return pre, pre.encode(table)


def build(name: str, schema: Schema | None = None, seed: int = 0, **params: Any) -> MultiTaskModel:
    pre, _ = funnel()
    torch.manual_seed(seed)
    small = ESM2_SMALL if name == "esm2" else DBMTL_SMALL
    return build_model(name, schema or pre.schema, pre.table_sizes(), {**small, **params})


def set_constant_logit(tower: nn.Module, z: float) -> None:
    """Make a tower output the logit ``z`` on every row (its last layer: weight 0, bias z)."""
    last = tower.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(z)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# -- ESM²: the entire-space products -----------------------------------------------------------
def test_esm2_probabilities_multiply_as_the_papers_equations() -> None:
    """y1 = 0.2, y2 = 0.3, y3 = 0.6, y4 = 0.1: pCTAVR = y1 y2 = 0.06, pCVR = y2 y3 +
    (1 - y2) y4 = 0.25, pCTCVR = y1 pCVR = 0.05 (Wen et al., SIGIR 2020)."""
    model = build("esm2").eval()
    for name, p in (("ctr", 0.2), (ACTION, 0.3), (BUY_AFTER_ACTION, 0.6), (BUY_AFTER_OTHER, 0.1)):
        set_constant_logit(model.heads.towers[name], logit(p))
    with torch.no_grad():
        out = model(funnel()[1].features_at(slice(0, 4)))
    pred = out.predictions()
    want = {"ctr": 0.2, "ctavr": 0.06, "cvr": 0.25, "ctcvr": 0.05}
    for task, p in want.items():
        torch.testing.assert_close(pred[task], torch.full((4,), p), atol=1e-6, rtol=0)
    assert set(out.logits) == {"ctr"} and set(out.log_probs) == {"ctavr", "cvr", "ctcvr"}


def test_log_cvr_is_stable_in_log_space() -> None:
    z = torch.tensor([60.0, -60.0, 0.0, -100.0], dtype=torch.float32, requires_grad=True)
    z3 = torch.tensor([-120.0, 30.0, 100.0, -100.0])
    z4 = torch.tensor([-90.0, -70.0, -100.0, 20.0])
    got = log_cvr(z, z3, z4)
    assert torch.isfinite(got).all()

    def log_sigmoid(v: float) -> float:
        return -math.log1p(math.exp(-v)) if v > 0 else v - math.log1p(math.exp(v))

    for i in range(4):
        a, b, c = float(z[i].detach()), float(z3[i]), float(z4[i])
        # log(y2 y3 + (1 - y2) y4) by hand in float64: a log-sum-exp of log-sigmoids
        terms = [log_sigmoid(a) + log_sigmoid(b), log_sigmoid(-a) + log_sigmoid(c)]
        m = max(terms)
        want = m + math.log(sum(math.exp(t - m) for t in terms))
        assert float(got[i]) == pytest.approx(want, rel=1e-5, abs=1e-5), i
    # the naive product underflows where the log-space form does not
    naive = torch.log(torch.sigmoid(z) * torch.sigmoid(z3) + torch.sigmoid(-z) * torch.sigmoid(z4))
    assert not torch.isfinite(naive).all()
    got.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_esm2_loss_trains_every_tower_on_every_impression() -> None:
    """No CVR-only-on-clicks: on a batch of non-clicked impressions alone, the losses of
    pCTR, pCTAVR and pCTCVR give gradient to all four towers; CVR has no loss of its own."""
    pre, ds = funnel()
    model = build("esm2")
    assert model.loss_task_names == ("ctr", "ctavr", "ctcvr")
    clicks = ds.take(slice(0, len(ds))).labels["ctr"]
    idx = torch.nonzero(clicks == 0).flatten()
    assert len(idx) > 20
    batch = ds.take(idx)
    specs = [t for t in pre.schema.tasks if t.name in model.loss_task_names]
    losses = MultiTaskLoss(specs)(model(batch.features), batch)
    total = sum(losses.values())
    for name in ("ctr", ACTION, BUY_AFTER_ACTION, BUY_AFTER_OTHER):
        params = list(model.heads.towers[name].parameters())
        grads = torch.autograd.grad(total, params, retain_graph=True)
        assert any(bool(g.abs().sum() > 0) for g in grads), name
    # the purchase towers learn from the non-clicked rows through pCTCVR alone
    buy = list(model.heads.towers[BUY_AFTER_OTHER].parameters())
    assert any(bool(g.abs().sum() > 0) for g in torch.autograd.grad(losses["ctcvr"], buy))


def test_esm2_without_an_action_label_keeps_the_action_latent() -> None:
    _, ds = funnel()
    schema = funnel_schema(4, action=False)
    model = build("esm2", schema=schema, ctavr_task=None).eval()
    out = model(ds.features_at(slice(0, 3)))
    assert set(out.log_probs) == {"cvr", "ctcvr"}
    assert model.loss_task_names == ("ctr", "ctcvr")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ctavr_task": "nope"}, "ctavr_task is 'nope'.*ctavr_task: null"),
        ({"cvr_task": "ctr"}, "different tasks"),
        ({"fm_tasks": ("cvr",)}, "fm_tasks"),
        ({"wide_tasks": ("ctr",)}, "wide_tasks"),
    ],
)
def test_esm2_roles_are_validated(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build("esm2", **change)


def test_esm2_refuses_masks_on_its_entire_space_tasks() -> None:
    base = funnel_schema(4)
    tasks = tuple(
        TaskSpec(name=t.name, kind="binary", label=t.label, mask="click")
        if t.name == "ctavr"
        else t
        for t in base.tasks
    )
    with pytest.raises(ConfigError, match="entire space"):
        build("esm2", schema=Schema(features=base.features, tasks=tasks))
    bad = Schema(features=base.features, tasks=(TaskSpec(name="ctr", kind="regression"),))
    with pytest.raises(ConfigError, match="no binary task"):
        build("esm2", schema=bad)


# -- DBMTL: the Bayesian network of towers -------------------------------------------------------
def test_dbmtl_logits_depend_on_earlier_towers_only() -> None:
    """Default parents: every earlier task. Perturbing task k's tower changes the logits of k and
    of every later task, never of an earlier one."""
    model = build("dbmtl").eval()
    names = model.task_names
    feats = funnel()[1].features_at(slice(0, 16))
    with torch.no_grad():
        ref = model(feats).logits
        for k, t in enumerate(names):
            body = model.towers.bodies[t].layers[0]
            body.bias.add_(0.5)
            out = model(feats).logits
            body.bias.sub_(0.5)
            changed = [u for u in names if not torch.allclose(out[u], ref[u])]
            assert changed == list(names[k:]), (t, changed)


def test_dbmtl_custom_parents_and_their_validation() -> None:
    model = build("dbmtl", parents={"ctcvr": ["ctr"], "cvr": ["ctcvr"]}).eval()
    assert model.towers.order.index("ctr") < model.towers.order.index("ctcvr")
    assert model.towers.order.index("ctcvr") < model.towers.order.index("cvr")
    feats = funnel()[1].features_at(slice(0, 8))
    with torch.no_grad():
        ref = model(feats).logits
        model.towers.bodies["ctcvr"].layers[0].bias.add_(1.0)
        out = model(feats).logits
    changed = {u for u in model.task_names if not torch.allclose(out[u], ref[u])}
    assert changed == {"ctcvr", "cvr"}
    with pytest.raises(ConfigError, match="cycle"):
        build("dbmtl", parents={"ctr": ["cvr"], "cvr": ["ctr"]})
    with pytest.raises(ConfigError, match="unknown tasks"):
        build("dbmtl", parents={"ctr": ["nope"]})


@pytest.mark.parametrize("detach", [False, True])
def test_dbmtl_child_loss_reaches_its_parents_unless_detached(detach: bool) -> None:
    model = build("dbmtl", detach_parents=detach)
    pre, ds = funnel()
    batch = ds.take(slice(0, len(ds)))
    spec = next(t for t in pre.schema.tasks if t.name == "ctcvr")
    loss = MultiTaskLoss([spec])(model(batch.features), batch)["ctcvr"]
    parent = list(model.towers.bodies["ctr"].parameters())
    grads = torch.autograd.grad(loss, parent, allow_unused=True)
    reached = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    assert reached == (not detach)
    own = {id(p) for p in model.task_parameters("ctr")}
    assert ({id(p) for p in parent} <= own) == detach


# -- export of ESM² on its funnel schema ---------------------------------------------------------
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_esm2_and_dbmtl_export_with_parity(tmp_path: Path, fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    from mtlrec.export import ExportedModel, export_run
    from mtlrec.train.run import load_run, train_run

    table = make_funnel_table(300, num_users=30, num_items=40, click_shift=1.0, buy_shift=1.5)
    pq.write_table(table, tmp_path / "funnel.parquet")
    schema = json.loads(funnel_schema(4).to_json())
    for name, params in (("esm2", ESM2_SMALL), ("dbmtl", DBMTL_SMALL)):
        cfg = ExperimentConfig.from_dict(
            {
                "data": {
                    "train": str(tmp_path / "funnel.parquet"),
                    "split": {"fractions": [0.7, 0.15, 0.15], "seed": 0},
                },
                "schema": schema,
                "model": {"name": name, "params": {k: list(v) for k, v in params.items()}},
                "training": {"epochs": 1, "batch_size": 64, "progress": False, "num_threads": 1},
                "output_dir": str(tmp_path / f"run-{name}"),
            }
        )
        run = train_run(cfg, overwrite=True).path
        res = export_run(run, tmp_path / f"{name}-{fmt}", format=fmt)
        assert res.max_abs_diff <= 1e-5
        assert res.outputs == ["ctr", "ctavr", "cvr", "ctcvr"]
        rows = table.slice(0, 40).drop(["click", "action", "buy"])
        got = ExportedModel.load(tmp_path / f"{name}-{fmt}").score_raw(rows)
        loaded = load_run(run)
        want = loaded.trainer().predict(loaded.preprocessor.encode(rows, targets=False))
        for task in res.outputs:
            np.testing.assert_allclose(got[task], want[task], atol=1e-5, rtol=0)


# -- the funnel generator ------------------------------------------------------------------------
def test_funnel_table_is_a_funnel_with_its_truth() -> None:
    t = make_funnel_table(60_000, seed=3, model_seed=0)
    col = {c: t.column(c).to_numpy() for c in t.column_names}
    click, action, buy = col["click"], col["action"], col["buy"]
    assert ((action <= click) & (buy <= click)).all()
    # the labels follow the truth columns (4 standard errors)
    for label, p, rows in (
        (click, col["true_ctr"], slice(None)),
        (action[click == 1], col["true_action"][click == 1], None),
        (buy[click == 1], col["true_cvr"][click == 1], None),
    ):
        lab, pr = (label, p) if rows is None else (label[rows], p[rows])
        se = math.sqrt(pr.mean() * (1 - pr.mean()) / len(pr))
        assert abs(lab.mean() - pr.mean()) < 4 * se
    assert 0.15 < click.mean() < 0.3 and 0.05 < buy[click == 1].mean() < 0.2
    # the truth is known off the clicks too, and differs there (selection bias)
    assert np.isfinite(col["true_cvr"][click == 0]).all()
    assert abs(col["true_cvr"][click == 0].mean() - col["true_cvr"][click == 1].mean()) > 0.005
    # seeded, prefix-stable, same world for the same model_seed
    again = make_funnel_table(100, seed=3, model_seed=0)
    assert again.equals(t.slice(0, 100).replace_schema_metadata(again.schema.metadata))
    other = make_funnel_table(100, seed=4, model_seed=0)
    assert not np.array_equal(other.column("user").to_numpy(), col["user"][:100])


def test_funnel_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="correlation"):
        make_funnel_table(10, correlation=1.5)
    with pytest.raises(ConfigError, match="zipf_a"):
        make_funnel_table(10, zipf_a=0)


def test_cli_synth_funnel_writes_the_table(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mtlrec.cli import app

    out = tmp_path / "f.parquet"
    res = CliRunner().invoke(app, ["synth", "funnel", "--output", str(out), "--rows", "50"])
    assert res.exit_code == 0, res.output
    t = pq.read_table(out)
    assert t.num_rows == 50 and "true_cvr" in t.column_names
