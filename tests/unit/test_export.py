"""Export to ONNX / TorchScript: parity with eager PyTorch, dynamic batch, named outputs,
encoders in the folder, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mtlrec.errors import CheckpointError, ConfigError
from mtlrec.registry import MODELS
from mtlrec.testing import tiny_table
from mtlrec.train.run import load_run

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from _serving_runs import make_run

from mtlrec.export import (
    ExportedModel,
    ExportError,
    export_run,
    input_names,
)

CORE = ("mmoe", "shared_bottom", "single_task")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("runs")
    cache: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in cache:
            try:
                cache[model] = make_run(root, model)
            except ConfigError as e:
                pytest.skip(f"{model} cannot be trained on the tiny two-task schema: {e}")
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
    man = json.loads((out / "manifest.json").read_text())
    assert man["format"] == fmt
    assert [o["name"] for o in man["outputs"]] == ["click", "watch"]
    assert [i["name"] for i in man["inputs"]] == ["sparse", "dense", "seq_hist"]
    assert [i["dtype"] for i in man["inputs"]] == ["int32", "float32", "int32"]
    assert man["parity"]["max_abs_diff"] <= 1e-5
    assert (out / "schema.json").read_text() == (run / "schema.json").read_text()
    assert (out / "encoders.json").read_text() == (run / "encoders.json").read_text()
    m = ExportedModel.load(out)
    rows = tiny_table(80, seed=3).drop(["click", "watch"])
    want = _eager_predictions(run, rows)
    for n in (1, 37, 80):  # dynamic batch size
        got = m.score_raw(rows.slice(0, n))
        assert set(got) == {"click", "watch"}
        for task in ("click", "watch"):
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
    pytest.importorskip("mtlrec.fusion")
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
