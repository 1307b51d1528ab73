"""``mtlrec train --nproc 2``: two local processes (gloo) end with the metrics of one process,
only rank 0 writes, and what cannot be trained exactly in several processes is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from mtlrec.testing import tiny_table


@pytest.fixture(scope="module")
def runs(cli: Any, tmp_path_factory: pytest.TempPathFactory, experiment_yaml: Any) -> Any:
    d = tmp_path_factory.mktemp("ddp")
    pq.write_table(tiny_table(800, seed=3), d / "rows.parquet", row_group_size=100)
    experiment_yaml(d / "c.yaml", "rows.parquet", epochs=2, batch_size=64)
    stream = ["--set", "data.streaming=true", "--set", "data.shuffle_buffer=200"]
    calls = {
        "one": ["train", "c.yaml", "--no-progress", "--output", "runs/one"],
        "two": ["train", "c.yaml", "--no-progress", "--output", "runs/two", "--nproc", "2"],
        "stream_two": [
            *("train", "c.yaml", "--no-progress", "--output", "runs/stream_two", "--nproc", "2"),
            *stream,
        ],
        "stream_one": ["train", "c.yaml", "--no-progress", "--output", "runs/stream_one", *stream],
        "pcgrad": [
            *("train", "c.yaml", "--no-progress", "--output", "runs/pcgrad", "--nproc", "2"),
            *("--set", "balancing.name=pcgrad"),
        ],
    }
    return d, cli.run_all(calls, cwd=d)


def _summary(d: Path, name: str) -> dict[str, Any]:
    return json.loads((d / "runs" / name / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("a", "b"), [("one", "two"), ("stream_one", "stream_two")])
def test_two_processes_end_with_the_metrics_of_one(runs: Any, a: str, b: str) -> None:
    d, res = runs
    for name in (a, b):
        assert res[name].returncode == 0, str(res[name])
        assert "Traceback" not in res[name].stderr
    sa, sb = _summary(d, a), _summary(d, b)
    assert sa["best_epoch"] == sb["best_epoch"]
    for task, metrics in sa["test"].items():
        for k, v in metrics.items():
            assert sb["test"][task][k] == pytest.approx(v, abs=1e-5), (task, k)
    # rank 0 alone wrote the run folder: no stray temporary files, one log line per epoch
    files = sorted(p.name for p in (d / "runs" / b / "checkpoints").iterdir())
    assert files == ["best.safetensors", "last.safetensors"]
    log = (d / "runs" / b / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 2
    assert res[b].stdout.count("run: ") == 1


@pytest.mark.slow
def test_strategies_needing_per_task_gradients_are_refused(runs: Any) -> None:
    _, res = runs
    r = res["pcgrad"]
    assert r.returncode == 2, str(r)
    assert "Traceback" not in r.stderr, str(r)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), str(r)
    assert "per-task gradients" in lines[0]
