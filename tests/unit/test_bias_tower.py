"""The selection-bias tower (Zhao et al., RecSys 2019): bias features stay out of the main
model, the tower's logit is added in training only (or a constant outside it), feature
drop-out, and scoring without the bias features (prediction, export, serving); the synthetic
position-bias click log."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _option_runs import options_run
from typer.testing import CliRunner

from mtlrec.batch import FIRST_ID, OOV_ID, Features
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.synthetic import make_position_bias_table, position_bias_schema
from mtlrec.errors import ConfigError, DataError
from mtlrec.models import build_model
from mtlrec.nn.bias import BiasTower, MainFeatures, split_bias
from mtlrec.nn.embedding import FeatureLayout, FieldSpec
from mtlrec.schema import Schema, SparseFeature, TaskSpec
from mtlrec.testing import (
    tiny_bias_dataset,
    tiny_bias_schema,
    tiny_bias_table,
    tiny_dataset,
    tiny_schema,
)
from mtlrec.train.run import load_run

SMALL = {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}
TOWER = {"tasks": ["click"], "hidden": [4], "dropout": 0.0}


def _model(params: dict | None = None, seed: int = 0):
    pre, ds = tiny_bias_dataset(64)
    torch.manual_seed(seed)
    return pre, ds, build_model("mmoe", pre.schema, pre.table_sizes(), {**SMALL, **(params or {})})


def _without_bias(f: Features) -> Features:
    """The same rows with the bias columns (pos, dev) taken out."""
    return Features(f.sparse[:, :2], f.dense[:, :1], f.sequences, f.sparse_names[:2], ("price",))


# -- schema ------------------------------------------------------------------------------------
def test_bias_role_is_checked_and_keeps_old_fingerprints() -> None:
    s = tiny_bias_schema()
    assert Schema.from_json(s.to_json()) == s
    assert [f.name for f in s.bias_features] == ["pos", "dev"]
    assert s.scoring_columns() == ["user", "item", "price", "hist"]
    assert s.input_columns() == ["user", "item", "price", "hist", "pos", "dev"]
    # a field left at its default does not enter the fingerprint; set, it does
    base = tiny_schema()
    same = Schema.from_dict(
        {
            **json.loads(base.to_json()),
            "features": [{**f, "role": "input"} for f in json.loads(base.to_json())["features"]],
        }
    )
    assert same.fingerprint() == base.fingerprint() == "e1634a27007a8190"
    flagged = base.model_copy(
        update={
            "features": (
                *base.features[:2],
                base.features[2].model_copy(update={"role": "bias"}),
                base.features[3],
            )
        }
    )
    assert flagged.fingerprint() != base.fingerprint()
    with pytest.raises(ConfigError, match="table 'item' is read by a bias feature"):
        Schema.from_dict(
            {
                "features": [
                    {"type": "sparse", "name": "item"},
                    {"type": "sparse", "name": "shown", "table": "item", "role": "bias"},
                ],
                "tasks": [{"name": "click", "kind": "binary"}],
            }
        )
    with pytest.raises(ConfigError, match="every feature has role 'bias'"):
        Schema.from_dict(
            {
                "features": [{"type": "sparse", "name": "pos", "role": "bias"}],
                "tasks": [{"name": "click", "kind": "binary"}],
            }
        )


def test_layout_leaves_the_bias_features_out_of_the_main_input() -> None:
    pre, _ = tiny_bias_dataset(64)
    lay = FeatureLayout.from_schema(pre.schema, pre.table_sizes())
    plain = FeatureLayout.from_schema(tiny_schema(), tiny_dataset(64)[0].table_sizes())
    assert [f.name for f in lay.sparse] == ["user", "item"] and lay.dense == ("price",)
    assert "pos" not in lay.table_sizes
    assert lay.bias is not None
    assert [f.name for f in lay.bias.sparse] == ["pos"] and lay.bias.dense == ("dev",)
    assert lay.bias.table_sizes == {"pos": 5 + FIRST_ID}
    assert lay.flat_dim == plain.flat_dim
    assert {"pos", "dev"} <= lay.bias.direct


def test_split_bias_by_name() -> None:
    _, ds = tiny_bias_dataset(16)
    f = ds.features_at(slice(0, 5))
    lay = FeatureLayout.from_schema(ds.schema, tiny_bias_dataset(16)[0].table_sizes()).bias
    assert lay is not None
    m = split_bias(f, lay)
    assert isinstance(m, MainFeatures) and m.sparse_names == ("user", "item")
    assert torch.equal(m.sparse, f.sparse[:, :2]) and torch.equal(m.dense, f.dense[:, :1])
    assert m.bias is not None and torch.equal(m.bias.sparse, f.sparse[:, 2:])
    assert torch.equal(m.bias.dense, f.dense[:, 1:])
    assert split_bias(m, lay) is m
    none = split_bias(_without_bias(f), lay)
    assert none.bias is None and torch.equal(none.sparse, f.sparse[:, :2])
    partial = Features(f.sparse, f.dense[:, :1], f.sequences, f.sparse_names, ("price",))
    with pytest.raises(ValueError, match="some bias features"):
        split_bias(partial, lay)


# -- the model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tower", [None, TOWER])
def test_scores_never_depend_on_the_bias_features(tower: dict | None) -> None:
    _, ds, model = _model({"bias_tower": tower} if tower else {})
    f = ds.features_at(slice(0, 20))
    other = Features(
        torch.cat([f.sparse[:, :2], (f.sparse[:, 2:] + 1) % 7], 1),
        torch.cat([f.dense[:, :1], f.dense[:, 1:] + 3.0], 1),
        f.sequences,
        f.sparse_names,
        f.dense_names,
    )
    model.eval()
    with torch.no_grad():
        a, b, c = model(f), model(other), model(_without_bias(f))
    for t in ("click", "watch", "domain"):
        assert torch.equal(a.logits[t], b.logits[t]) and torch.equal(a.logits[t], c.logits[t])


def test_training_adds_the_tower_logit_to_the_chosen_tasks_only() -> None:
    _, ds, model = _model({"bias_tower": {**TOWER, "serve_as": "drop"}})
    f = ds.features_at(slice(0, 20))
    with torch.no_grad():
        train = model.train()(f)
        served = model.eval()(f)
        lay = model.layout.bias
        z = model.bias_tower.logits(split_bias(f, lay).bias)[:, 0]  # [B]
    torch.testing.assert_close(train.logits["click"], served.logits["click"] + z)
    assert torch.equal(train.logits["watch"], served.logits["watch"])
    assert not torch.equal(train.logits["click"], served.logits["click"])


@pytest.mark.parametrize(
    ("serve_as", "ids", "dev"), [("missing", [OOV_ID], 0.0), ({"pos": 3, "dev": 1.5}, [3 + 2], 1.5)]
)
def test_serving_adds_the_tower_at_the_configured_values(serve_as, ids, dev) -> None:
    _, ds, drop = _model({"bias_tower": {**TOWER, "serve_as": "drop"}}, seed=4)
    _, _, fixed = _model({"bias_tower": {**TOWER, "serve_as": serve_as}}, seed=4)
    f = ds.features_at(slice(0, 20))
    with torch.no_grad():
        a, b = drop.eval()(f), fixed.eval()(f)
        row = Features(
            torch.tensor([ids], dtype=torch.int32),
            torch.tensor([[dev]]),
            sparse_names=("pos",),
            dense_names=("dev",),
        )
        c = fixed.bias_tower.logits(row)[0, 0]
    torch.testing.assert_close(b.logits["click"] - a.logits["click"], c.expand(20))
    assert torch.equal(b.logits["watch"], a.logits["watch"])


def test_bias_tower_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="no feature with role: bias"):
        pre, _ = tiny_dataset(32)
        build_model("mmoe", pre.schema, pre.table_sizes(), {**SMALL, "bias_tower": TOWER})
    for bad, msg in (
        ({"tasks": ["nope"]}, "not a binary or regression task"),
        ({"tasks": ["click"], "features": ["user"]}, "not role: bias features"),
        ({"tasks": ["click"], "serve_as": {"pos": 5}}, r"not an id in \[0, 5\)"),
        ({"tasks": ["click"], "serve_as": {"hist": 1}}, "not sparse or dense bias features"),
    ):
        with pytest.raises(ConfigError, match=msg):
            _model({"bias_tower": bad})
    # a categorical bias feature with a fitted vocabulary has no encoder-free value
    schema = Schema(
        features=(SparseFeature(name="item"), SparseFeature(name="pos", role="bias")),
        tasks=(TaskSpec(name="click", kind="binary"),),
    )
    with pytest.raises(ConfigError, match="only pre-indexed ids"):
        build_model(
            "shared_bottom",
            schema,
            {"item": 5, "pos": 5},
            {"bias_tower": {"tasks": ["click"], "serve_as": {"pos": 1}}},
        )


def test_training_needs_the_bias_features() -> None:
    _, ds, model = _model({"bias_tower": TOWER})
    with pytest.raises(ValueError, match="needs the bias features"):
        model.train()(_without_bias(ds.features_at(slice(0, 4))))
    f = ds.features_at(slice(0, 4))
    unnamed = Features(f.sparse, f.dense, f.sequences)  # the bias columns cannot be found
    with pytest.raises(ValueError, match="give Features their column names"):
        model.eval()(unnamed)


def test_feature_dropout_sets_features_missing_at_the_rate() -> None:
    lay = FeatureLayout((FieldSpec("pos", "pos", 2),), (), ("dev",), {"pos": 12}, {"pos": 2})
    tower = BiasTower(lay, ["click"], feature_dropout=0.3)
    n = 20_000
    f = Features(
        torch.full((n, 1), 5, dtype=torch.int32),
        torch.ones(n, 1),
        sparse_names=("pos",),
        dense_names=("dev",),
    )
    torch.manual_seed(0)
    d = tower.drop_features(f)
    assert set(d.sparse.unique().tolist()) == {OOV_ID, 5}
    assert abs(float((d.sparse == OOV_ID).float().mean()) - 0.3) < 0.02
    assert abs(float((d.dense == 0).float().mean()) - 0.3) < 0.02
    # independent per feature
    both = ((d.sparse[:, 0] == OOV_ID) & (d.dense[:, 0] == 0)).float().mean()
    assert abs(float(both) - 0.09) < 0.015
    assert torch.equal(
        BiasTower(lay, ["click"], feature_dropout=0.0).drop_features(f).sparse, f.sparse
    )


# -- encoding, export, serving, predict without the bias features --------------------------------
def test_encoding_without_the_bias_columns_reads_them_as_missing() -> None:
    pre, _ = tiny_bias_dataset(64)
    rows = tiny_bias_table(10, seed=3)
    full = pre.encode(rows)
    bare = pre.encode(rows.drop(["pos", "dev", "click", "watch", "domain"]))
    assert torch.equal(bare.sparse[:, :2], full.sparse[:, :2])
    assert (bare.sparse[:, 2] == OOV_ID).all() and (bare.dense[:, 1] == 0).all()
    with pytest.raises(DataError, match="pos"):  # fitting (training) needs them
        Preprocessor.fit(tiny_bias_schema(), rows.drop(["pos"]))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return options_run(tmp_path_factory.mktemp("bias"), "mmoe")


def _rows(n: int = 40, seed: int = 5) -> pa.Table:
    return tiny_bias_table(n, seed=seed).drop(["click", "watch", "domain"])


def _eager(run: Path, table: pa.Table) -> dict[str, np.ndarray]:
    loaded = load_run(run)
    return loaded.trainer().predict(loaded.preprocessor.encode(table, targets=False))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_has_no_bias_input_and_matches_eager(run: Path, tmp_path: Path, fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    from mtlrec.export import ExportedModel, export_run

    export_run(run, tmp_path / fmt, format=fmt)
    man = json.loads((tmp_path / fmt / "manifest.json").read_text())
    assert [(i["name"], i["shape"]) for i in man["inputs"]] == [
        ("sparse", ["batch", 2]),
        ("dense", ["batch", 1]),
        ("seq_hist", ["batch", 5]),
    ]
    assert [o["name"] for o in man["outputs"]] == ["click", "watch"]  # not the auxiliary task
    m = ExportedModel.load(tmp_path / fmt)
    rows = _rows()
    want = _eager(run, rows)  # with the positions
    got = m.score_raw(rows.drop(["pos", "dev"]))  # without them
    assert set(got) == {"click", "watch"}
    for t in ("click", "watch"):
        np.testing.assert_allclose(got[t], want[t], atol=1e-5, rtol=0)


def test_service_scores_without_the_bias_features(run: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mtlrec.serve import Scorer, create_app

    client = TestClient(create_app(Scorer.load(run)))
    rows = _rows(12).drop(["pos", "dev"]).to_pylist()
    for r in rows:
        r["hist"] = [x for x in r["hist"].split("|") if x]
    resp = client.post("/score", json={"candidates": rows})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["tasks"] == ["click", "watch"]
    want = _eager(run, _rows(12))
    got = [r["predictions"]["click"] for r in body["results"]]
    np.testing.assert_allclose(got, want["click"], atol=1e-5, rtol=0)
    assert all(set(r["predictions"]) == {"click", "watch"} for r in body["results"])
    bad = client.post("/score", json={"candidates": [{**rows[0], "pos": 1}]})
    assert bad.status_code == 422 and "pos" in bad.text


def test_predict_cli_without_the_bias_columns(run: Path, tmp_path: Path) -> None:
    from mtlrec.cli import app

    src = tmp_path / "score.parquet"
    pq.write_table(_rows().drop(["pos", "dev"]), src)
    out = tmp_path / "pred.parquet"
    res = CliRunner().invoke(app, ["predict", str(run), "--input", str(src), "--output", str(out)])
    assert res.exit_code == 0, res.output
    table = pq.read_table(out)
    assert table.column_names == ["click", "watch"]
    np.testing.assert_allclose(
        table.column("click").to_numpy(), _eager(run, _rows())["click"], atol=1e-6, rtol=0
    )


# -- the synthetic position-bias log -------------------------------------------------------------
def test_position_bias_table() -> None:
    t = make_position_bias_table(20_000, positions=8, seed=2)
    assert t.equals(make_position_bias_table(20_000, positions=8, seed=2))
    head = make_position_bias_table(333, positions=8, seed=2)
    assert head.drop(["true_ctr"]).equals(
        t.slice(0, 333).drop(["true_ctr"]).replace_schema_metadata(head.schema.metadata)
    )
    pos = t.column("position").to_numpy()
    click, true = t.column("click").to_numpy(), t.column("true_ctr").to_numpy()
    req = t.column("request").to_numpy()
    assert sorted(np.bincount(pos)) == [2500] * 8  # every request fills the 8 positions
    assert (np.bincount(req) == 8).all()
    ctr = [click[pos == k].mean() for k in range(8)]
    assert all(a > b for a, b in itertools.pairwise(ctr))  # clicks fall with position
    assert true[pos == 0].mean() > true[pos == 7].mean() + 0.1  # the logging ranker is informed
    assert abs(t.column("relevant").to_numpy().mean() - true.mean()) < 0.01
    s = position_bias_schema(positions=8)
    assert [f.name for f in s.bias_features] == ["position", "device"]
    assert not position_bias_schema(positions=8, position_role="input").bias_features
    Preprocessor.fit(s, t.slice(0, 500))  # the schema reads the table


def test_cli_synth_ctr_position_bias(tmp_path: Path) -> None:
    from mtlrec.cli import app

    out = tmp_path / "pb.parquet"
    res = CliRunner().invoke(
        app,
        [
            "synth",
            "ctr",
            "--output",
            str(out),
            "--rows",
            "100",
            "--position-bias",
            "--positions",
            "5",
        ],
    )
    assert res.exit_code == 0, res.output
    t = pq.read_table(out)
    assert t.num_rows == 100 and {"position", "true_ctr", "relevant", "click"} <= set(
        t.column_names
    )
    assert set(t.column("position").to_pylist()) == set(range(5))


def test_the_tower_learns_the_position_effect() -> None:
    from mtlrec.config import TrainingConfig
    from mtlrec.train.trainer import Trainer

    table = make_position_bias_table(6000, positions=6, num_users=50, num_items=100, seed=0)
    schema = position_bias_schema(positions=6, embedding_dim=4)
    pre = Preprocessor.fit(schema, table)
    ds = pre.encode(table)
    torch.manual_seed(0)
    model = build_model(
        "shared_bottom",
        schema,
        pre.table_sizes(),
        {
            "bottom_hidden": [16],
            "tower_hidden": [8],
            "bias_tower": {"tasks": ["click"], "features": ["position"], "hidden": []},
        },
    )
    cfg = TrainingConfig(
        epochs=3, batch_size=256, optimizer={"lr": 0.02}, progress=False, num_threads=1
    )
    Trainer(model, schema, config=cfg).fit(ds)
    tower = model.bias_tower
    ids = torch.arange(6, dtype=torch.int32).unsqueeze(1) + FIRST_ID
    with torch.no_grad():
        z = tower.logits(Features(ids, torch.zeros(6, 0), sparse_names=("position",)))[:, 0]
    # the generator's effect: -log2(1 + position), from 0 down to -2.58
    assert (z[:-1] > z[1:]).all(), z
    assert float(z[0] - z[-1]) > 1.5, z
