"""Checks of the whole test run: it leaves no process behind.

When the run starts, the pytest process becomes a "child subreaper" (Linux,
``prctl(PR_SET_CHILD_SUBREAPER)``): a process started by a test that outlives its own parent
(a server's worker whose main process was killed) is adopted by pytest instead of by init, so
it stays in view. When the run ends, every descendant of the pytest process still alive is
listed, killed, and fails the run (exit status 1).

Processes are read from ``/proc``; where there is none (not Linux) the check does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from pathlib import Path

import pytest

_PR_SET_CHILD_SUBREAPER = 36
# helpers of the standard library that end with the process that started them
_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
_GRACE_SECONDS = 5.0


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """``(parent pid, state)`` of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (command) state ppid ...": the command may hold spaces and parentheses
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[1]), fields[0]


def cmdline(pid: int) -> str:
    """The command line of a process ("" if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an exited process not yet reaped)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")


def descendants(root: int) -> list[int]:
    """The live processes below ``root`` (children, their children...), from ``/proc``."""
    if not Path("/proc").is_dir():
        return []
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _proc_stat(int(name))) is not None:
            children.setdefault(stat[0], []).append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return [pid for pid in found if alive(pid)]


def _reap() -> None:
    """Collect the exit status of finished children (zombies), ours or adopted."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _leftovers() -> list[int]:
    _reap()
    return [p for p in descendants(os.getpid()) if not any(h in cmdline(p) for h in _HELPERS)]


def pytest_configure(config: pytest.Config) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = _leftovers()
    deadline = time.monotonic() + _GRACE_SECONDS
    while left and time.monotonic() < deadline:  # a process may be on its way out
        time.sleep(0.2)
        left = _leftovers()
    if not left:
        return
    lines = [f"pid {pid}: {cmdline(pid)[:300]}" for pid in left]
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    _reap()
    message = "the tests left processes running (killed now):\n  " + "\n  ".join(lines)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", "leftover processes", red=True)
        reporter.write_line(message)
    else:
        sys.stderr.write(message + "\n")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


class Processes:
    """The process helpers of this file, for tests (``processes`` fixture)."""

    descendants = staticmethod(descendants)
    alive = staticmethod(alive)
    cmdline = staticmethod(cmdline)


@pytest.fixture(scope="session")
def processes() -> Processes:
    """Helpers over ``/proc``: ``descendants(pid)``, ``alive(pid)``, ``cmdline(pid)``."""
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    return Processes()
