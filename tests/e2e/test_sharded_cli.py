"""``model.embedding_backend: torchrec`` through the ``mtlrec`` command: two processes
(``--nproc 2`` and torchrun with a c10d rendezvous) end with the metrics of one process; a run
whose second process is killed with SIGKILL resumes with the same command and ends like an
uninterrupted one; a run saved by two processes resumes in one; a sharded run is evaluated,
predicted, exported to ONNX and served by one process with the same predictions; a corrupt
shard file is one ``error:`` line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

pytest.importorskip("torchrec")
pytest.importorskip("fbgemm_gpu")

from conftest import DEFAULT_TIMEOUT, cli_env, experiment
from mtlrec.testing import tiny_table
from mtlrec.utils.runtime import free_port

TRAIN = ["train", "c.yaml", "--no-progress"]


def _config(d: Path) -> None:
    pq.write_table(tiny_table(800, seed=3), d / "rows.parquet", row_group_size=100)
    pq.write_table(tiny_table(40, seed=9).drop(["click", "watch"]), d / "score.parquet")
    cfg = experiment("rows.parquet", epochs=2, batch_size=64, checkpoint_every_steps=1)
    for f in cfg["schema"]["features"]:
        if "embedding_dim" in f:
            f["embedding_dim"] = 8  # the item table column-wise: two shards of 4 columns
    cfg["model"]["embedding_backend"] = "torchrec"
    # column-wise with an elementwise optimiser state (row-wise Adagrad would keep one state
    # per row of each column shard: not the one-process update)
    cfg["model"]["sharding"] = {
        "tables": {"item": "column_wise", "user": "row_wise"},
        "optimizer": "adagrad",
    }
    (d / "c.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def _torchrun(d: Path, out: str) -> subprocess.CompletedProcess[str]:
    """Two processes on this host, joined by torchrun's c10d rendezvous (the command of one of
    N hosts, with --nnodes 1)."""
    argv = [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"),
        *("--nproc_per_node", "2", "--rdzv_backend", "c10d"),
        *("--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "mtlrec-test"),
        *("-m", "mtlrec.cli", *TRAIN, "--output", out),
    ]
    return subprocess.run(
        argv, cwd=d, env=cli_env(), capture_output=True, text=True, timeout=DEFAULT_TIMEOUT
    )


@pytest.fixture(scope="module")
def runs(cli: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("sharded")
    _config(d)
    calls = {
        "one": [*TRAIN, "--output", "runs/one"],
        "two": [*TRAIN, "--output", "runs/two", "--nproc", "2"],
        "half": [*TRAIN, "--output", "runs/half", "--nproc", "2", "--set", "training.epochs=1"],
    }
    res = cli.run_all(calls, cwd=d)
    res["c10d"] = _torchrun(d, "runs/c10d")
    return d, res


def _summary(d: Path, name: str) -> dict[str, Any]:
    return json.loads((d / "runs" / name / "summary.json").read_text())


def _same_metrics(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-5) -> None:
    for task, metrics in a["test"].items():
        for k, v in metrics.items():
            assert b["test"][task][k] == pytest.approx(v, abs=tol), (task, k)


def _ok(r: Any) -> None:
    assert r.returncode == 0, str(r)
    assert "Traceback" not in r.stderr, str(r)


@pytest.mark.slow
def test_two_processes_end_with_the_metrics_of_one(runs: Any) -> None:
    d, res = runs
    for name in ("one", "two"):
        _ok(res[name])
    _same_metrics(_summary(d, "one"), _summary(d, "two"))
    ckpt = d / "runs" / "two" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "best.safetensors",
        "best.shards",
        "last.safetensors",
        "last.shards",
    ]
    (folder,) = (ckpt / "last.shards").iterdir()  # older shard folders are removed
    assert sorted(p.name for p in folder.iterdir()) == [
        "rank-00000.safetensors",
        "rank-00001.safetensors",
    ]
    assert res["two"].stdout.count("run: ") == 1


@pytest.mark.slow
def test_torchrun_c10d_rendezvous(runs: Any) -> None:
    d, res = runs
    r = res["c10d"]
    assert r.returncode == 0, r.stdout + r.stderr
    _same_metrics(_summary(d, "two"), _summary(d, "c10d"))


@pytest.mark.slow
def test_a_run_of_two_processes_resumes_in_one(cli: Any, runs: Any) -> None:
    d, res = runs
    _ok(res["half"])
    r = cli.run(*TRAIN, "--output", "runs/half", "--set", "training.epochs=2", cwd=d)
    _ok(r)
    _same_metrics(_summary(d, "one"), _summary(d, "half"))


def _last_step(run: Path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(run / "checkpoints" / "last.safetensors"), framework="pt") as f:
            return int(json.loads((f.metadata() or {})["mtlrec"])["trainer"]["step"])
    except Exception:  # not there yet, or being replaced
        return -1


def _rank_pid(parent: int, rank: int) -> int | None:
    """The child of ``parent`` started with ``RANK=rank``."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(p.name)
    return None


@pytest.mark.slow
def test_kill_one_process_then_the_same_command_resumes(cli: Any, runs: Any) -> None:
    d, res = runs
    _ok(res["two"])
    args = [*TRAIN, "--output", "runs/killed", "--nproc", "2"]
    run = cli.start(*args, cwd=d, name="killed")
    deadline = time.time() + DEFAULT_TIMEOUT
    while _last_step(d / "runs" / "killed") < 5:  # mid-epoch 1 (9 steps an epoch)
        assert run.proc.poll() is None, run.output()
        assert time.time() < deadline, run.output()
        time.sleep(0.05)
    pid = _rank_pid(run.proc.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    first = run.wait()
    assert first.returncode != 0, str(first)
    assert not (d / "runs" / "killed" / "summary.json").exists()
    r = cli.run(*args, cwd=d)
    _ok(r)
    _same_metrics(_summary(d, "two"), _summary(d, "killed"), tol=1e-6)
    logs = [
        [json.loads(x) for x in (d / "runs" / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("two", "killed")
    ]
    assert len(logs[0]) == len(logs[1]) == 2
    for a, b in zip(logs[0], logs[1], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-6)


@pytest.mark.slow
def test_a_sharded_run_is_scored_exported_and_served_by_one_process(cli: Any, runs: Any) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mtlrec.serve.app import create_app
    from mtlrec.serve.scorer import Scorer

    d, res = runs
    _ok(res["two"])
    calls = {
        "evaluate": ["evaluate", "runs/two", "--json"],
        "predict": ["predict", "runs/two", "--input", "score.parquet", "--output", "p.parquet"],
        "export": ["export", "runs/two", "--format", "onnx", "--output", "onnx"],
    }
    out = cli.run_all(calls, cwd=d)
    for r in out.values():
        _ok(r)
    # the tables gathered into one process score the test split as the sharded model did
    got = json.loads(out["evaluate"].stdout)
    _same_metrics(_summary(d, "two"), {"test": got}, tol=1e-6)
    want = pq.read_table(d / "p.parquet")
    rows = tiny_table(40, seed=9).drop(["click", "watch"]).to_pylist()
    for row in rows:
        row["hist"] = [x for x in row["hist"].split("|") if x]
    client = TestClient(create_app(Scorer.load(d / "onnx")))
    assert client.get("/metadata").json()["backend"] == "onnx"
    body = client.post("/score", json={"candidates": rows})
    assert body.status_code == 200, body.text
    results = body.json()["results"]
    for task in ("click", "watch"):
        served = np.array([c["predictions"][task] for c in results])
        np.testing.assert_allclose(served, want.column(task).to_numpy(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_corrupt_shard_is_one_error_line(cli: Any, runs: Any) -> None:
    import shutil

    d, res = runs
    _ok(res["two"])
    shutil.copytree(d / "runs" / "two", d / "runs" / "bad")
    (folder,) = (d / "runs" / "bad" / "checkpoints" / "best.shards").iterdir()
    shard = folder / "rank-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0xFF  # one byte of the weights
    shard.write_bytes(bytes(data))
    r = cli.run("evaluate", "runs/bad", cwd=d)
    assert r.returncode == 2, str(r)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), str(r)
    assert "rank-00001.safetensors" in lines[0] and "corrupt" in lines[0]
