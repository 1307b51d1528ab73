"""A run folder moved or copied elsewhere is the same run (issue 13): the same command resumes
it there, from another working directory, with ``--output``, with ``output_dir`` pointing to
the new place, or from the folder's own ``config.yaml``; ``evaluate`` reads its data from
anywhere. And ``--set model.name=`` switches model, keeping the parameters the new model
takes, with one warning line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mtlrec.testing import tiny_table

COPIES = ("b", "c", "d", "e", "f")


def _ok(res: Any) -> None:
    assert res.returncode == 0, str(res)
    assert "Traceback" not in res.stderr, str(res)


def _epochs(run: Path) -> int:
    return len((run / "metrics.jsonl").read_text().splitlines())


@pytest.fixture(scope="module")
def moved(
    cli: Any, tmp_path_factory: pytest.TempPathFactory, experiment_yaml: Any
) -> tuple[Path, dict[str, Any]]:
    """A run trained in ``proj/runs/a`` (data path relative to the config), copied to
    ``elsewhere/<x>``; every call runs from the folder above ``proj`` (another working
    directory than the config's)."""
    import pyarrow.csv as pacsv

    d = tmp_path_factory.mktemp("moved")
    proj = d / "proj"
    proj.mkdir()
    pacsv.write_csv(tiny_table(600), proj / "tiny.csv")
    experiment_yaml(proj / "exp.yaml", "tiny.csv", epochs=2, output_dir="runs/a")
    _ok(cli.run("train", "exp.yaml", "--no-progress", cwd=proj))
    for x in COPIES:
        shutil.copytree(proj / "runs" / "a", d / "elsewhere" / x)
    train = ["train", "--no-progress"]
    calls = {
        "output_option": [*train, "proj/exp.yaml", "--output", "elsewhere/b"],
        "output_dir_moved": [*train, "proj/exp.yaml", "--set", "output_dir=elsewhere/c"],
        "own_config": [*train, "elsewhere/d/config.yaml", "--output", "elsewhere/d"],
        "evaluate": ["evaluate", "elsewhere/e", "--json"],
        "more_epochs": [
            *(*train, "elsewhere/f/config.yaml", "--output", "elsewhere/f"),
            *("--set", "training.epochs=3"),
        ],
        "switch_model": [
            *(*train, "proj/exp.yaml", "--output", "switched"),
            *("--set", "model.name=ple", "--set", "training.epochs=1"),
        ],
    }
    return d, cli.run_all(calls, cwd=d)


@pytest.mark.parametrize(
    ("call", "copy"), [("output_option", "b"), ("output_dir_moved", "c"), ("own_config", "d")]
)
def test_a_moved_run_folder_resumes(
    moved: tuple[Path, dict[str, Any]], call: str, copy: str
) -> None:
    d, results = moved
    _ok(results[call])
    run = d / "elsewhere" / copy
    assert _epochs(run) == 2  # nothing trained again
    summary = json.loads((run / "summary.json").read_text())
    first = json.loads((d / "proj" / "runs" / "a" / "summary.json").read_text())
    assert summary["test"] == first["test"]


def test_a_moved_run_folder_trains_more_epochs(moved: tuple[Path, dict[str, Any]]) -> None:
    d, results = moved
    _ok(results["more_epochs"])
    assert _epochs(d / "elsewhere" / "f") == 3


def test_evaluate_a_moved_run_from_another_directory(moved: tuple[Path, dict[str, Any]]) -> None:
    _, results = moved
    _ok(results["evaluate"])
    metrics = json.loads(results["evaluate"].stdout)
    assert 0.0 <= metrics["click"]["auc"] <= 1.0


def test_switching_model_keeps_shared_parameters_with_one_warning(
    moved: tuple[Path, dict[str, Any]],
) -> None:
    d, results = moved
    res = results["switch_model"]
    _ok(res)
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, res.stderr
    assert "model 'ple' has no parameter num_experts" in warnings[0]
    assert "kept: expert_hidden, tower_hidden" in warnings[0]
    model = json.loads((d / "switched" / "model.json").read_text())
    assert model["name"] == "ple"
    assert model["params"]["expert_hidden"] == [16] and model["params"]["tower_hidden"] == [8]
