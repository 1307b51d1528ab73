"""``mtlrec serve`` as a real server: several worker processes answer over HTTP with the
same predictions as the in-process service, and a bad option fails before any worker starts."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _serving_runs import make_run  # noqa: E402

from mtlrec.testing import tiny_table  # noqa: E402
from mtlrec.utils.runtime import free_port  # noqa: E402


def test_serve_with_two_workers(cli, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from mtlrec.serve import Scorer, create_app

    run = make_run(tmp_path / "serve", "mmoe")
    rows = tiny_table(20, seed=3).drop(["click", "watch"]).to_pylist()
    for r in rows:
        r["hist"] = [x for x in r["hist"].split("|") if x]
    body = {"context": {"user": rows[0]["user"]}, "candidates": rows}
    want = TestClient(create_app(Scorer.load(run))).post("/score", json=body).json()

    port = free_port()
    server = cli.start("serve", run, "--port", port, "--workers", 2, cwd=tmp_path, name="serve")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.proc.poll() is None, server.output()
            assert time.time() < deadline, server.output()
            time.sleep(0.3)
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
        server.stop()


def test_serve_bad_context_fails_before_workers(cli, tmp_path: Path) -> None:
    run = make_run(tmp_path / "serve", "mmoe")
    r = cli.run("serve", run, "--workers", 2, "--context", "nope", cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r
    assert "nope" in r.stderr and "Traceback" not in r.stderr + r.stdout
