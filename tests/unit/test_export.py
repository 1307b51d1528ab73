"""Export to ONNX / TorchScript: parity with eager PyTorch, dynamic batch, named outputs,
encoders in the folder, clear errors.

Every registered model is exported in both formats; a model that fails to build, train or
validate on the tiny data fails its test (it is never skipped). ESMM, which needs a click ->
conversion funnel, is exported from a run on :func:`funnel_run`'s schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mtlrec.config import ExperimentConfig
from mtlrec.errors import CheckpointError, ConfigError
from mtlrec.registry import MODELS
from mtlrec.testing import tiny_table
from mtlrec.train.run import load_run, train_run

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from _serving_runs import FEATURES, make_run, small_params

from mtlrec.export import (
    ExportedModel,
    ExportError,
    export_run,
    input_names,
)

CORE = ("mmoe", "shared_bottom", "single_task")
# models that need a click -> conversion funnel (ctr, cvr masked by click, ctcvr)
FUNNEL_MODELS = ("esmm", "esm2")
# ESM² on this funnel: it has no post-click action label, so the action stays latent
FUNNEL_PARAMS: dict[str, dict[str, Any]] = {"esm2": {"ctavr_task": None}}
FUNNEL_TASKS: list[dict[str, Any]] = [
    {"name": "ctr", "kind": "binary", "label": "click"},
    {"name": "cvr", "kind": "binary", "label": "buy", "mask": "click"},
    {"name": "ctcvr", "kind": "binary", "label": "buy"},
]
LABELS = ("click", "watch", "buy")


def funnel_table(n: int, seed: int = 0) -> pa.Table:
    """:func:`tiny_table` rows with a conversion label ``buy`` (1 only on clicked rows)."""
    table = tiny_table(n, seed=seed)
    rng = np.random.default_rng(seed + 1)
    click = table.column("click").to_numpy()
    buy = click * (rng.random(n) < 0.4).astype(np.int64)
    return table.append_column("buy", pa.array(buy))


def funnel_run(folder: Path, model: str, rows: int = 300) -> Path:
    """Train ``model`` for one epoch on the funnel schema (the tiny features; tasks ctr, cvr,
    ctcvr); returns the run folder. Errors propagate: a model that cannot be built fails."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "funnel.parquet"
    if not data.is_file():
        pq.write_table(funnel_table(rows), data)
    cfg = ExperimentConfig.from_dict(
        {
            "data": {"train": str(data), "split": {"fractions": [0.7, 0.15, 0.15], "seed": 0}},
            "schema": {"features": FEATURES, "tasks": FUNNEL_TASKS},
            "model": {"name": model, "params": small_params(model) | FUNNEL_PARAMS.get(model, {})},
            "training": {
                "epochs": 1,
                "batch_size": 64,
                "optimizer": {"lr": 0.01},
                "progress": False,
                "num_threads": 1,
            },
            "output_dir": str(folder / f"run-{model}"),
        }
    )
    return train_run(cfg, overwrite=True).path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """``runs(model)``: a trained run folder of ``model`` (built once per module). A model that
    cannot be built or trained raises here, so its tests fail rather than skip."""
    root = tmp_path_factory.mktemp("runs")
    cache: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in cache:
            make = funnel_run if model in FUNNEL_MODELS else make_run
            cache[model] = make(root, model)
        return cache[model]

    return get


@pytest.fixture(scope="module")
def mmoe_onnx(runs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "mmoe-onnx"
    export_run(runs("mmoe"), out, format="onnx")
    return out


@pytest.fixture(scope="module")
def mmoe_ts(runs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "mmoe-ts"
    export_run(runs("mmoe"), out, format="torchscript")
    return out


def _eager_predictions(run: Path, rows) -> dict[str, np.ndarray]:
    loaded = load_run(run)
    ds = loaded.preprocessor.encode(rows, targets=False)
    return loaded.trainer().predict(ds)


def _check_export(run: Path, out: Path, fmt: str) -> None:
    tasks = [t.name for t in load_run(run).schema.tasks]
    funnel = run.name.removeprefix("run-") in FUNNEL_MODELS
    assert tasks == (["ctr", "cvr", "ctcvr"] if funnel else ["click", "watch"])
    man = json.loads((out / "manifest.json").read_text())
    assert man["format"] == fmt
    assert [o["name"] for o in man["outputs"]] == tasks
    assert [i["name"] for i in man["inputs"]] == ["sparse", "dense", "seq_hist"]
    assert [i["dtype"] for i in man["inputs"]] == ["int32", "float32", "int32"]
    assert man["parity"]["max_abs_diff"] <= 1e-5
    assert (out / "schema.json").read_text() == (run / "schema.json").read_text()
    assert (out / "encoders.json").read_text() == (run / "encoders.json").read_text()
    m = ExportedModel.load(out)
    rows = funnel_table(80, seed=3).drop(list(LABELS))
    want = _eager_predictions(run, rows)
    assert set(want) == set(tasks)
    for n in (1, 37, 80):  # dynamic batch size
        got = m.score_raw(rows.slice(0, n))
        assert set(got) == set(tasks)
        for task in tasks:
            assert got[task].shape == (n,)
            np.testing.assert_allclose(got[task], want[task][:n], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_onnx_mmoe_parity_named_outputs_dynamic_batch(runs, mmoe_onnx: Path) -> None:
    _check_export(runs("mmoe"), mmoe_onnx, "onnx")


@pytest.mark.slow
def test_score_raw_accepts_dict_rows_and_counts_unknown(mmoe_onnx: Path) -> None:
    m = ExportedModel.load(mmoe_onnx)
    rows = tiny_table(5, seed=4).drop(["click", "watch"]).to_pylist()
    rows[0]["item"] = "never-seen"
    got = m.score_raw(rows)
    assert got["click"].shape == (5,)
    assert np.all((got["click"] > 0) & (got["click"] < 1))
    assert m.last_unknown["item"] == 1
    want = m.score_raw(tiny_table(5, seed=4).drop(["click", "watch"]))
    np.testing.assert_allclose(got["click"][1:], want["click"][1:], atol=1e-7)


@pytest.mark.parametrize("model", CORE)
def test_torchscript_parity_core(runs, model: str, tmp_path: Path) -> None:
    run = runs(model)
    res = export_run(run, tmp_path / "ts", format="torchscript")
    assert res.max_abs_diff <= 1e-5
    _check_export(run, tmp_path / "ts", "torchscript")


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(set(MODELS.names()) - set(CORE)))
def test_torchscript_parity_every_model(runs, model: str, tmp_path: Path) -> None:
    run = runs(model)
    export_run(run, tmp_path / "ts", format="torchscript")
    _check_export(run, tmp_path / "ts", "torchscript")


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(set(MODELS.names()) - {"mmoe"}))
def test_onnx_parity_every_model(runs, model: str, tmp_path: Path) -> None:
    run = runs(model)
    export_run(run, tmp_path / "onnx", format="onnx")
    _check_export(run, tmp_path / "onnx", "onnx")


def test_parity_failure_leaves_no_manifest(runs, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    with pytest.raises(ExportError, match="differs from the eager model"):
        export_run(runs("mmoe"), out, format="torchscript", tolerance=-1.0)
    assert not (out / "manifest.json").exists()
    with pytest.raises(CheckpointError, match=r"no manifest\.json"):
        ExportedModel.load(out)


def test_bad_run_folder_and_format(runs, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not an mtlrec run folder"):
        export_run(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(ConfigError, match="--format 'pb'"):
        export_run(runs("mmoe"), tmp_path / "out", format="pb")


def test_corrupt_manifest_is_a_clear_error(mmoe_ts: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(mmoe_ts, copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest\.json: not valid JSON"):
        ExportedModel.load(copy)
    man = json.loads((mmoe_ts / "manifest.json").read_text())
    man["export_format"] = 99
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="export format 99"):
        ExportedModel.load(copy)


def test_input_names_follow_the_schema(runs) -> None:
    schema = load_run(runs("mmoe")).schema
    assert input_names(schema) == ["sparse", "dense", "seq_hist"]
    assert input_names(schema.model_copy(update={"features": schema.features[2:3]})) == ["dense"]


def test_fusion_adds_a_score(runs, tmp_path: Path) -> None:
    fusion = tmp_path / "fusion.json"
    fusion.write_text(
        json.dumps(
            {
                "format": 1,
                "kind": "weighted_sum",
                "tasks": ["click", "watch"],
                "params": {"weights": {"click": 1.0, "watch": 0.5}},
            }
        )
    )
    res = export_run(runs("mmoe"), tmp_path / "f", format="torchscript", fusion=fusion)
    assert res.outputs == ["click", "watch", "score"]
    m = ExportedModel.load(tmp_path / "f")
    got = m.score_raw(tiny_table(10, seed=5).drop(["click", "watch"]))
    np.testing.assert_allclose(got["score"], got["click"] + 0.5 * got["watch"], rtol=1e-6)
    bad = tmp_path / "bad.json"
    bad.write_text(fusion.read_text().replace('"watch"', '"buy"'))
    with pytest.raises(ConfigError, match="buy"):
        export_run(runs("mmoe"), tmp_path / "g", format="torchscript", fusion=bad)


def test_cli_export_prints_parity_and_fails_clearly(runs, tmp_path: Path) -> None:
    from mtlrec.cli import app

    r = CliRunner().invoke(
        app, ["export", str(runs("mmoe")), "--format", "torchscript", "--output", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    assert "max abs difference" in r.output
    r = CliRunner().invoke(app, ["export", str(tmp_path / "missing")])
    assert r.exit_code == 2
    assert "not an mtlrec run folder" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_esmm_export_keeps_the_funnel(runs, tmp_path: Path, fmt: str) -> None:
    """The exported ESMM answers pCTR, pCVR and pCTCVR = pCTR x pCVR, as the eager model."""
    run = runs("esmm")
    res = export_run(run, tmp_path / fmt, format=fmt)
    assert res.outputs == ["ctr", "cvr", "ctcvr"]
    m = ExportedModel.load(tmp_path / fmt)
    rows = funnel_table(50, seed=7).drop(list(LABELS))
    got = m.score_raw(rows)
    np.testing.assert_allclose(got["ctcvr"], got["ctr"] * got["cvr"], rtol=1e-5, atol=1e-7)
    want = _eager_predictions(run, rows)
    for task in ("ctr", "cvr", "ctcvr"):
        assert np.all((got[task] > 0) & (got[task] < 1))
        np.testing.assert_allclose(got[task], want[task], atol=1e-5, rtol=0)


# -- options any model takes (bias tower, adversarial auxiliary task, next-item loss) -----------
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("model", ["ple", "dbmtl"])
def test_export_parity_with_the_model_options(tmp_path: Path, model: str, fmt: str) -> None:
    """A run with every model option exports with parity: no bias input (the rows are scored
    without ``pos`` / ``dev``), no output for the auxiliary ``domain`` task."""
    from _option_runs import OPTIONS, options_run

    from mtlrec.testing import tiny_bias_table

    if model not in MODELS:
        pytest.skip(f"{model} is not registered")
    run = options_run(tmp_path / "runs", model, options={**OPTIONS, "activation": "gelu"})
    res = export_run(run, tmp_path / fmt, format=fmt)
    assert res.outputs == ["click", "watch"] and res.max_abs_diff <= 1e-5
    m = ExportedModel.load(tmp_path / fmt)
    assert m.inputs == ["sparse", "dense", "seq_hist"]
    rows = tiny_bias_table(60, seed=9).drop(["click", "watch", "domain"])
    want = _eager_predictions(run, rows)
    for n in (1, 60):
        got = m.score_raw(rows.slice(0, n).drop(["pos", "dev"]))
        assert set(got) == {"click", "watch"}
        for task in ("click", "watch"):
            np.testing.assert_allclose(got[task], want[task][:n], atol=1e-5, rtol=0)
