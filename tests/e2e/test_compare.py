"""``mtlrec compare`` and ``mtlrec report`` end to end on the tiny data (2 models x 2 seeds)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml


def _ok(res: Any) -> None:
    assert res.returncode == 0, str(res)
    assert "Traceback" not in res.stderr, str(res)


@pytest.mark.slow
def test_compare_then_report(
    cli: Any, tiny_dir: Path, tmp_path: Path, experiment_yaml: Any
) -> None:
    cfg = experiment_yaml(tmp_path / "exp.yaml", str(tiny_dir / "tiny.csv"), epochs=1)
    # a user column: GAUC is reported besides AUC
    data = yaml.safe_load(cfg.read_text())
    data["schema"]["group_column"] = "user"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    args = ["compare", str(cfg), "--models", "single_task,mmoe", "--seeds", "2"]
    res = cli.run(*args, "--output", "cmp", "--no-progress", cwd=tmp_path)
    _ok(res)
    assert "click auc" in res.stdout and "click gauc" in res.stdout, str(res)
    assert re.search(r"│ mmoe\s*│.*│\s*(yes|no)\s*│", res.stdout), str(res)
    assert res.stderr.count("training ") == 6  # 2 seeds x (2 single-task nets + 1 mmoe)
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["seeds"] == [0, 1]
    assert len(saved["metrics"]["mmoe"]["click"]["auc"]) == 2
    assert len(saved["metrics"]["single_task"]["watch"]["mse"]) == 2
    assert "gain" in saved["summary"]["mmoe"]["click"]
    assert (
        sum(saved["gates"]["mmoe"]["click"]["utilisation"]) == 1.0
        or abs(sum(saved["gates"]["mmoe"]["click"]["utilisation"]) - 1.0) < 1e-6
    )
    log = (tmp_path / "cmp" / "runs" / "mmoe-s0" / "metrics.jsonl").read_text().splitlines()
    assert "gate_entropy" in json.loads(log[0])
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("# Model comparison")

    # resumable: finished runs are read back, not trained again
    again = cli.run(*args, "--output", "cmp", "--no-progress", cwd=tmp_path)
    _ok(again)
    assert "training " not in again.stderr
    assert (
        json.loads((tmp_path / "cmp" / "compare.json").read_text())["metrics"] == saved["metrics"]
    )

    rep = cli.run("report", "cmp", "--output", "cmp.html", cwd=tmp_path)
    _ok(rep)
    html = (tmp_path / "cmp.html").read_text()
    assert "<h2>Comparison</h2>" in html and html.count("data:image/png;base64,") >= 4


def test_compare_unknown_model_is_one_line(
    cli: Any, tiny_dir: Path, tmp_path: Path, experiment_yaml: Any
) -> None:
    cfg = experiment_yaml(tmp_path / "exp.yaml", str(tiny_dir / "tiny.csv"), epochs=1)
    res = cli.run("compare", str(cfg), "--models", "single_task,no_such", cwd=tmp_path)
    assert res.returncode == 2, str(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no_such is not a registered model" in lines[0], str(res)
