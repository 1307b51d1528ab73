"""The suite's end-of-run check (``tests/conftest.py``): a test run that leaves a process
behind fails, naming the process, and the process is killed; an orphan (a process whose parent
ended first, like a server's worker after its main process was killed) counts too."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

LEAKY = """
import subprocess


def test_leaves_a_child() -> None:
    subprocess.Popen(["sleep", "97"])


def test_leaves_an_orphan() -> None:
    # the shell starts sleep in the background and exits: sleep's parent is gone
    subprocess.run(["sh", "-c", "sleep 98 &"], check=True)
"""

CLEAN = """
import subprocess


def test_waits_for_its_child() -> None:
    subprocess.run(["sleep", "0.1"], check=True)
"""


def _inner_pytest(folder: Path, source: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(CONFTEST, folder / "conftest.py")
    (folder / "test_inner.py").write_text(source)
    (folder / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _sleepers() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "^sleep (97|98)$"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.skipif(shutil.which("pgrep") is None, reason="needs pgrep")
def test_a_run_that_leaves_processes_fails_and_kills_them(tmp_path: Path) -> None:
    res = _inner_pytest(tmp_path, LEAKY)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "2 passed" in res.stdout, res.stdout
    assert "leftover processes" in res.stdout, res.stdout
    assert re.search(r"pid \d+: sleep 97", res.stdout), res.stdout
    assert re.search(r"pid \d+: sleep 98", res.stdout), res.stdout  # the orphan too
    deadline = time.monotonic() + 10
    while _sleepers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _sleepers(), "the leftover processes were not killed"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_clean_run_passes(tmp_path: Path) -> None:
    res = _inner_pytest(tmp_path, CLEAN)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "leftover" not in res.stdout
