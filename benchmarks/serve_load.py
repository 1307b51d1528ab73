"""Load benchmark of ``mtlrec serve``: 200-candidate requests from concurrent clients.

Loopback only, bounded in time and in request count. Steps:

1. a run folder: ``--run RUN``, or an MMoE (8 experts, 256-128, default widths) trained for
   one epoch on 1,000,000 generated impressions over 100,000 users and 500,000 items (the
   vocabularies of a real catalogue) in a temporary folder;
2. in-process latency of one 200-candidate request (columns built, encoded, scored, fused)
   for the eager PyTorch model and, with the ``export`` extra, for its ONNX export;
3. ``mtlrec serve`` started as a subprocess on 127.0.0.1 (``--workers`` uvicorn worker
   processes, one model thread each), ``--clients`` concurrent keep-alive connections sending
   requests for ``--duration`` seconds (at most ``--max-requests``): closed loop (each client
   sends again as soon as it is answered: the saturation throughput), or open loop at
   ``--rate`` requests/s in all (latency from the scheduled send time); latency p50 / p99,
   throughput, errors and lost requests (sent but never answered).

The clients run in this process on the same cores as the server (loopback only), with a
minimal HTTP client so that they take little of the machine.

Example:
    .venv/bin/python benchmarks/serve_load.py --duration 60 --clients 4 --workers 2
    .venv/bin/python benchmarks/serve_load.py --duration 60 --clients 4 --workers 2 --rate 100
    .venv/bin/python benchmarks/serve_load.py --duration 10 --backend onnx --markdown out.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _as_cli  # noqa: F401  (first: the mtlrec command's process settings)
import numpy as np

USERS, ITEMS = 100_000, 500_000
"""Vocabulary sizes of the generated run (a real catalogue: lookups must not cost per value
of the vocabulary; the items of the training rows fill most of the item table)."""


def generated_rows(n: int, seed: int = 0) -> Any:
    """``n`` impressions over :data:`USERS` users and :data:`ITEMS` items (click, watch time on
    clicks, a price, a history of up to 10 items), labels learnable from item and price."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    user = rng.integers(0, USERS, n)
    item = rng.integers(0, ITEMS, n)
    price = rng.lognormal(0.0, 1.0, n)
    logit = (item % 3 == 0) * 2.0 - 1.0 + 0.3 * np.log1p(price) + rng.normal(0, 0.5, n)
    click = (logit > 0).astype(np.int64)
    watch = np.where(click == 1, 0.5 + 0.1 * (user % 5) + rng.normal(0, 0.05, n), np.nan)
    lens = rng.integers(0, 11, n)

    def strings(prefix: str, ids: np.ndarray) -> pa.Array:
        arr = pa.array(np.char.add(prefix, ids.astype(str)), pa.string())
        return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr

    hist_items = strings("i", rng.integers(0, ITEMS, int(lens.sum())))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    hist = pa.ListArray.from_arrays(offsets, hist_items)
    return pa.table(
        {
            "user": strings("u", user),
            "item": strings("i", item),
            "price": price,
            "click": click,
            "watch": watch,
            "hist": hist,
        }
    )


def make_run(folder: Path, rows: int = 1_000_000) -> Path:
    import pyarrow.parquet as pq

    from mtlrec.config import ExperimentConfig
    from mtlrec.train.run import train_run

    data = folder / "train.parquet"
    pq.write_table(generated_rows(rows), data)
    cfg = ExperimentConfig.from_dict(
        {
            "data": {"train": str(data), "split": {"fractions": [0.98, 0.01, 0.01], "seed": 0}},
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
            "training": {"epochs": 1, "batch_size": 2048, "progress": False},
            "output_dir": str(folder / "run"),
        }
    )
    return train_run(cfg).path


def request_body(n: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    ctx = {
        "user": f"u{int(rng.integers(0, USERS))}",
        "hist": [f"i{j}" for j in rng.integers(0, ITEMS, 10)],
    }
    cands = [
        {"item": f"i{int(i)}", "price": float(p)}
        for i, p in zip(rng.integers(0, ITEMS, n), rng.lognormal(0, 1, n), strict=True)
    ]
    return {"context": ctx, "candidates": cands}


async def _asgi_post(app: Any, payload: bytes) -> tuple[int, bytes]:
    """POST /score straight into the ASGI app."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/score",
        "raw_path": b"/score",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    messages = [{"type": "http.request", "body": payload, "more_body": False}]
    out: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # a disconnect never comes
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        out.append(message)

    await app(scope, receive, send)
    return int(out[0]["status"]), b"".join(m.get("body", b"") for m in out[1:])


def in_process(path: Path, body: dict[str, Any], repeats: int) -> dict[str, float]:
    """Latency of one request in-process: the whole app called as ASGI (no socket, no HTTP
    parsing) and the scorer alone (columns -> encoded batch -> predictions)."""
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
    app = create_app(scorer)
    payload = json.dumps(body).encode()
    for _ in range(10):
        assert asyncio.run(_asgi_post(app, payload))[0] == 200
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        status, _ = asyncio.run(_asgi_post(app, payload))
        times.append(time.perf_counter() - t)
        assert status == 200
    ms, sms = np.array(times) * 1e3, np.array(st) * 1e3
    return {
        "p50_ms": float(np.median(ms)),
        "p99_ms": float(np.percentile(ms, 99)),
        "scorer_p50_ms": float(np.median(sms)),
        "scorer_p99_ms": float(np.percentile(sms, 99)),
    }


class _Connection:
    """A minimal HTTP/1.1 keep-alive client over one loopback socket: the request bytes are
    built once, the answer's status line and Content-Length are parsed, nothing else. The load
    generator shares the machine's cores with the server, so it must cost little CPU per
    request (httpx costs ~1-2 ms per 200-candidate request on this machine)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length)
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


def _request_bytes(port: int, body: bytes) -> bytes:
    head = (
        f"POST /score HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _load(
    port: int,
    bodies: list[bytes],
    clients: int,
    duration: float,
    max_requests: int,
    rate: float | None,
):
    """``clients`` connections for ``duration`` seconds. Closed loop (``rate`` None): each
    client sends its next request when the answer to the last one came. Open loop: each
    client sends at ``rate / clients`` requests/s on a fixed schedule with a random phase,
    and latency counts from the scheduled send time (a late answer delays the next request,
    and that wait is counted: no coordinated omission)."""
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    requests = [_request_bytes(port, b) for b in bodies]
    t0 = time.perf_counter()
    deadline = t0 + duration
    rng = np.random.default_rng(0)

    async def worker(k: int) -> None:
        nonlocal sent
        conn = _Connection("127.0.0.1", port)
        i = k
        interval = clients / rate if rate else 0.0
        due = t0 + float(rng.uniform(0, interval)) if rate else 0.0
        try:
            while sent < max_requests:
                if rate:
                    if due >= deadline:
                        break
                    wait = due - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    start = due
                    due += interval
                else:
                    start = time.perf_counter()
                    if start >= deadline:
                        break
                sent += 1
                try:
                    status, answer = await conn.post(requests[i % len(requests)])
                    if status != 200:
                        errors.append(f"HTTP {status}: {answer[:100]!r}")
                    else:
                        latencies.append(time.perf_counter() - start)
                except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    await conn.close()
                    conn = _Connection("127.0.0.1", port)
                i += clients
        finally:
            await conn.close()

    await asyncio.gather(*(worker(k) for k in range(clients)))
    return latencies, errors, sent, time.perf_counter() - t0


def serve_load(
    path: Path,
    candidates: int,
    clients: int,
    duration: float,
    max_requests: int,
    *,
    workers: int = 1,
    rate: float | None = None,
) -> dict[str, Any]:
    import httpx

    from mtlrec.utils.runtime import http_ok, start_on_free_port

    exe = Path(sys.executable).parent / "mtlrec"
    argv = (
        [str(exe)]
        if exe.is_file()
        else [sys.executable, "-c", "from mtlrec.cli import main; main()"]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def start(port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                *argv,
                "serve",
                str(path),
                "--port",
                str(port),
                "--max-candidates",
                str(candidates),
                "--workers",
                str(workers),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    # another port if the chosen one is taken before the server binds it
    proc, port = start_on_free_port(
        start, lambda _, p: http_ok(f"http://127.0.0.1:{p}/healthz", timeout=1), timeout=120
    )
    url = f"http://127.0.0.1:{port}"
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
        # warm-up, not counted (and every worker up: each loads its model when it starts)
        asyncio.run(_load(port, bodies, max(clients, 2 * workers), 3.0, 400, None))
        lat, errors, sent, wall = asyncio.run(
            _load(port, bodies, clients, duration, max_requests, rate)
        )
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
        "workers": workers,
        "offered_rps": rate,
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
    ap.add_argument("--workers", type=int, default=1, help="mtlrec serve --workers")
    ap.add_argument(
        "--rate", type=float, help="open loop: requests/s over all clients (default: closed loop)"
    )
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
            load = serve_load(
                path,
                args.candidates,
                args.clients,
                duration,
                args.max_requests,
                workers=args.workers,
                rate=args.rate,
            )
            rows.append((name, inproc, load))
            print(json.dumps({"backend": name, "in_process": inproc, "load": load}, indent=2))
    cmd = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    lines = [
        f"`{cmd}` — {os.cpu_count()} CPUs, {args.workers} server worker(s), {args.clients} "
        f"clients, "
        + (f"open loop at {args.rate:g} requests/s, " if args.rate else "closed loop, ")
        + f"{args.candidates} candidates per request, {duration:.0f} s of load",
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
