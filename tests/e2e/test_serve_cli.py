"""``mtlrec serve`` as a real server: several worker processes answer over HTTP with the
same predictions as the in-process service, a bad option fails before any worker starts, and
stopping the server (SIGTERM, SIGINT, or SIGKILL of its main process) stops every worker and
frees the port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _serving_runs import make_run  # noqa: E402

from mtlrec.testing import tiny_table  # noqa: E402
from mtlrec.utils.runtime import http_ok, start_on_free_port  # noqa: E402


def _wait_healthy(server: Any, url: str) -> None:
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert server.proc.poll() is None, server.output()
        assert time.time() < deadline, server.output()
        time.sleep(0.3)


def _workers(server: Any, processes: Any, n: int = 2) -> list[int]:
    """The processes below the server's main process, once its ``n`` workers are there."""
    deadline = time.time() + 60
    while len(found := processes.descendants(server.proc.pid)) < n:
        assert time.time() < deadline, f"{found}\n{server.output()}"
        time.sleep(0.2)
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def _assert_all_stopped(pids: list[int], port: int, processes: Any) -> None:
    """Every process in ``pids`` ends (within 30 s) and nothing listens on ``port``."""
    deadline = time.time() + 30
    while (alive := [p for p in pids if processes.alive(p)]) and time.time() < deadline:
        time.sleep(0.2)
    left = {p: processes.cmdline(p) for p in alive}
    for p in alive:  # do not leave them behind when this fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    assert not left, f"still running after the server stopped: {left}"
    assert _port_free(port), f"port {port} is still in use"


@pytest.fixture(scope="module")
def served_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve"), "mmoe")


def test_serve_with_two_workers(cli, tmp_path: Path, served_run: Path, processes) -> None:
    """... and killing the main process with SIGKILL (nobody left to stop the workers) still
    ends both workers and frees the port."""
    from fastapi.testclient import TestClient

    from mtlrec.serve import Scorer, create_app

    run = served_run
    rows = tiny_table(20, seed=3).drop(["click", "watch"]).to_pylist()
    for r in rows:
        r["hist"] = [x for x in r["hist"].split("|") if x]
    body = {"context": {"user": rows[0]["user"]}, "candidates": rows}
    want = TestClient(create_app(Scorer.load(run))).post("/score", json=body).json()

    server, port = start_on_free_port(  # another port if this one is taken before the bind
        lambda p: cli.start("serve", run, "--port", p, "--workers", 2, cwd=tmp_path, name="serve"),
        lambda s, p: http_ok(f"http://127.0.0.1:{p}/healthz"),
        exited=lambda s: s.proc.poll() is not None,
    )
    url = f"http://127.0.0.1:{port}"
    workers: list[int] = []
    try:
        _wait_healthy(server, url)
        workers = _workers(server, processes)
        answers = []
        for _ in range(3):  # new connections: any worker may answer
            with httpx.Client(base_url=url, timeout=30) as c:
                answers += [c.post("/score", json=body) for _ in range(3)]
                bad = c.post("/score", json={"candidates": [{"price": "x"}]})
                assert bad.status_code == 422, bad.text
        for r in answers:
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["tasks"] == want["tasks"]
            for t in got["tasks"]:
                np.testing.assert_allclose(
                    [x["predictions"][t] for x in got["results"]],
                    [x["predictions"][t] for x in want["results"]],
                    atol=1e-6,
                )
        assert "with 2 workers" in server.err.read_text()
    finally:
        server.stop()  # SIGKILL of the main process
    _assert_all_stopped(workers, port, processes)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_the_server_stops_every_worker(
    cli, tmp_path: Path, served_run: Path, processes, sig: signal.Signals
) -> None:
    server, port = start_on_free_port(  # another port if this one is taken before the bind
        lambda p: cli.start(
            "serve", served_run, "--port", p, "--workers", 2, cwd=tmp_path, name="serve"
        ),
        lambda s, p: http_ok(f"http://127.0.0.1:{p}/healthz"),
        exited=lambda s: s.proc.poll() is not None,
    )
    workers: list[int] = []
    try:
        _wait_healthy(server, f"http://127.0.0.1:{port}")
        workers = _workers(server, processes)
        os.kill(server.proc.pid, sig)
        server.proc.wait(timeout=60)
    finally:
        server.stop()
    _assert_all_stopped(workers, port, processes)


def test_serve_bad_context_fails_before_workers(cli, tmp_path: Path, served_run: Path) -> None:
    run = served_run
    r = cli.run("serve", run, "--workers", 2, "--context", "nope", cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r
    assert "nope" in r.stderr and "Traceback" not in r.stderr + r.stdout
