"""Faults: training killed with SIGKILL at random (seeded) points, resumed, and damaged or
foreign files, through the ``mtlrec`` command.

* Three trials, each killed at a step drawn from a seeded generator (checkpoints every step,
  so a kill often lands inside a checkpoint write), then run to the end with the same
  command: the checkpoints are always loadable (no half-written file under a final name), every
  resume works, and the per-epoch log and final metrics equal an uninterrupted run's.
* A truncated or corrupt checkpoint, a checkpoint or run folder of a future format, a config of
  another version, and a fusion file naming tasks the model does not predict: exit status 2
  and one ``error:`` line, never a traceback.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv
import pytest
import yaml

from mtlrec.testing import tiny_table

TRIALS = 3
KILLS_PER_TRIAL = 1
SEED = 20_261_123


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last_step(run: Path) -> int:
    """Step of the run's last checkpoint (-1 when there is none or it is being replaced)."""
    from safetensors import safe_open

    try:
        with safe_open(str(run / "checkpoints" / "last.safetensors"), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["mtlrec"])
        return int(meta["trainer"]["step"])
    except Exception:  # missing, or replaced while read: try again
        return -1


def _sound(folder: Path) -> list[str]:
    """Problems of a checkpoint folder after a kill: a final-named file that does not load, or
    a temporary file that is the only copy of its target."""
    from mtlrec.errors import CheckpointError
    from mtlrec.train.checkpoint import load_checkpoint

    problems = []
    if not folder.is_dir():
        return problems
    names = sorted(p.name for p in folder.iterdir())
    for n in names:
        if n.endswith(".safetensors"):
            try:
                load_checkpoint(folder / n)
            except CheckpointError as e:
                problems.append(f"{n}: {e}")
        elif n.endswith(".tmp"):
            target = n[1:].split(".safetensors")[0] + ".safetensors"
            if target not in names:
                problems.append(f"{n} is the only copy of {target}")
    return problems


@dataclass
class Trial:
    run: Path
    kill_steps: list[int]
    killed_at: list[int]
    problems: list[str]
    final: Any


@dataclass
class Faults:
    dir: Path
    reference: Path
    reference_result: Any
    trials: list[Trial]


def _args(run: Path) -> list[str]:
    return ["train", "faults.yaml", "--no-progress", "--output", str(run)]


@pytest.fixture(scope="module")
def faults(cli: Any, tmp_path_factory: pytest.TempPathFactory, experiment_yaml: Any) -> Faults:
    d = tmp_path_factory.mktemp("faults")
    pacsv.write_csv(tiny_table(1000, seed=7), d / "rows.csv")
    experiment_yaml(
        d / "faults.yaml",
        "rows.csv",
        epochs=2,
        batch_size=32,
        checkpoint_every_steps=1,
        output_dir="runs/x",
    )
    steps = 2 * (700 // 32)  # about 700 training rows (70% of 1,000), 2 epochs
    rng = random.Random(SEED)
    plans = [sorted(rng.sample(range(2, steps - 4), KILLS_PER_TRIAL)) for _ in range(TRIALS)]

    def trial(k: int) -> Trial:
        run = d / "runs" / f"trial{k}"
        killed_at: list[int] = []
        problems: list[str] = []
        for target in plans[k]:
            job = cli.start(*_args(run), cwd=d, name=f"trial{k}_{target}")
            try:
                deadline = time.monotonic() + 180
                while job.proc.poll() is None and time.monotonic() < deadline:
                    if _last_step(run) >= target:
                        os.kill(job.proc.pid, signal.SIGKILL)
                        break
                    time.sleep(0.005)
                job.proc.wait(timeout=30)
            finally:
                job.stop()
            assert job.proc.returncode == -signal.SIGKILL, job.output()
            killed_at.append(_last_step(run))
            problems += _sound(run / "checkpoints")
        final = cli.run(*_args(run), cwd=d)
        return Trial(run, plans[k], killed_at, problems, final)

    with ThreadPoolExecutor(TRIALS + 1) as pool:
        ref_future = pool.submit(cli.run, *_args(d / "runs" / "reference"), cwd=d)
        trials = list(pool.map(trial, range(TRIALS)))
        reference_result = ref_future.result()
    return Faults(d, d / "runs" / "reference", reference_result, trials)


def _assert_ok(res: Any) -> None:
    assert res.returncode == 0, str(res)
    assert "Traceback" not in res.stderr, str(res)


@pytest.mark.slow
def test_every_kill_left_loadable_checkpoints(faults: Faults) -> None:
    for t in faults.trials:
        assert not t.problems, t.problems
        # killed where planned (at or just after the drawn step), in increasing order
        assert all(k >= s for k, s in zip(t.killed_at, t.kill_steps, strict=True)), t
        assert t.killed_at == sorted(t.killed_at), t


@pytest.mark.slow
def test_resumed_runs_end_as_if_never_killed(faults: Faults) -> None:
    _assert_ok(faults.reference_result)
    ref_log = _read_jsonl(faults.reference / "metrics.jsonl")
    ref_summary = json.loads((faults.reference / "summary.json").read_text())
    for t in faults.trials:
        _assert_ok(t.final)
        log = _read_jsonl(t.run / "metrics.jsonl")
        assert [r["epoch"] for r in log] == [r["epoch"] for r in ref_log] == [1, 2]
        for a, b in zip(ref_log, log, strict=True):
            assert a["step"] == b["step"]
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
            assert a["valid"] == b["valid"]
        summary = json.loads((t.run / "summary.json").read_text())
        assert summary["best_epoch"] == ref_summary["best_epoch"]
        assert summary["test"] == ref_summary["test"]
        assert not _sound(t.run / "checkpoints")


# -- damaged and foreign files ------------------------------------------------------------------
def _one_error_line(res: Any, *needles: str) -> str:
    assert res.returncode == 2, str(res)
    assert "Traceback" not in res.stderr, str(res)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), str(res)
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def damaged(
    cli: Any, tmp_path_factory: pytest.TempPathFactory, experiment_yaml: Any
) -> dict[str, Any]:
    """Copies of a finished one-epoch run, each with one file damaged, and the calls that
    meet the damage."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("damaged")
    pacsv.write_csv(tiny_table(300, seed=7), d / "rows.csv")
    experiment_yaml(d / "faults.yaml", "rows.csv", epochs=1, output_dir="runs/x")
    reference = d / "runs" / "reference"
    _assert_ok(cli.run(*_args(reference), cwd=d))

    def copy(name: str) -> Path:
        return Path(shutil.copytree(reference, d / "damaged" / name))

    calls: dict[str, list[str]] = {}
    # truncated last checkpoint, met when the same command resumes (more epochs asked for)
    run = copy("truncated")
    last = run / "checkpoints" / "last.safetensors"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    calls["truncated"] = [*_args(run), "--set", "training.epochs=2"]
    # random bytes in the middle of the best checkpoint, met by evaluate
    run = copy("corrupt")
    best = run / "checkpoints" / "best.safetensors"
    data = bytearray(best.read_bytes())
    data[8:64] = os.urandom(56)
    best.write_bytes(bytes(data))
    calls["corrupt"] = ["evaluate", str(run)]
    # a checkpoint written by a future mtlrec (format version 2)
    run = copy("future_checkpoint")
    last = run / "checkpoints" / "last.safetensors"
    with safe_open(str(last), framework="pt") as f:
        meta = json.loads(f.metadata()["mtlrec"])
    meta["version"] = "2"
    save_file(load_file(str(last)), str(last), metadata={"mtlrec": json.dumps(meta)})
    calls["future_checkpoint"] = [*_args(run), "--set", "training.epochs=2"]
    # a run folder of a future format
    run = copy("future_run")
    info = json.loads((run / "model.json").read_text())
    info["format"] = 99
    (run / "model.json").write_text(json.dumps(info))
    calls["future_run"] = ["evaluate", str(run)]
    # a config of another version
    cfg = yaml.safe_load((d / "faults.yaml").read_text())
    cfg["version"] = 2
    (d / "future.yaml").write_text(yaml.safe_dump(cfg))
    calls["future_config"] = ["train", "future.yaml", "--no-progress", "--output", "runs/fut"]
    # a fusion file naming a task the model does not predict
    fusion = {
        "format": 1,
        "kind": "weighted_sum",
        "tasks": ["click", "like"],
        "params": {"weights": {"click": 1.0, "like": 0.5}},
    }
    (d / "fusion.json").write_text(json.dumps(fusion))
    pacsv.write_csv(tiny_table(20, seed=8), d / "score.csv")
    calls["fusion"] = [
        *("predict", str(reference), "--input", "score.csv"),
        *("--output", "scores.csv", "--fusion", "fusion.json"),
    ]
    return cli.run_all(calls, cwd=d)


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("truncated", ("last.safetensors", "corrupt or truncated")),
        ("corrupt", ("best.safetensors",)),
        ("future_checkpoint", ("format version '2'",)),
        ("future_run", ("model.json", "run format 99")),
        ("future_config", ("future.yaml", "version 2")),
        ("fusion", ("fusion.json", "like")),
    ],
)
def test_damaged_or_foreign_files_give_one_error_line(
    damaged: dict[str, Any], case: str, needles: tuple[str, ...]
) -> None:
    _one_error_line(damaged[case], *needles)
