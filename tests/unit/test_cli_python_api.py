"""What a new user meets first (issue 13): ``mtlrec list NAME``, predictions by task name,
a resume refusal that names the differing keys and the way out, a run folder that is the same
run wherever it is moved, and switching model from Python as ``--set model.name`` does."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import pyarrow.csv as pcsv
import pytest
import torch
import yaml
from typer.testing import CliRunner

from mtlrec.cli import app
from mtlrec.config import ConfigWarning, ExperimentConfig
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.registry import MODELS
from mtlrec.testing import tiny_dataset, tiny_schema, tiny_table
from mtlrec.train.run import config_differences, same_config, train_run

runner = CliRunner()


# -- mtlrec list [NAME] ------------------------------------------------------------------------
def test_list_of_a_model_prints_its_parameters_with_types_defaults_and_help() -> None:
    res = runner.invoke(app, ["list", "mmoe"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "model mmoe" in res.output
    for name in MODELS.param_names("mmoe"):
        assert f"│ {name} " in res.output, name
    assert "│ num_experts" in res.output and "int (>= 1)" in res.output
    assert "hidden widths of towers" in res.output and "[64]" in res.output


@pytest.mark.parametrize(("name", "kind"), [("gradnorm", "balancing strategy"), ("rank", "fusion")])
def test_list_of_a_strategy_or_fusion(name: str, kind: str) -> None:
    res = runner.invoke(app, ["list", name], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert f"{kind} {name}" in res.output
    assert "parameter" in res.output or "takes no parameters" in res.output


def test_list_of_an_unknown_name_suggests_the_closest() -> None:
    res = runner.invoke(app, ["list", "mmoee"])
    assert res.exit_code == 2, res.output
    assert "did you mean 'mmoe'?" in res.output


def test_list_without_a_name_still_lists_everything() -> None:
    res = runner.invoke(app, ["list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for name in ("mmoe", "ple", "static", "gradnorm", "weighted_sum"):
        assert f"│ {name} " in res.output, name


# -- predictions by task name ------------------------------------------------------------------
def test_predictions_by_name_equal_predictions_by_task_spec() -> None:
    pre, ds = tiny_dataset(40)
    torch.manual_seed(0)
    model = build_model("mmoe", pre.schema, pre.table_sizes(), {"num_experts": 2}).eval()
    with torch.no_grad():
        out = model(ds.features_at(slice(0, 8)))
    by_spec = out.predictions(pre.schema.tasks)
    for got in (out.predictions(["click", "watch"]), out.predictions(), out.probabilities()):
        assert set(got) == {"click", "watch"}
        for t in got:
            torch.testing.assert_close(got[t], by_spec[t])
    assert set(out.predictions(["watch"])) == {"watch"}
    with pytest.raises(KeyError, match="nope"):
        out.predictions(["nope"])


def test_model_predict_proba_per_task_name() -> None:
    pre, ds = tiny_dataset(40)
    model = build_model("mmoe", pre.schema, pre.table_sizes(), {"num_experts": 2})
    model.train()
    p = model.predict_proba(ds.features_at(slice(0, 8)))
    assert set(p) == {"click", "watch"} and p["click"].shape == (8,)
    assert ((p["click"] > 0) & (p["click"] < 1)).all()
    assert not p["click"].requires_grad
    assert model.training  # left as it was
    assert set(model.predict_proba(ds.features_at(slice(0, 8)), ["click"])) == {"click"}


# -- run folders: the same run wherever they are; a refusal that says what differs -----------
def _config(folder: Path, **training: Any) -> ExperimentConfig:
    csv = folder / "rows.csv"
    if not csv.exists():
        folder.mkdir(parents=True, exist_ok=True)
        pcsv.write_csv(tiny_table(300, seed=3), csv)
    return ExperimentConfig.from_dict(
        {
            "data": {"train": "rows.csv", "split": {"fractions": [0.6, 0.2, 0.2], "seed": 1}},
            "schema": tiny_schema().model_dump(mode="json"),
            "model": {"name": "shared_bottom", "params": {"bottom_hidden": [8]}},
            "training": {"epochs": 1, "batch_size": 64, "progress": False, **training},
            "output_dir": "runs/a",
        },
        base_dir=str(folder),
    )


def test_differences_are_dotted_keys_with_old_and_new_values(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    saved = yaml.safe_load(cfg.to_yaml(with_base_dir=True))
    other = _config(tmp_path, optimizer={"lr": 0.5}, batch_size=32)
    diffs = config_differences(saved, other)
    assert ("training.batch_size", 64, 32) in diffs
    assert ("training.optimizer.lr", 0.001, 0.5) in diffs
    assert len(diffs) == 2
    # where the run lives and settings a resume may change are no differences
    moved = cfg.model_copy(update={"output_dir": "elsewhere/b"})
    assert same_config(saved, moved)
    assert same_config(saved, _config(tmp_path, epochs=5))


def test_a_data_path_written_otherwise_for_the_same_file_is_the_same_run(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    saved = yaml.safe_load(cfg.to_yaml(with_base_dir=True))
    (tmp_path / "sub").mkdir()
    data = yaml.safe_load(cfg.to_yaml())
    data["data"]["train"] = "../rows.csv"
    from_sub = ExperimentConfig.from_dict(data, base_dir=str(tmp_path / "sub"))
    assert same_config(saved, from_sub)
    data["data"]["train"] = "other.csv"
    assert config_differences(saved, ExperimentConfig.from_dict(data, base_dir=str(tmp_path)))


def test_resume_refusal_names_the_keys_and_the_way_out(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "run"
    train_run(cfg, output_dir=out)
    with pytest.raises(ConfigError) as e:
        train_run(_config(tmp_path, optimizer={"lr": 0.5}, seed=3), output_dir=out)
    msg = str(e.value)
    assert "another config" in msg and str(out) in msg
    assert "training.optimizer.lr: 0.001 -> 0.5" in msg and "training.seed: 0 -> 3" in msg
    assert "--overwrite" in msg and "another output folder" in msg


def test_refusal_shows_a_few_differences_and_counts_the_rest(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    saved = yaml.safe_load(cfg.to_yaml(with_base_dir=True))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    other = _config(tmp_path, optimizer={"lr": 0.5, "eps": 0.1}, seed=3, batch_size=8, grad_clip=1)
    from mtlrec.train.run import _check_same_run

    with pytest.raises(ConfigError, match=r"; and 1 more\)") as e:
        _check_same_run(tmp_path / "run", other)
    assert str(e.value).count(" -> ") == 4


def test_a_copied_run_folder_resumes_from_its_own_config_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proj = tmp_path / "proj"
    cfg = _config(proj)
    first = train_run(cfg, output_dir=proj / "runs" / "a")
    moved = shutil.copytree(proj / "runs" / "a", tmp_path / "elsewhere" / "b")
    monkeypatch.chdir(tmp_path / "elsewhere")  # another working directory
    saved = ExperimentConfig.load(moved / "config.yaml")  # its data path is relative
    again = train_run(saved, output_dir=moved)  # resumed: nothing left to train
    assert again.fit.epochs_run == 1 and again.test_metrics == first.test_metrics
    again = train_run(cfg.model_copy(update={"output_dir": str(moved)}))  # output_dir moved
    assert again.test_metrics == first.test_metrics


# -- switching model from Python ----------------------------------------------------------------
def test_switching_model_from_python_trains_as_the_cli_would(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    data = yaml.safe_load(cfg.to_yaml())
    data["model"] = {"name": "mmoe", "params": {"num_experts": 2, "tower_hidden": [4]}}
    mmoe = ExperimentConfig.from_dict(data, base_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"model 'ple' has no parameter num_experts"):
        train_run(mmoe.model_copy(update={"model": mmoe.model.model_copy(update={"name": "ple"})}))
    with pytest.warns(ConfigWarning, match="num_experts"):
        ple = mmoe.with_model("ple", {"experts_per_task": 1, "shared_experts": 1})
    assert ple.model.params == {"tower_hidden": [4], "experts_per_task": 1, "shared_experts": 1}
    res = train_run(ple, output_dir=tmp_path / "ple")
    assert res.fit.epochs_run == 1
    p = tmp_path / "mmoe.yaml"
    p.write_text(mmoe.to_yaml())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        from_cli = ExperimentConfig.load(
            p,
            ["model.name=ple", "model.params.experts_per_task=1", "model.params.shared_experts=1"],
        )
    assert from_cli.model == ple.model
