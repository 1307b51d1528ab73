"""Load benchmark of ``mtlrec serve``: 200-candidate requests from concurrent clients.

Loopback only, bounded in time and in request count. Steps:

1. a run folder: ``--run RUN``, or a small MMoE (8 experts, 256-128, default widths) trained for
   one epoch on :func:`mtlrec.testing.tiny_table` rows in a temporary folder;
2. in-process latency of one 200-candidate request (columns built, encoded, scored, fused)
   for the eager PyTorch model and, with the ``export`` extra, for its ONNX export;
3. ``mtlrec serve`` started as a subprocess on 127.0.0.1 (one uvicorn worker, one model
   thread), ``--clients`` concurrent httpx clients sending requests for ``--duration``
   seconds (at most ``--max-requests``); latency p50 / p99, throughput, errors and lost
   requests (sent but never answered).

Example:
    .venv/bin/python benchmarks/serve_load.py --duration 60 --clients 4
    .venv/bin/python benchmarks/serve_load.py --duration 10 --backend onnx --markdown out.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_run(folder: Path) -> Path:
    import pyarrow.parquet as pq

    from mtlrec.config import ExperimentConfig
    from mtlrec.testing import tiny_table
    from mtlrec.train.run import train_run

    data = folder / "train.parquet"
    pq.write_table(tiny_table(4000), data)
    cfg = ExperimentConfig.from_dict(
        {
            "data": {"train": str(data), "split": {"fractions": [0.8, 0.1, 0.1], "seed": 0}},
            "schema": {
                "features": [
                    {"type": "sparse", "name": "user", "embedding_dim": 16},
                    {"type": "sparse", "name": "item", "embedding_dim": 16, "table": "item"},
                    {"type": "dense", "name": "price", "transform": "log1p_standardize"},
                    {"type": "sequence", "name": "hist", "embedding_dim": 16, "table": "item"},
                ],
                "tasks": [
                    {"name": "click", "kind": "binary"},
                    {"name": "watch", "kind": "regression", "mask": "click"},
                ],
            },
            "model": {"name": "mmoe", "params": {}},  # 8 experts of 256-128, towers of 64
            "training": {"epochs": 1, "batch_size": 256, "progress": False},
            "output_dir": str(folder / "run"),
        }
    )
    return train_run(cfg).path


def request_body(n: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    ctx = {
        "user": f"u{int(rng.integers(0, 20))}",
        "hist": [f"i{j}" for j in rng.integers(0, 30, 5)],
    }
    cands = [
        {"item": f"i{int(i)}", "price": float(p)}
        for i, p in zip(rng.integers(0, 40, n), rng.lognormal(0, 1, n), strict=True)
    ]
    return {"context": ctx, "candidates": cands}


def in_process(path: Path, body: dict[str, Any], repeats: int) -> dict[str, float]:
    """Latency of one request in-process: the whole app through FastAPI's TestClient (no
    socket) and the scorer alone (columns -> encoded batch -> predictions)."""
    from fastapi.testclient import TestClient

    from mtlrec.serve import Scorer, create_app

    scorer = Scorer.load(path)
    ctx, cands = body["context"], body["candidates"]
    cols = {
        c: [ctx[c]] * len(cands) if c in ctx else [x[c] for x in cands]
        for c in scorer.schema.input_columns()
    }
    for _ in range(10):
        scorer.score_columns(cols, len(cands))
    st = []
    for _ in range(repeats):
        t = time.perf_counter()
        scorer.score_columns(cols, len(cands))
        st.append(time.perf_counter() - t)
    client = TestClient(create_app(scorer))
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    for _ in range(10):
        assert client.post("/score", content=payload, headers=headers).status_code == 200
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        r = client.post("/score", content=payload, headers=headers)
        times.append(time.perf_counter() - t)
        assert r.status_code == 200
    ms, sms = np.array(times) * 1e3, np.array(st) * 1e3
    return {
        "p50_ms": float(np.median(ms)),
        "p99_ms": float(np.percentile(ms, 99)),
        "scorer_p50_ms": float(np.median(sms)),
        "scorer_p99_ms": float(np.percentile(sms, 99)),
    }


async def _load(url: str, bodies: list[bytes], clients: int, duration: float, max_requests: int):
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    deadline = time.perf_counter() + duration
    headers = {"content-type": "application/json"}

    async def worker(k: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as c:
            i = k
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                t = time.perf_counter()
                try:
                    r = await c.post("/score", content=bodies[i % len(bodies)], headers=headers)
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {r.text[:100]}")
                    else:
                        latencies.append(time.perf_counter() - t)
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                i += clients

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    return latencies, errors, sent, time.perf_counter() - t0


def serve_load(
    path: Path, candidates: int, clients: int, duration: float, max_requests: int
) -> dict[str, Any]:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).parent / "mtlrec"
    argv = (
        [str(exe)]
        if exe.is_file()
        else [sys.executable, "-c", "from mtlrec.cli import main; main()"]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [*argv, "serve", str(path), "--port", str(port), "--max-candidates", str(candidates)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        t_end = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > t_end:
                raise RuntimeError(f"server did not start: {proc.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
            time.sleep(0.2)
        bodies = [json.dumps(request_body(candidates, s)).encode() for s in range(64)]
        # warm-up, not counted
        asyncio.run(_load(url, bodies, clients, 2.0, 200))
        lat, errors, sent, wall = asyncio.run(_load(url, bodies, clients, duration, max_requests))
        meta = httpx.get(f"{url}/metadata").json()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    ms = np.array(lat) * 1e3
    return {
        "backend": meta["backend"],
        "requests_sent": sent,
        "ok": len(lat),
        "errors": len(errors),
        "lost": sent - len(lat) - len(errors),
        "first_errors": errors[:3],
        "seconds": wall,
        "throughput_rps": len(lat) / wall if wall else 0.0,
        "candidates_per_s": len(lat) * candidates / wall if wall else 0.0,
        "p50_ms": float(np.median(ms)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="run folder (default: train a small MMoE)")
    ap.add_argument("--backend", choices=["torch", "onnx", "both"], default="both")
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (max 300)")
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=200, help="in-process requests timed")
    ap.add_argument("--markdown", type=Path, help="append the results to this file")
    args = ap.parse_args()
    duration = min(args.duration, 300.0)
    import torch

    torch.set_num_threads(1)  # as the server (mtlrec serve --threads 1)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or make_run(Path(tmp))
        targets: list[tuple[str, Path]] = []
        if args.backend in ("torch", "both"):
            targets.append(("torch", run))
        if args.backend in ("onnx", "both"):
            from mtlrec.export import export_run

            export_run(run, Path(tmp) / "onnx", format="onnx")
            targets.append(("onnx", Path(tmp) / "onnx"))
        body = request_body(args.candidates, 0)
        rows = []
        for name, path in targets:
            inproc = in_process(path, body, args.repeats)
            load = serve_load(path, args.candidates, args.clients, duration, args.max_requests)
            rows.append((name, inproc, load))
            print(json.dumps({"backend": name, "in_process": inproc, "load": load}, indent=2))
    cmd = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    lines = [
        f"`{cmd}` — {os.cpu_count()} CPUs, {args.clients} clients, {args.candidates} candidates "
        f"per request, {duration:.0f} s of load",
        "",
        "| backend | scorer p50 / p99 (ms) | app in-process p50 / p99 (ms) "
        "| HTTP p50 / p99 (ms) | req/s | candidates/s | sent | errors | lost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ip, ld in rows:
        lines.append(
            f"| {name} | {ip['scorer_p50_ms']:.2f} / {ip['scorer_p99_ms']:.2f} "
            f"| {ip['p50_ms']:.2f} / {ip['p99_ms']:.2f} | {ld['p50_ms']:.2f} / "
            f"{ld['p99_ms']:.2f} | {ld['throughput_rps']:.0f} | {ld['candidates_per_s']:.0f} | "
            f"{ld['requests_sent']} | {ld['errors']} | {ld['lost']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
