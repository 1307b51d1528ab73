"""Shared pieces of the sharded-training tests: data, configs, and the per-process worker
that trains the same model under several sharding plans in one process group."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from mtlrec.config import OptimizerConfig, ShardingConfig, TrainingConfig
from mtlrec.data.preprocess import Preprocessor
from mtlrec.testing import tiny_schema, tiny_table

# 5 batches an epoch, the last one of 27 rows: 13 and 14 rows in two processes (a filler row)
ROWS, BATCH, EPOCHS = 155, 32, 4  # 20 steps
DIM = 8  # column-wise: two shards of 4 columns
PLANS: dict[str, dict[str, str]] = {
    "row_wise": {"user": "row_wise", "item": "row_wise"},
    "table_wise": {},  # the size rule: both tables are small, one per process
    "column_wise": {"user": "column_wise", "item": "column_wise"},
}
MODEL = {"num_experts": 2, "expert_hidden": [8]}


def data() -> tuple[Preprocessor, Any]:
    """The tiny schema with 8-wide tables (``item`` shared with the ``hist`` sequence) and a
    masked regression task (``watch`` on clicked rows)."""
    schema = tiny_schema(dim=DIM)
    table = tiny_table(ROWS, seed=5)
    pre = Preprocessor.fit(schema, table)
    return pre, pre.encode(table)


def training(**kw: Any) -> TrainingConfig:
    base: dict[str, Any] = dict(
        epochs=EPOCHS,
        batch_size=BATCH,
        eval_batch_size=40,
        inference_block_rows=40,
        progress=False,
        seed=3,
        optimizer=OptimizerConfig(name="sgd", lr=0.2),
    )
    base.update(kw)
    return TrainingConfig(**base)


def strategy(name: str, tasks: tuple[str, ...]) -> Any:
    from mtlrec.weighting.build import build_weighting

    return build_weighting(name, list(tasks), {})


def sharded_run(
    run_dir: Path, plan: dict[str, str], strategy_name: str, context: Any, **kw: Any
) -> dict[str, Any]:
    """Train the torchrec model once; return the per-epoch losses, the final dense weights,
    the whole tables (gathered from the last checkpoint) and the metrics of the data."""
    from mtlrec.models import build_model
    from mtlrec.train.checkpoint import load_checkpoint
    from mtlrec.train.distributed import RankShard
    from mtlrec.train.shard_checkpoint import ShardSet, gather_tables
    from mtlrec.train.sharded import ShardedTrainer

    pre, ds = data()
    torch.manual_seed(0)
    model = build_model("mmoe", ds.schema, pre.table_sizes(), MODEL, embedding_backend="torchrec")
    sharding = ShardingConfig(tables=plan, optimizer=kw.pop("table_optimizer", "sgd"))
    trainer = ShardedTrainer(
        model,
        ds.schema,
        context=context,
        sharding=sharding,
        config=training(**kw),
        strategy=strategy(strategy_name, model.loss_task_names),
        run_dir=run_dir,
    )
    world = trainer.context.world_size
    train = RankShard(ds, trainer.context.rank, world) if world > 1 else ds
    result = trainer.fit(train, None)
    metrics = trainer.evaluate(ds)
    preds = trainer.predict(ds)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    tables = gather_tables(ShardSet(run_dir / "checkpoints", ckpt.meta["shards"]))
    return {
        "losses": [r["train_loss"] for r in result.history],
        "dense": ckpt.model,
        "tables": tables,
        "metrics": metrics,
        "preds": preds,
        "plan": {k: [p.kind, list(p.ranks)] for k, p in trainer.plan.items()},
    }


def worker(rank: int, world: int, port: int, out: str, cases: list[tuple[str, str, str]]) -> None:
    """One process of a 2-process group: every (plan, strategy, table optimiser) case in turn;
    rank 0 saves the results."""
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from mtlrec.train.distributed import DistContext

        ctx = DistContext(rank, world)
        results = {}
        for plan, strat, opt in cases:
            run_dir = Path(out).parent / f"{plan}-{strat}-{opt}"
            results[f"{plan}/{strat}/{opt}"] = sharded_run(
                run_dir, PLANS[plan], strat, ctx, table_optimizer=opt
            )
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # nobody leaves while another finishes (see distributed.shutdown)
    finally:
        dist.destroy_process_group()


def dumps(x: Any) -> str:
    return json.dumps(x, sort_keys=True)
