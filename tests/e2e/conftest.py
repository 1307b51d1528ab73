"""Fixtures of the end-to-end tests: the real ``mtlrec`` console script, run as a subprocess.

Every call is bounded by a timeout. Independent calls are run a few at a time (``Cli.run_all``):
most of a call's time is the interpreter importing torch, which overlaps well on two cores.
Subprocesses get ``OMP_NUM_THREADS=1``: the data here is tiny, and on a busy two-core machine
torch's thread pool spends more time waiting than working.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from mtlrec.testing import tiny_table

DEFAULT_TIMEOUT = 240.0

FEATURES: list[dict[str, Any]] = [
    {"type": "sparse", "name": "user", "embedding_dim": 4},
    {"type": "sparse", "name": "item", "embedding_dim": 4, "table": "item"},
    {"type": "dense", "name": "price", "transform": "log1p_standardize"},
    {"type": "sequence", "name": "hist", "embedding_dim": 4, "table": "item", "max_len": 5},
]
TASKS: list[dict[str, Any]] = [
    {"name": "click", "kind": "binary"},
    {"name": "watch", "kind": "regression", "mask": "click"},
]


def mtlrec_argv() -> list[str]:
    """The console script next to the interpreter, else the same entry point through ``-c``."""
    script = Path(sys.executable).parent / "mtlrec"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from mtlrec.cli import main; main()"]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "NO_COLOR": "1",
            "TERM": "dumb",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("FORCE_COLOR", None)
    return env


@dataclass
class Result:
    """What one ``mtlrec`` call did."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"mtlrec {' '.join(self.args)} -> {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


class Cli:
    """Runs ``mtlrec`` with arguments in a folder."""

    def __init__(self) -> None:
        self.argv = mtlrec_argv()
        self.env = cli_env()
        self.workers = max(2, len(os.sched_getaffinity(0)))

    def run(
        self, *args: str | os.PathLike[str], cwd: Path, timeout: float = DEFAULT_TIMEOUT
    ) -> Result:
        argv = [str(a) for a in args]
        proc = subprocess.run(
            [*self.argv, *argv],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return Result(argv, proc.returncode, proc.stdout, proc.stderr)

    def run_all(
        self,
        calls: Mapping[str, Sequence[str | os.PathLike[str]]],
        *,
        cwd: Path,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> dict[str, Result]:
        """Independent calls, a few at a time; results by name."""
        with ThreadPoolExecutor(self.workers) as pool:
            futures = {
                name: pool.submit(self.run, *args, cwd=cwd, timeout=timeout)
                for name, args in calls.items()
            }
            return {name: f.result() for name, f in futures.items()}

    def start(self, *args: str | os.PathLike[str], cwd: Path, name: str) -> Background:
        """Start a call in the background; its output goes to ``cwd/name.out|err``."""
        argv = [str(a) for a in args]
        out, err = cwd / f"{name}.out", cwd / f"{name}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                [*self.argv, *argv],
                cwd=cwd,
                env=self.env,
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
            )
        return Background(argv, proc, out, err)


@dataclass
class Background:
    """A call running in the background."""

    args: list[str]
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def output(self) -> str:
        return f"{self.out.read_text()}\n{self.err.read_text()}"

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> Result:
        """Wait for the end (killing the call after ``timeout`` seconds)."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.stop()
        return Result(self.args, self.proc.returncode, self.out.read_text(), self.err.read_text())

    def stop(self) -> None:
        """SIGKILL if still running, and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def experiment(
    train: str,
    *,
    without: tuple[str, ...] = (),
    epochs: int = 3,
    batch_size: int = 64,
    output_dir: str = "runs/tiny",
    **training: Any,
) -> dict[str, Any]:
    """The config of the tiny experiment (as the README's, scaled down); ``without`` drops
    features by name."""
    return {
        "data": {"train": train, "split": {"fractions": [0.7, 0.15, 0.15], "seed": 0}},
        "schema": {"features": [f for f in FEATURES if f["name"] not in without], "tasks": TASKS},
        "model": {
            "name": "mmoe",
            "params": {"num_experts": 3, "expert_hidden": [16], "tower_hidden": [8]},
        },
        "training": {
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": {"lr": 0.01},
            **training,
        },
        "output_dir": output_dir,
    }


def write_experiment(path: Path, train: str, **kwargs: Any) -> Path:
    """Write :func:`experiment`'s config as YAML to ``path``."""
    path.write_text(yaml.safe_dump(experiment(train, **kwargs), sort_keys=False))
    return path


def write_table(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)
    return path


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


@pytest.fixture(scope="session")
def experiment_yaml() -> Any:
    """``experiment_yaml(path, train, **options)`` writes a config (see :func:`experiment`)."""
    return write_experiment


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``tiny.csv`` and ``tiny.parquet`` (the same 600 labelled rows) and
    ``score.csv`` / ``score.parquet`` (50 rows of features only)."""
    d = tmp_path_factory.mktemp("tiny")
    table = tiny_table(600)
    write_table(table, d / "tiny.csv")
    write_table(table, d / "tiny.parquet")
    score = tiny_table(50, seed=1).drop(["click", "watch"])
    write_table(score, d / "score.csv")
    write_table(score, d / "score.parquet")
    return d
