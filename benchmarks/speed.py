"""Training and inference speed on a synthetic CTR-style table, against the machine's own peak.

What it measures, per model, on the user-facing path (``Trainer.fit`` / ``Trainer.predict`` over
an in-memory ``ColumnarDataset``, batching included):

* train samples/s (batch 2048, Adam; the second epoch, after warm-up),
* inference samples/s (batch 8192),
* the model's forward matmul FLOPs per sample (counted by ``torch.utils.flop_counter``),
* the machine's fp32 matmul GFLOP/s in the same run: the median of 60 timed square 2048
  matmuls, half before and half after the models (single calls vary by +-15% on a shared
  2-core VM; the median is the sustained rate, the max is printed too),
* limit = peak / FLOPs (inference) and peak / (3 x FLOPs) (training: forward + 2x backward),
  and the ratio achieved / limit,
* the data pipeline's share of a training step (batch slicing alone vs a full step),
* peak RSS of the process.

Two comparisons in the same run (``benchmarks/speed_sharded.py``):

* ``--sharded-nproc N``: each model also trained with ``model.embedding_backend: torchrec`` by N
  local processes of ``threads / N`` threads (tables sharded, dense part data-parallel), against
  the one-process torch path with all the threads (bar: >= 0.8x its train samples/s);
* ``--precisions fp32,bf16``: each model trained and scored under each ``training.precision``
  (autocast), with the CPU's native bf16 flags.

Usage::

    python benchmarks/speed.py                     # MMoE and Shared-Bottom, 500,000 rows
    python benchmarks/speed.py --models mmoe --rows 100000 --epochs 1
    python benchmarks/speed.py --models mmoe --threads 2 --sharded-nproc 2 --precisions fp32,bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _as_cli  # noqa: F401  (first: the mtlrec command's process settings)
import torch
from torch.utils.flop_counter import FlopCounterMode

from mtlrec.config import TrainingConfig
from mtlrec.data.file_encoding import encode_file, fit_file
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.synthetic import ctr_schema
from mtlrec.models.build import build_model
from mtlrec.schema import Schema, SequenceFeature, TaskSpec
from mtlrec.train.trainer import Trainer
from mtlrec.utils.runtime import configure_runtime, release_memory

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mmoe": ("mmoe", {"num_experts": 8, "expert_hidden": [256, 128], "tower_hidden": [64]}),
    "shared_bottom": ("shared_bottom", {"bottom_hidden": [256, 128], "tower_hidden": [64]}),
    "omoe": ("omoe", {"num_experts": 8, "expert_hidden": [256, 128], "tower_hidden": [64]}),
    "single_task": ("single_task", {"bottom_hidden": [256, 128], "tower_hidden": [64]}),
    "ple": (
        "ple",
        {
            "num_levels": 2,
            "experts_per_task": 2,
            "shared_experts": 2,
            "expert_hidden": [256, 128],
            "tower_hidden": [64],
        },
    ),
    "cgc": (
        "cgc",
        {
            "experts_per_task": 2,
            "shared_experts": 2,
            "expert_hidden": [256, 128],
            "tower_hidden": [64],
        },
    ),
    "ml_mmoe": (
        "ml_mmoe",
        {"num_levels": 2, "num_experts": 4, "expert_hidden": [256, 128], "tower_hidden": [64]},
    ),
    # non-gated architectures (docs/architectures.md), bottoms of the same [256, 128] widths
    "soft_sharing": ("soft_sharing", {"bottom_hidden": [256, 128], "tower_hidden": [64]}),
    "asymmetric_sharing": (
        "asymmetric_sharing",
        {"bottom_hidden": [256, 128], "tower_hidden": [64]},
    ),
    "customized_sharing": (
        "customized_sharing",
        {"shared_hidden": [256, 128], "specific_hidden": [256, 128], "tower_hidden": [64]},
    ),
    "cross_stitch": ("cross_stitch", {"bottom_hidden": [256, 128], "tower_hidden": [64]}),
    "sluice": ("sluice", {"bottom_hidden": [128, 128], "tower_hidden": [64]}),
    "stem": ("stem", {"expert_hidden": [256, 128], "tower_hidden": [64]}),
    "aitm": ("aitm", {"tower_hidden": [256, 128], "head_hidden": [64]}),
}


# models that need a behaviour sequence (MoSE) or a click -> conversion funnel (ESMM) run on the
# same table plus a 50-id history list column and the ctr / cvr / ctcvr task triple
FUNNEL_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mose": (
        "mose",
        {"num_experts": 4, "bottom_hidden": 64, "expert_hidden": 64, "tower_hidden": [64]},
    ),
    "esmm": ("esmm", {"base": "embedding", "tower_hidden": [256, 128, 64]}),
}
HIST_LEN = 50


ALL_MODELS = {**MODELS, **FUNNEL_MODELS}


def funnel_schema() -> Schema:
    """:func:`ctr_schema` plus a history sequence ``hist`` and ESMM's task triple."""
    base = ctr_schema(embedding_dim=16)
    hist = SequenceFeature(name="hist", embedding_dim=16, max_len=HIST_LEN, min_count=2)
    tasks = [
        TaskSpec(name="ctr", kind="binary", label="click"),
        TaskSpec(name="cvr", kind="binary", label="conversion", mask="click"),
        TaskSpec(name="ctcvr", kind="binary", label="conversion"),
    ]
    return Schema(features=(*base.features, hist), tasks=tuple(tasks))


def _generated(name: str, code: str) -> Path:
    """A benchmark file made once by ``code`` (Python writing ``sys.argv[1]``) in a child
    process, so that the generator's memory is not counted in this process's peak."""
    folder = Path(tempfile.gettempdir()) / "mtlrec-bench"
    path = folder / name
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    return path


def funnel_file(rows: int) -> Path:
    """:func:`data_file`'s table with a ``hist`` column of 50 Zipf-distributed item ids."""
    return _generated(
        f"ctr-hist{HIST_LEN}-{rows}-seed0.parquet",
        "import sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq; "
        "from mtlrec.data.synthetic import make_ctr_table; "
        f"n, L = {rows}, {HIST_LEN}; t = make_ctr_table(n, seed=0); "
        "ids = np.random.default_rng(0).zipf(1.3, size=n * L) % 50_000; "
        "off = pa.array(np.arange(0, n * L + 1, L, dtype=np.int32)); "
        "t = t.append_column('hist', pa.ListArray.from_arrays(off, pa.array(ids))); "
        "pq.write_table(t, sys.argv[1], row_group_size=65_536)",
    )


def data_file(rows: int) -> Path:
    """The benchmark table as a Parquet file."""
    return _generated(
        f"ctr-{rows}-seed0-rg64k.parquet",
        "import sys; from mtlrec.data.synthetic import make_ctr_table; "
        "from mtlrec.data.io import write_table; "
        f"write_table(make_ctr_table({rows}, seed=0), sys.argv[1])",
    )


def matmul_rate(n: int = 2048, repeats: int = 30) -> list[float]:
    """GFLOP/s of ``repeats`` single fp32 n x n matmuls (after a warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    return rates


def flops_per_sample(model: torch.nn.Module, batch) -> float:
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(batch.features)
    return counter.get_total_flops() / len(batch)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_model(key: str, pre: Preprocessor, ds, args: argparse.Namespace) -> dict[str, Any]:
    name, params = ALL_MODELS[key]
    torch.manual_seed(0)
    model = build_model(name, ds.schema, pre.table_sizes(), params)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = TrainingConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        progress=False,
        optimizer={"name": "adam", "lr": 1e-3, "sparse_embeddings": args.sparse_embeddings},
        precision=args.precision,
    )
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
        "model": key,
        "params": n_params,
        "train_samples_per_s": train_sps,
        "infer_samples_per_s": max(infer),
        "data_share_of_step": data_s / step_s,
    }


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One model on the user path, in this (fresh) process: read, encode, train, predict."""
    funnel = args.worker in FUNNEL_MODELS
    path = funnel_file(args.rows) if funnel else data_file(args.rows)
    schema = funnel_schema() if funnel else ctr_schema(embedding_dim=16)
    # the matmul probe's 48 MB of matrices are benchmark apparatus, not the user path: the
    # first half runs before the data is loaded, the second after the peak RSS is read
    configure_runtime(args.threads, True)  # as `mtlrec train` does before reading the data
    rates = matmul_rate()
    release_memory()
    t0 = time.perf_counter()
    pre = fit_file(schema, path)  # streamed, as `mtlrec train` reads files
    ds = encode_file(pre, path)[0]
    t_enc = time.perf_counter() - t0
    row = bench_model(args.worker, pre, ds, args)
    row["peak_rss_mb"] = peak_rss_mb()  # the user path: read, encode, train, predict
    rates += matmul_rate()
    name, params = ALL_MODELS[args.worker]
    row["flops_per_sample"] = flops_per_sample(
        build_model(name, ds.schema, pre.table_sizes(), params), ds.take(slice(0, 512))
    )
    row.update(encode_s=t_enc, matmul_rates=rates, threads=torch.get_num_threads())
    row["precision"] = args.precision
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mmoe,shared_bottom")
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--eval-batch-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "--sparse-embeddings",
        action="store_true",
        help="sparse embedding gradients and lazy updates (default: dense, as the library)",
    )
    ap.add_argument(
        "--sharded-nproc",
        type=int,
        default=0,
        help="also train each model with sharded TorchRec tables in N processes of "
        "threads/N threads (benchmarks/speed_sharded.py)",
    )
    ap.add_argument(
        "--precisions", default="fp32", help="training.precision values to run (fp32,bf16)"
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--sharded-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker and args.sharded_worker:
        from speed_sharded import run_sharded_worker

        run_sharded_worker(args, MODELS)
        return
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    t0 = time.perf_counter()
    path = data_file(args.rows)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}")
    print(
        f"data: {args.rows:,} rows ({path.name}, ready in {time.perf_counter() - t0:.1f} s); "
        f"batch {args.batch_size}, inference batch {args.eval_batch_size}"
    )
    print(
        "each model runs in a fresh process: read Parquet, fit encoders, encode, train "
        f"{args.epochs} epochs (the last is timed), predict twice (the better is kept)"
    )
    rows = []
    runs = [(k, p) for k in args.models.split(",") for p in args.precisions.split(",")]
    for key, precision in runs:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            key,
            "--rows",
            str(args.rows),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--eval-batch-size",
            str(args.eval_batch_size),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.sparse_embeddings:
            cmd.append("--sparse-embeddings")
        cmd += ["--precision", precision]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    hdr = (
        f"{'model':<14}{'MFLOP/smp':>10}{'matmul':>8}{'train/s':>9}{'limit':>8}{'ratio':>7}"
        f"{'infer/s':>9}{'limit':>8}{'ratio':>7}{'data':>6}{'RSS MB':>8}"
    )
    print(hdr)
    for r in rows:
        peak = statistics.median(r["matmul_rates"])
        lim_tr = peak * 1e9 / (3 * r["flops_per_sample"])
        lim_inf = peak * 1e9 / r["flops_per_sample"]
        r.update(
            matmul_gflops_median=peak,
            matmul_gflops_max=max(r["matmul_rates"]),
            train_limit=lim_tr,
            infer_limit=lim_inf,
            train_ratio=r["train_samples_per_s"] / lim_tr,
            infer_ratio=r["infer_samples_per_s"] / lim_inf,
        )
        print(
            f"{r['model'] + ('/' + r['precision'] if r['precision'] != 'fp32' else ''):<14}"
            f"{r['flops_per_sample'] / 1e6:>10.3f}{peak:>8.0f}"
            f"{r['train_samples_per_s']:>9.0f}{lim_tr:>8.0f}{r['train_ratio']:>7.0%}"
            f"{r['infer_samples_per_s']:>9.0f}{lim_inf:>8.0f}{r['infer_ratio']:>7.0%}"
            f"{r['data_share_of_step']:>6.1%}{r['peak_rss_mb']:>8.0f}"
        )
    print(
        "matmul = median GFLOP/s of 60 single 2048^3 fp32 matmuls in the model's process; "
        "limit = matmul / FLOPs (x3 for training); data = batch slicing's share of a step"
    )
    if "bf16" in args.precisions.split(","):
        from speed_sharded import report_precision

        report_precision(rows)
    if args.sharded_nproc > 1:
        from speed_sharded import launch, report

        total = args.threads or (os.cpu_count() or 1)
        sharded = []
        for key in args.models.split(","):
            cmd = [
                *(sys.executable, __file__, "--worker", key, "--sharded-worker"),
                *("--rows", str(args.rows), "--epochs", str(args.epochs)),
                *("--batch-size", str(args.batch_size)),
                *("--eval-batch-size", str(args.eval_batch_size)),
            ]
            per = max(1, total // args.sharded_nproc)
            sharded.append(launch(cmd, args.sharded_nproc, per))
        report(rows, sharded)
        rows += sharded
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
