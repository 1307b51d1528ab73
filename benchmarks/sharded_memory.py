"""Memory of sharded tables: a model whose largest table does not fit one process's budget
trains on N processes (``model.embedding_backend: torchrec``, the table split by rows).

The model: an MMoE over a ``big`` sparse feature (``--rows`` x ``--dim`` fp32, 20M x 16 =
1.2 GiB by default), a small one and 4 dense values, two tasks (``conversion`` masked by
``click``), trained by :class:`mtlrec.train.sharded.ShardedTrainer` with row-wise Adagrad on the
tables and Adam on the dense part, ``--steps`` steps of a ``--batch``-row global batch of random
ids, then a checkpoint (every process writes its shard).

Memory is the resident set of each process (``/proc/self/status``): the *baseline* after torch,
torchrec and the process group are loaded (the fixed overhead of any process), then the peak
(``VmHWM``, reset at the baseline) over building the model on ``meta``, sharding, filling the
shards, training and checkpointing. A process passes when ``peak - baseline`` stays under
``--cap-gb`` although the whole table is larger than the cap (checked first).

Usage::

    python benchmarks/sharded_memory.py                          # 20M x 16, 2 processes, 1 GiB
    python benchmarks/sharded_memory.py --rows 200000 --cap-gb 0.01 --steps 5   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import _as_cli  # noqa: F401  (first: the mtlrec command's process settings)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


class RandomBatches:
    """This process's share of ``steps`` global batches of random ids (a BatchSource)."""

    def __init__(self, rows: int, small: int, batch: int, rank: int, world: int, steps: int):
        self.rows, self.small, self.batch = rows, small, batch
        self.rank, self.world, self.steps = rank, world, steps
        self.has_targets = True

    def __len__(self) -> int:
        return self.steps * self.batch

    def num_batches(self, batch_size: int) -> int:
        return self.steps

    def batches(self, batch_size: int, *, start: int = 0, **_: Any) -> Any:
        from mtlrec.batch import Batch, Features

        n = self.batch // self.world
        for step in range(start, self.steps):
            g = torch.Generator().manual_seed(1000 * step + self.rank)
            big = torch.randint(2, self.rows, (n,), generator=g, dtype=torch.int32)
            small = torch.randint(2, self.small, (n,), generator=g, dtype=torch.int32)
            dense = torch.randn(n, 4, generator=g)
            click = (torch.rand(n, generator=g) < 0.3).float()
            conv = (torch.rand(n, generator=g) < 0.3).float() * click
            features = Features(
                torch.stack([big, small], 1), dense, {}, ("big", "small"), ("d0", "d1", "d2", "d3")
            )
            ones = torch.ones(n)
            yield Batch(
                features,
                {"click": click, "conversion": conv},
                {"click": ones.bool(), "conversion": click.bool()},
                {"click": ones, "conversion": ones},
            )


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torchrec  # noqa: F401  (the fixed overhead: loaded before the baseline)

    from mtlrec.config import ShardingConfig, TrainingConfig
    from mtlrec.models import build_model
    from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec
    from mtlrec.train.distributed import DistContext
    from mtlrec.train.sharded import ShardedTrainer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = _status_mb("VmRSS")
    schema = Schema(
        features=(
            SparseFeature(name="big", embedding_dim=args.dim),
            SparseFeature(name="small", embedding_dim=args.dim),
            *(DenseFeature(name=f"d{i}") for i in range(4)),
        ),
        tasks=(
            TaskSpec(name="click", kind="binary"),
            TaskSpec(name="conversion", kind="binary", mask="click"),
        ),
    )
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(
        "mmoe",
        schema,
        {"big": args.rows, "small": 1000},
        {"num_experts": 4, "expert_hidden": [64], "tower_hidden": [32]},
        embedding_backend="torchrec",
    )
    run_dir = Path(out).parent / "run"
    trainer = ShardedTrainer(
        model,
        schema,
        context=DistContext(rank, world),
        sharding=ShardingConfig(row_wise_min_rows=args.row_wise_min_rows),
        config=TrainingConfig(epochs=1, batch_size=args.batch, progress=False),
        run_dir=run_dir,
    )
    built = time.perf_counter() - t0
    after_build = _status_mb("VmHWM")
    data = RandomBatches(args.rows, 1000, args.batch, rank, world, args.steps)
    fit = trainer.fit(data)  # ends with a checkpoint: this process writes its shard
    rec = fit.history[-1]
    shard_rows = sum(
        sizes[0] * sizes[1]
        for m in trainer.collections.values()
        for pieces in m.local_shards().values()
        for _, _, sizes, _ in pieces
    )
    result = {
        "rank": rank,
        "baseline_mb": baseline,
        "peak_mb": _status_mb("VmHWM"),
        "peak_after_build_mb": after_build,
        "local_table_mb": shard_rows * 4 / 2**20,
        "build_seconds": built,
        "train_seconds": rec["seconds"],
        "loss_first_epoch": rec["train_loss"],
        "plan": {k: [p.kind, list(p.ranks)] for k, p in trainer.plan.items()},
    }
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000_000, help="rows of the big table")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--cap-gb", type=float, default=1.0, help="budget per process (GiB)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4096, help="global batch")
    ap.add_argument("--row-wise-min-rows", type=int, default=1_000_000)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    table_mb = args.rows * args.dim * 4 / 2**20
    cap_mb = args.cap_gb * 1024
    print(
        f"big table {args.rows:,} x {args.dim} fp32 = {table_mb:.0f} MB; budget {cap_mb:.0f} MB "
        f"per process; {args.nproc} processes (gloo), {args.steps} steps of {args.batch} rows"
    )
    if table_mb <= cap_mb:
        print("error: the table fits the budget; nothing to show", file=sys.stderr)
        return 2
    from mtlrec.utils.runtime import free_port

    with tempfile.TemporaryDirectory(prefix="mtlrec-shardmem-") as tmp:
        out = str(Path(tmp) / "result")
        mp.start_processes(
            worker,
            args=(args.nproc, free_port(), args, out),
            nprocs=args.nproc,
            join=True,
            start_method="spawn",
        )
        rows = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(args.nproc)]
    print(f"plan: {rows[0]['plan']}")
    print(f"{'rank':>4}{'baseline MB':>13}{'peak MB':>9}{'peak-base':>11}{'shard MB':>10}{'ok':>4}")
    ok = True
    for r in rows:
        used = r["peak_mb"] - r["baseline_mb"]
        r["ok"] = used <= cap_mb
        ok &= r["ok"]
        print(
            f"{r['rank']:>4}{r['baseline_mb']:>13.0f}{r['peak_mb']:>9.0f}{used:>11.0f}"
            f"{r['local_table_mb']:>10.0f}{'yes' if r['ok'] else 'NO':>4}"
        )
    print(
        "baseline = resident set after torch, torchrec and the process group (fixed "
        "overhead); peak over building on meta, sharding, filling, training, checkpointing"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ranks": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
