"""The speed harness's sharded mode (``python benchmarks/speed.py --sharded-nproc N``): one
model trained with ``model.embedding_backend: torchrec`` by N local processes (gloo), against
today's one-process path with the same total number of threads.

:func:`launch` starts N copies of ``speed.py --worker MODEL --sharded-worker`` with torchrun's
environment variables; each reads and encodes the same file (as ``mtlrec train --nproc``
does), trains on its share of every global batch (:class:`~mtlrec.train.distributed.RankShard`)
and scores its share of the rows; rank 0 prints one JSON line. Samples/s are *global*: the
rows of the epoch divided by the epoch's seconds (rank 0's clock; the processes step together).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def run_sharded_worker(args: Any, models: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """One process of the group (environment from :func:`launch`)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    from speed import data_file, peak_rss_mb  # the harness's own helpers

    from mtlrec.config import ShardingConfig, TrainingConfig
    from mtlrec.data.file_encoding import encode_file, fit_file
    from mtlrec.data.synthetic import ctr_schema
    from mtlrec.models.build import build_model
    from mtlrec.train.distributed import DistContext, RankShard
    from mtlrec.train.sharded import ShardedTrainer
    from mtlrec.utils.runtime import configure_runtime, release_memory

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    configure_runtime(args.threads, True)
    dist.init_process_group("gloo")
    path = data_file(args.rows)
    schema = ctr_schema(embedding_dim=16)
    pre = fit_file(schema, path)
    ds = encode_file(pre, path)[0]
    release_memory()
    name, params = models[args.worker]
    torch.manual_seed(0)
    model = build_model(name, ds.schema, pre.table_sizes(), params, embedding_backend="torchrec")
    cfg = TrainingConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        progress=False,
        precision=args.precision,
        optimizer={"name": "adam", "lr": 1e-3},
    )
    run_dir = Path(os.environ["MTLREC_SPEED_RUN"])  # one folder for the group's checkpoints
    trainer = ShardedTrainer(
        model,
        ds.schema,
        context=DistContext(rank, world),
        sharding=ShardingConfig(),
        config=cfg,
        run_dir=run_dir,
    )
    fit = trainer.fit(RankShard(ds, rank, world))
    rec = fit.history[-1]
    infer = []
    for _ in range(2):
        dist.barrier()
        t = time.perf_counter()
        trainer.predict(ds)
        infer.append(len(ds) / (time.perf_counter() - t))
    row = {
        "model": args.worker,
        "mode": f"torchrec x{world}",
        "precision": args.precision,
        "train_samples_per_s": len(ds) / rec["seconds"],
        "infer_samples_per_s": max(infer),
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "processes": world,
        "plan": sorted({p.kind for p in trainer.plan.values()}),
    }
    dist.barrier()
    if rank == 0:
        print(json.dumps(row))
    dist.destroy_process_group()


def launch(cmd: list[str], nproc: int, threads: int) -> dict[str, Any]:
    """Run ``cmd`` (a sharded worker) in ``nproc`` processes of ``threads`` threads each; rank
    0's JSON line."""
    from mtlrec.train.distributed import host_store

    store = host_store(nproc)
    procs = []
    with tempfile.TemporaryDirectory(prefix="mtlrec-speed-") as tmp:
        for rank in range(nproc):
            env = dict(os.environ)
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(store.port),
                TORCHELASTIC_USE_AGENT_STORE="True",
                OMP_NUM_THREADS=str(threads),
                MTLREC_SPEED_RUN=str(Path(tmp) / "run"),
            )
            out = open(Path(tmp) / f"rank{rank}.out", "w")  # noqa: SIM115
            argv = [*cmd, "--threads", str(threads)]
            procs.append((subprocess.Popen(argv, env=env, stdout=out), out))
        codes = [p.wait() for p, _ in procs]
        for _, f in procs:
            f.close()
        if any(codes):
            raise SystemExit(f"sharded worker failed: exit codes {codes}")
        text = (Path(tmp) / "rank0.out").read_text().strip().splitlines()
    del store
    return json.loads(text[-1])


def report(base: list[dict[str, Any]], sharded: list[dict[str, Any]]) -> None:
    """The comparison table (bar: sharded train samples/s >= 0.8 x one process's)."""
    print(
        f"{'model':<14}{'1 proc':>12}{'train/s':>9}{'infer/s':>9}{'sharded':>14}"
        f"{'train/s':>9}{'infer/s':>9}{'train':>7}{'infer':>7}{'RSS MB':>8}"
    )
    by_model = {r["model"]: r for r in base if r.get("precision", "fp32") == "fp32"}
    for s in sharded:
        b = by_model[s["model"]]
        tr = s["train_samples_per_s"] / b["train_samples_per_s"]
        inf = s["infer_samples_per_s"] / b["infer_samples_per_s"]
        print(
            f"{s['model']:<14}{str(b['threads']) + ' thr':>12}{b['train_samples_per_s']:>9.0f}"
            f"{b['infer_samples_per_s']:>9.0f}"
            f"{str(s['processes']) + 'x' + str(s['threads']) + ' thr':>14}"
            f"{s['train_samples_per_s']:>9.0f}{s['infer_samples_per_s']:>9.0f}"
            f"{tr:>7.2f}{inf:>7.2f}{s['peak_rss_mb']:>8.0f}"
        )
        s.update(train_ratio_vs_one_process=tr, infer_ratio_vs_one_process=inf)
    print(
        "sharded = model.embedding_backend torchrec, N processes (gloo) of total/N threads, "
        "global samples/s; train and infer = sharded / one process (bar: train >= 0.80); "
        "RSS = rank 0's peak"
    )


def cpu_flags() -> list[str]:
    """The CPU's native bf16 flags (``avx512_bf16``, ``amx_bf16``) from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")})


def report_precision(rows: list[dict[str, Any]]) -> None:
    """bf16 against fp32 of the same model in the same run."""
    flags = cpu_flags()
    print(f"CPU bf16 flags: {', '.join(flags) or 'none (bf16 is emulated)'}")
    print(
        f"{'model':<14}{'fp32 train/s':>13}{'bf16 train/s':>13}{'ratio':>7}"
        f"{'fp32 infer/s':>13}{'bf16 infer/s':>13}{'ratio':>7}"
    )
    by = {(r["model"], r.get("precision", "fp32")): r for r in rows}
    for (model, prec), r in by.items():
        if prec != "bf16" or (model, "fp32") not in by:
            continue
        f = by[(model, "fp32")]
        print(
            f"{model:<14}{f['train_samples_per_s']:>13.0f}{r['train_samples_per_s']:>13.0f}"
            f"{r['train_samples_per_s'] / f['train_samples_per_s']:>7.2f}"
            f"{f['infer_samples_per_s']:>13.0f}{r['infer_samples_per_s']:>13.0f}"
            f"{r['infer_samples_per_s'] / f['infer_samples_per_s']:>7.2f}"
        )


if __name__ == "__main__":
    sys.exit("run benchmarks/speed.py --sharded-nproc N")
