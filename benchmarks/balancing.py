"""Balancing strategies: per-task test metrics and training speed relative to static weights.

Every registered strategy (``mtlrec.registry.WEIGHTINGS``) trains the same model, with the
same seed, data and optimiser, on:

* census-income (MMoE-paper task group 1: income, never married; binary, test AUC), the bundled
  file split 60/20/20 by row hash as in the demo;
* a synthetic pair of conflicting regression tasks (the MMoE paper's generator,
  ``mtlrec.data.synthetic.make_mmoe_synthetic``, with a negative weight cosine), test MSE;
  batch 128 there (``--synthetic-batch-size``), 1024 on census.

The epoch is chosen on the validation split (mean over tasks); the test split is scored once.
``samples/s`` is the mean training throughput over epochs; ``x static`` is the strategy's train
step time divided by the static strategy's (lower is faster; issue 4 asks <= 2.5 for the
gradient strategies). Timings are only comparable within one run on an otherwise idle machine.

Usage::

    python benchmarks/balancing.py [--epochs 3] [--rows 0] [--seeds 1] [--only census,synthetic]
        [--strategies static,pcgrad] [--model mmoe] [--md out.md]

``cost`` (in ``--only``) times train steps of every strategy on one census batch, interleaved, and
reports the median step time relative to static: the fairest figure on a shared machine.
``--rows N`` keeps the first N training rows (0: all) and ``--eval-rows M`` the first M census
validation and test rows, for a quick check.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import _as_cli  # noqa: F401  (first: the mtlrec command's process settings)
import numpy as np
import torch

from mtlrec.config import TrainingConfig
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.loading import load_datasets
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.synthetic import make_mmoe_synthetic, mmoe_synthetic_schema
from mtlrec.demo import DEMO_MODELS, demo_config
from mtlrec.models.build import build_model
from mtlrec.registry import WEIGHTINGS
from mtlrec.schema import Schema
from mtlrec.train.trainer import Trainer
from mtlrec.weighting import build_weighting

# strategy options used here (anything not named: the strategy's defaults)
OPTIONS: dict[str, dict[str, Any]] = {
    "dwa": {"unit": "steps", "window": 20},
}


def _head(ds: ColumnarDataset, rows: int) -> ColumnarDataset:
    return ds.subset(torch.arange(min(rows, len(ds)))) if rows else ds


def census_data(
    rows: int, eval_rows: int
) -> tuple[Schema, Preprocessor, ColumnarDataset, ColumnarDataset, ColumnarDataset]:
    data = load_datasets(demo_config("mmoe"))
    assert data.valid is not None and data.test is not None
    train = _head(data.train, rows)
    valid, test = _head(data.valid, eval_rows), _head(data.test, eval_rows)
    return data.preprocessor.schema, data.preprocessor, train, valid, test


def synthetic_data(
    rows: int, correlation: float
) -> tuple[Schema, Preprocessor, ColumnarDataset, ColumnarDataset, ColumnarDataset]:
    n_train = rows or 20_000
    n_eval = max(n_train // 4, 1000)
    parts = [
        make_mmoe_synthetic(correlation, n, seed=s, weights_seed=0)[0]
        for n, s in ((n_train, 1), (n_eval, 2), (n_eval, 3))
    ]
    schema = mmoe_synthetic_schema(parts[0].num_columns - 2)
    pre = Preprocessor.fit(schema, parts[0])
    train, valid, test = (pre.encode(t) for t in parts)
    return schema, pre, train, valid, test


def run_one(
    strategy: str,
    model_name: str,
    schema: Schema,
    pre: Preprocessor,
    data: tuple[ColumnarDataset, ColumnarDataset, ColumnarDataset],
    *,
    epochs: int,
    seed: int,
    metric: str,
    batch_size: int = 1024,
) -> dict[str, Any]:
    train, valid, test = data
    torch.manual_seed(seed)
    params = DEMO_MODELS.get(model_name, {})
    model = build_model(model_name, schema, pre.table_sizes(), params)
    weighting = build_weighting(strategy, model.loss_task_names, OPTIONS.get(strategy, {}))
    cfg = TrainingConfig(
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        progress=False,
        optimizer={"name": "adam", "lr": 0.002},  # type: ignore[arg-type]
    )
    trainer = Trainer(model, schema, config=cfg, strategy=weighting, monitor=("mean", metric))
    fit = trainer.fit(train, valid)
    metrics = trainer.evaluate(test)
    sps = [h["samples_per_s"] for h in fit.history]
    return {
        "metrics": {t: metrics[t][metric] for t in schema.task_names},
        "samples_per_s": float(np.mean(sps)),
        "best_epoch": fit.best_epoch,
    }


def step_cost(
    strategies: list[str],
    model_name: str,
    schema: Schema,
    pre: Preprocessor,
    train: ColumnarDataset,
    *,
    rounds: int,
    steps: int,
) -> dict[str, float]:
    """Median seconds per train step of each strategy on the same batch (1024 rows), the
    strategies interleaved round by round so that a busy machine slows them alike."""
    from mtlrec.train.step import StepContext, train_step

    batch = next(iter(train.batches(1024)))
    ctxs = {}
    for name in strategies:
        torch.manual_seed(0)
        model = build_model(model_name, schema, pre.table_sizes(), DEMO_MODELS.get(model_name, {}))
        weighting = build_weighting(name, model.loss_task_names, OPTIONS.get(name, {}))
        cfg = TrainingConfig(progress=False)
        trainer = Trainer(model, schema, config=cfg, strategy=weighting)
        ctxs[name] = StepContext(model, trainer.loss_fn, weighting, trainer.optimizer)
        for _ in range(2):  # warm-up (first batched backward imports torch.fx)
            train_step(ctxs[name], batch)
    times: dict[str, list[float]] = {n: [] for n in strategies}
    for _ in range(rounds):
        for name in strategies:
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(ctxs[name], batch)
            times[name].append((time.perf_counter() - t0) / steps)
    return {n: float(np.median(v)) for n, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rows", type=int, default=0)
    ap.add_argument("--eval-rows", type=int, default=0, help="census valid/test rows (0: all)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--model", default="mmoe")
    ap.add_argument("--only", default="census,synthetic,cost")
    ap.add_argument("--strategies", default=",".join(WEIGHTINGS.names()))
    ap.add_argument("--correlation", type=float, default=-0.5)
    ap.add_argument(
        "--synthetic-batch-size",
        type=int,
        default=128,
        help="batch of the synthetic runs (the MMoE paper's generator needs many small steps)",
    )
    ap.add_argument("--cost-rounds", type=int, default=5, help="rounds of the step-cost test")
    ap.add_argument("--cost-steps", type=int, default=5, help="steps per round and strategy")
    ap.add_argument("--md", default=None, help="also write the tables to this markdown file")
    args = ap.parse_args()
    strategies = args.strategies.split(",")
    if "static" in strategies:
        strategies.remove("static")
    strategies.insert(0, "static")
    lines = [
        f"machine: {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; model {args.model}, {args.epochs} epochs, "
        f"{args.seeds} seed(s), rows {args.rows or 'all'}",
        "",
    ]
    for which in args.only.split(","):
        if which == "cost":
            schema, pre, train, *_ = census_data(args.rows, 1)
            cost = step_cost(
                strategies,
                args.model,
                schema,
                pre,
                train,
                rounds=args.cost_rounds,
                steps=args.cost_steps,
            )
            lines.append(
                f"### step cost (census, {args.model}, batch 1024, median of "
                f"{args.cost_rounds} interleaved rounds of {args.cost_steps} steps)"
            )
            lines += ["", "| strategy | ms / step | x static |", "|---|---|---|"]
            for name, sec in cost.items():
                lines.append(f"| {name} | {sec * 1e3:.1f} | {sec / cost['static']:.2f} |")
            lines.append("")
            continue
        if which == "census":
            schema, pre, *data = census_data(args.rows, args.eval_rows)
            metric = "auc"
        else:
            schema, pre, *data = synthetic_data(args.rows, args.correlation)
            metric = "mse"
        tasks = schema.task_names
        results: dict[str, list[dict[str, Any]]] = {}
        for name in strategies:
            t0 = time.perf_counter()
            results[name] = [
                run_one(
                    name,
                    args.model,
                    schema,
                    pre,
                    (data[0], data[1], data[2]),
                    epochs=args.epochs,
                    seed=s,
                    metric=metric,
                    batch_size=1024 if which == "census" else args.synthetic_batch_size,
                )
                for s in range(args.seeds)
            ]
            print(f"{which} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        base_sps = float(np.mean([r["samples_per_s"] for r in results["static"]]))
        lines.append(f"### {which} (test {metric}, mean over seeds)")
        lines.append("")
        lines.append(
            "| strategy | "
            + " | ".join(f"{t} {metric}" for t in tasks)
            + " | train samples/s | step time x static |"
        )
        lines.append("|" + "---|" * (len(tasks) + 3))
        for name, rs in results.items():
            vals = [float(np.mean([r["metrics"][t] for r in rs])) for t in tasks]
            sps = float(np.mean([r["samples_per_s"] for r in rs]))
            cells = [f"{v:.4f}" for v in vals]
            lines.append(
                f"| {name} | " + " | ".join(cells) + f" | {sps:,.0f} | {base_sps / sps:.2f} |"
            )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.md:
        from pathlib import Path

        from mtlrec.utils.atomic import write_text

        write_text(Path(args.md), text + "\n")


if __name__ == "__main__":
    main()
