"""``mtlrec predict --keep``: input columns copied beside the predictions.

The decision (issue 17.10): a kept column named like a prediction column (a task's output,
or ``score`` with ``--fusion``) is refused with one error line that names the column and
points to ``--prefix``, and nothing is written; with ``--prefix`` both are written, the kept
column unchanged. A kept column that no prediction is named like is copied as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _serving_runs import make_run

from mtlrec.testing import tiny_table

ROWS = 60


def _one_error_line(res: Any, *needles: str) -> str:
    assert res.returncode == 2, str(res)
    assert "Traceback" not in res.stderr + res.stdout, str(res)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), str(res)
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _ok(res: Any) -> None:
    assert res.returncode == 0, str(res)
    assert "Traceback" not in res.stderr, str(res)


@pytest.fixture(scope="module")
def predicted(cli: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, pa.Table]:
    d = tmp_path_factory.mktemp("predict")
    run = make_run(d / "train", "mmoe")
    table = tiny_table(ROWS, seed=2)
    table = table.append_column("score", pa.array(np.arange(ROWS, dtype=np.float64)))
    pacsv.write_csv(table, d / "in.csv")
    (d / "fusion.json").write_text(
        json.dumps(
            {
                "format": 1,
                "kind": "weighted_sum",
                "tasks": ["click", "watch"],
                "params": {"weights": {"click": 1.0, "watch": 0.5}},
            }
        )
    )
    base = ("predict", str(run), "--input", "in.csv")
    fused = ("--fusion", "fusion.json")
    calls = {
        "clash": [*base, "--output", "clash.csv", "--keep", "user,click"],
        "clash_prefix": [
            *base,
            "--output",
            "prefixed.csv",
            "--keep",
            "user,click",
            "--prefix",
            "pred_",
        ],
        "no_clash": [*base, "--output", "plain.csv", "--keep", "user,item"],
        "score_clash": [*base, "--output", "score.csv", "--keep", "score", *fused],
        "score_prefix": [
            *base,
            "--output",
            "score_p.csv",
            "--keep",
            "score,user",
            *fused,
            "--prefix",
            "p_",
        ],
    }
    return d, cli.run_all(calls, cwd=d), table


def test_keeping_a_column_named_like_a_task_output_is_refused(predicted: Any) -> None:
    d, res, _ = predicted
    line = _one_error_line(res["clash"], "--keep click", "--prefix")
    assert "user" not in line.split("--keep", 1)[1].split(":")[0]  # only the clashing column
    assert not (d / "clash.csv").exists()


def test_with_a_prefix_the_kept_column_and_the_prediction_are_both_written(
    predicted: Any,
) -> None:
    d, res, table = predicted
    _ok(res["clash_prefix"])
    out = pacsv.read_csv(d / "prefixed.csv")
    assert out.column_names == ["user", "click", "pred_click", "pred_watch"]
    assert out.num_rows == ROWS
    assert out.column("user").to_pylist() == table.column("user").to_pylist()
    assert out.column("click").to_pylist() == table.column("click").to_pylist()
    p = out.column("pred_click").to_numpy()
    assert np.all((p > 0) & (p < 1))
    # the predictions are the model's, not the kept labels
    assert not np.array_equal(p, table.column("click").to_numpy().astype(float))


def test_kept_columns_without_a_clash_are_copied(predicted: Any) -> None:
    d, res, table = predicted
    _ok(res["no_clash"])
    out = pacsv.read_csv(d / "plain.csv")
    assert out.column_names == ["user", "item", "click", "watch"]
    for c in ("user", "item"):
        assert out.column(c).to_pylist() == table.column(c).to_pylist()
    prefixed = pacsv.read_csv(d / "prefixed.csv")
    np.testing.assert_allclose(out.column("click"), prefixed.column("pred_click"), rtol=1e-12)


def test_the_fused_score_column_clashes_like_a_task(predicted: Any) -> None:
    d, res, table = predicted
    _one_error_line(res["score_clash"], "--keep score", "--prefix")
    assert not (d / "score.csv").exists()
    _ok(res["score_prefix"])
    out = pacsv.read_csv(d / "score_p.csv")
    assert out.column_names == ["score", "user", "p_click", "p_watch", "p_score"]
    assert out.column("score").to_pylist() == table.column("score").to_pylist()
    np.testing.assert_allclose(
        out.column("p_score").to_numpy(),
        out.column("p_click").to_numpy() + 0.5 * out.column("p_watch").to_numpy(),
        rtol=1e-6,
    )
