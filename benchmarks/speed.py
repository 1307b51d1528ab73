"""Training and inference speed on a synthetic CTR-style table, against the machine's own peak.

What it measures, per model, on the user-facing path (``Trainer.fit`` / ``Trainer.predict`` over
an in-memory ``ColumnarDataset``, batching included):

* train samples/s (batch 2048, Adam; the second epoch, after warm-up),
* inference samples/s (batch 8192),
* the model's forward matmul FLOPs per sample (counted by ``torch.utils.flop_counter``),
* the machine's fp32 matmul GFLOP/s (square 2048 matmul, best of several, in the same run),
* limit = peak / FLOPs (inference) and peak / (3 x FLOPs) (training: forward + 2x backward),
  and the ratio achieved / limit,
* the data pipeline's share of a training step (batch slicing alone vs a full step),
* peak RSS of the process.

Usage::

    python benchmarks/speed.py                     # MMoE and Shared-Bottom, 500,000 rows
    python benchmarks/speed.py --models mmoe --rows 100000 --epochs 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch.utils.flop_counter import FlopCounterMode

from mtlrec.config import TrainingConfig
from mtlrec.data.io import read_table
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.synthetic import ctr_schema
from mtlrec.models.build import build_model
from mtlrec.train.trainer import Trainer
from mtlrec.utils.runtime import configure_runtime

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mmoe": ("mmoe", {"num_experts": 8, "expert_hidden": [256, 128], "tower_hidden": [64]}),
    "shared_bottom": ("shared_bottom", {"bottom_hidden": [256, 128], "tower_hidden": [64]}),
    "omoe": ("omoe", {"num_experts": 8, "expert_hidden": [256, 128], "tower_hidden": [64]}),
    "single_task": ("single_task", {"bottom_hidden": [256, 128], "tower_hidden": [64]}),
}


def data_file(rows: int) -> Path:
    """The benchmark table as a Parquet file (generated once, in a child process, so that the
    generator's memory is not counted in this process's peak)."""
    folder = Path(tempfile.gettempdir()) / "mtlrec-bench"
    path = folder / f"ctr-{rows}-seed0.parquet"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        code = (
            "import sys; from mtlrec.data.synthetic import make_ctr_table; "
            "from mtlrec.data.io import write_table; "
            f"write_table(make_ctr_table({rows}, seed=0), sys.argv[1])"
        )
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    return path


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GFLOP/s of an n x n matmul over a few timed rounds."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b, out=c)
        best = min(best, (time.perf_counter() - t) / 3)
    return 2 * n**3 / best / 1e9


def flops_per_sample(model: torch.nn.Module, batch) -> float:  # noqa: ANN001
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(batch.features)
    return counter.get_total_flops() / len(batch)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_model(key: str, pre: Preprocessor, ds, args: argparse.Namespace) -> dict[str, Any]:  # noqa: ANN001
    name, params = MODELS[key]
    torch.manual_seed(0)
    model = build_model(name, ds.schema, pre.table_sizes(), params)
    n_params = sum(p.numel() for p in model.parameters())
    fps = flops_per_sample(model, ds.take(slice(0, 512)))
    cfg = TrainingConfig(epochs=args.epochs, batch_size=args.batch_size,
                         eval_batch_size=args.eval_batch_size, progress=False,
                         optimizer={"name": "adam", "lr": 1e-3})
    trainer = Trainer(model, ds.schema, config=cfg)
    fit = trainer.fit(ds)
    train_sps = fit.history[-1]["samples_per_s"]
    # data pipeline share: slicing batches alone vs the measured step time
    t = time.perf_counter()
    nb = 0
    for _ in ds.batches(args.batch_size, shuffle=True, seed=1, epoch=0):
        nb += 1
        if nb == 50:
            break
    data_s = (time.perf_counter() - t) / nb
    step_s = args.batch_size / train_sps
    # inference, twice; keep the better pass
    infer = []
    for _ in range(2):
        t = time.perf_counter()
        trainer.predict(ds)
        infer.append(len(ds) / (time.perf_counter() - t))
    del trainer, model
    gc.collect()
    return {
        "model": key, "params": n_params, "flops_per_sample": fps,
        "train_samples_per_s": train_sps, "infer_samples_per_s": max(infer),
        "data_share_of_step": data_s / step_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mmoe,shared_bottom")
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--eval-batch-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = data_file(args.rows)
    t_gen = time.perf_counter() - t0
    schema = ctr_schema(embedding_dim=16)
    t0 = time.perf_counter()
    table = read_table(path)
    pre = Preprocessor.fit(schema, table, file=str(path))
    ds = pre.encode(table, file=str(path))
    t_enc = time.perf_counter() - t0
    del table
    gc.collect()
    pa.default_memory_pool().release_unused()
    configure_runtime(args.threads, True)
    peak = matmul_peak()
    rows = [bench_model(k, pre, ds, args) for k in args.models.split(",")]
    peak = max(peak, matmul_peak())  # measured before and after; the better one is the limit

    info = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "rows": args.rows, "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
        "matmul_gflops": peak, "generate_s": t_gen, "encode_s": t_enc,
        "peak_rss_mb": peak_rss_mb(),
    }
    print(f"machine: {info['machine']}")
    print(f"rows {args.rows:,}: {path.name} ready in {t_gen:.1f} s, read + fit + encode "
          f"{t_enc:.1f} s")
    print(f"fp32 matmul peak (2048^3): {peak:.1f} GFLOP/s")
    hdr = (f"{'model':<14}{'MFLOP/smp':>10}{'train/s':>10}{'limit':>9}{'ratio':>7}"
           f"{'infer/s':>10}{'limit':>9}{'ratio':>7}{'data':>7}")
    print(hdr)
    for r in rows:
        lim_tr = peak * 1e9 / (3 * r["flops_per_sample"])
        lim_inf = peak * 1e9 / r["flops_per_sample"]
        r.update(train_limit=lim_tr, infer_limit=lim_inf,
                 train_ratio=r["train_samples_per_s"] / lim_tr,
                 infer_ratio=r["infer_samples_per_s"] / lim_inf)
        print(f"{r['model']:<14}{r['flops_per_sample'] / 1e6:>10.3f}"
              f"{r['train_samples_per_s']:>10.0f}{lim_tr:>9.0f}{r['train_ratio']:>7.0%}"
              f"{r['infer_samples_per_s']:>10.0f}{lim_inf:>9.0f}{r['infer_ratio']:>7.0%}"
              f"{r['data_share_of_step']:>7.1%}")
    print(f"peak RSS: {info['peak_rss_mb']:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "models": rows}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
