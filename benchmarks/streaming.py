"""Streaming training from a Parquet file larger than a memory cap, against in-memory training.

Writes a CTR-style Parquet file (``mtlrec.data.synthetic.make_ctr_table``: 26 categorical and
13 dense columns, ``click`` and ``conversion`` with ``conversion`` masked to clicked rows) plus
one list column ``hist`` of ``--hist-len`` item ids per row (a sequence feature, which makes
rows as wide as real impression logs), then, each in its own process:

* **stream**: fits the encoders in one streaming pass (``fit_file``) and trains MMoE for one
  epoch from a :class:`mtlrec.data.stream_dataset.StreamingDataset` over the whole file;
* **memory**: encodes the first ``--memory-rows`` rows in memory and trains the same model for
  one epoch on them: the in-memory samples/s.

Memory is the resident set (``VmRSS`` / peak ``VmHWM`` of /proc): the *baseline* is taken once
torch, the encoders, the model and the optimiser state are in memory, and the peak is reset
there, so ``peak - baseline`` is what the data and the training steps add. The stream fails if
that exceeds ``--cap-mb``, and the file on disk must be at least 3x the cap. ``RLIMIT_AS`` is
not used: it limits *virtual* memory, which torch's allocator and thread stacks inflate far
beyond what is resident.

samples/s is the trainer's own figure (rows of the epoch / seconds of its batch loop, which for
the stream includes reading and encoding). Both are measured in the same invocation.

Usage::

    python benchmarks/streaming.py --rows 2500000 --memory-rows 300000 --cap-mb 150 [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _as_cli  # noqa: F401  (first: the mtlrec command's process settings)

from mtlrec.train.optimizers import materialize_state


def write_file(path: Path, rows: int, hist_len: int, row_group: int, chunk: int = 100_000) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mtlrec.data.synthetic import make_ctr_table

    writer = None
    try:
        for k, lo in enumerate(range(0, rows, chunk)):
            n = min(chunk, rows - lo)
            t = make_ctr_table(n, seed=1000 + k, model_seed=0)
            rng = np.random.default_rng(k)
            ids = rng.zipf(1.3, size=n * hist_len) % 50_000
            offsets = np.arange(0, n * hist_len + 1, hist_len, dtype=np.int32)
            hist = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.astype(np.int64)))
            t = t.append_column("hist", hist)
            if writer is None:
                writer = pq.ParquetWriter(path, t.schema)
            writer.write_table(t, row_group_size=row_group)
    finally:
        if writer is not None:
            writer.close()


def schema(hist_len: int) -> Any:
    from mtlrec.schema import DenseFeature, Schema, SequenceFeature, SparseFeature, TaskSpec

    feats: list[Any] = [
        SparseFeature(name=f"c{j}", embedding_dim=8, min_count=2) for j in range(26)
    ]
    feats += [DenseFeature(name=f"d{j}", transform="standardize") for j in range(13)]
    feats.append(SequenceFeature(name="hist", embedding_dim=8, max_len=hist_len, min_count=2))
    tasks = [
        TaskSpec(name="click", kind="binary"),
        TaskSpec(name="conversion", kind="binary", mask="click"),
    ]
    return Schema(features=feats, tasks=tasks)


def _status_kb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return float("nan")


def child(mode: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mtlrec.config import TrainingConfig
    from mtlrec.data.file_encoding import fit_file
    from mtlrec.data.stream_dataset import StreamingDataset
    from mtlrec.models import build_model
    from mtlrec.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    s = schema(args.hist_len)
    pre = fit_file(s, path, batch_rows=args.read_rows)
    torch.manual_seed(0)
    model = build_model(
        "mmoe",
        pre.schema,
        pre.table_sizes(),
        {"num_experts": 4, "expert_hidden": [64], "tower_hidden": [16]},
    )
    cfg = TrainingConfig(epochs=1, batch_size=args.batch_size, progress=False, seed=0)
    trainer = Trainer(model, pre.schema, config=cfg)
    materialize_state(trainer.optimizer)
    # the baseline: torch, encoders, model and optimiser state; the peak is reset here (Linux
    # clear_refs 5 resets VmHWM), so peak - baseline is what the data and the steps add
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_kb("VmRSS") / 1024
    if mode == "stream":
        data: Any = StreamingDataset(
            pre,
            path,
            shuffle_buffer=args.shuffle_buffer,
            read_rows=args.read_rows,
            prefetch=not args.no_prefetch,
        )
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # the first memory_rows rows only: what is measured is their encoding, not the file's
        from mtlrec.utils.runtime import mmap_large_blocks

        reader = pq.ParquetFile(path).iter_batches(batch_size=args.memory_rows)
        with mmap_large_blocks():  # as the library's loaders encode (buffers go back to the OS)
            data = pre.encode(pa.Table.from_batches([next(reader)]), targets=True)
            del reader
    encoded_mb = _status_kb("VmRSS") / 1024 - baseline
    t0 = time.perf_counter()
    fit = trainer.fit(data)
    rec = fit.history[-1]
    peak = _status_kb("VmHWM") / 1024
    return {
        "mode": mode,
        "rows": len(data),
        "samples_per_s": rec["samples_per_s"],
        "epoch_seconds": rec["seconds"],
        "fit_seconds": time.perf_counter() - t0,
        "baseline_mb": baseline,
        "after_load_mb": encoded_mb,
        "peak_rss_mb": peak,
        "data_mb": peak - baseline,
        "train_loss": rec["train_loss"],
    }


def run_child(mode: str, path: Path, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--file", str(path), *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_500_000)
    ap.add_argument("--memory-rows", type=int, default=300_000)
    ap.add_argument("--hist-len", type=int, default=50)
    ap.add_argument("--cap-mb", type=float, default=150.0)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--shuffle-buffer", type=int, default=200_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--read-rows", type=int, default=8192)
    ap.add_argument("--row-group", type=int, default=10_000)
    ap.add_argument(
        "--no-prefetch", action="store_true", help="encode buffers in the training thread"
    )
    ap.add_argument("--keep", default=None, help="folder for the Parquet file (kept)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.file), args)))
        return
    passthrough = [
        *("--memory-rows", str(args.memory_rows), "--hist-len", str(args.hist_len)),
        *("--batch-size", str(args.batch_size), "--shuffle-buffer", str(args.shuffle_buffer)),
        *("--threads", str(args.threads), "--read-rows", str(args.read_rows)),
        *(["--no-prefetch"] if args.no_prefetch else []),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"ctr_{args.rows}_{args.hist_len}.parquet"
        t0 = time.perf_counter()
        if not path.is_file():
            write_file(path, args.rows, args.hist_len, args.row_group)
        size_mb = os.path.getsize(path) / 2**20
        print(f"file: {args.rows} rows, {size_mb:.0f} MB ({time.perf_counter() - t0:.0f} s)")
        mem = run_child("memory", path, passthrough)
        stream = run_child("stream", path, passthrough)
    ratio = stream["samples_per_s"] / mem["samples_per_s"]
    per_row = mem["after_load_mb"] / mem["rows"]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, {args.threads} threads; "
        f"cap {args.cap_mb:.0f} MB over the baseline; file {size_mb:.0f} MB = "
        f"{size_mb / args.cap_mb:.2f}x cap; the whole file encoded in memory: "
        f"~{per_row * stream['rows']:.0f} MB"
    )
    print(
        "| run | rows | samples/s | epoch s | baseline RSS MB | peak RSS MB | peak - baseline MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in (mem, stream):
        print(
            f"| {r['mode']} | {r['rows']} | {r['samples_per_s']:.0f} | "
            f"{r['epoch_seconds']:.1f} | {r['baseline_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['data_mb']:.0f} |"
        )
    print(f"streaming / in-memory samples/s: {ratio:.2f}")
    failures = []
    if size_mb < 3 * args.cap_mb:
        failures.append(f"the file ({size_mb:.0f} MB) is smaller than 3x the cap")
    if stream["data_mb"] > args.cap_mb:
        failures.append(f"streaming used {stream['data_mb']:.0f} MB over its baseline (> cap)")
    if ratio < 0.7:
        failures.append(f"streaming reaches only {ratio:.0%} of the in-memory samples/s")
    if failures:
        raise SystemExit("FAIL: " + "; ".join(failures))
    print("PASS")


if __name__ == "__main__":
    main()
