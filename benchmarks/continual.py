"""The daily loop, measured: warm start against retraining, on a log with drift.

Writes a daily click log (:func:`mtlrec.data.synthetic.daily.make_daily_ctr`: new items every
day taking the traffic, old ones fading, category appeal drifting) of ``--days + 1`` days, one
Parquet file per day. Day 1 is trained from scratch; then for every later day ``d``:

* **(a) warm**: starts from day ``d-1``'s warm run (``training.init_from``) and trains on day
  ``d`` only (vocabularies grown, the Adam state carried: ``--warm-optimizer carry``; with a
  fresh state the first steps move every weight by about the learning rate, and the rarer
  conversion task lost 0.009 AUC against (b) in a trial);
* **(b) all days**: trains from scratch on days ``1..d`` (one file of all of them);
* **(c) one day**: trains from scratch on day ``d`` only;

and evaluates each on day ``d+1`` (every row of it: the model's next day). Reported per day:
next-day AUC per task, the wall time of each run (``train_run``: reading and encoding the data,
growing the vocabularies, training, validation), and the OOV rate of every feature of day
``d+1`` under each run's vocabularies. The bar (issue 14): (a)'s next-day AUC within 0.002 of
(b)'s, averaged over the days, at no more than a third of (b)'s time on the last day.

Every run uses the same model (MMoE), batch size, learning rate and the same rule for epochs:
at most ``--epochs``, the best by the validation AUC averaged over the tasks (10% of the run's
training rows), early stopping after one epoch without improvement.

Usage::

    python benchmarks/continual.py --days 7 --rows-per-day 100000 --seeds 0 1 2 \\
        --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import _as_cli  # noqa: F401  (first: the mtlrec command's process settings)
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtlrec.analysis.drift import oov_rates
from mtlrec.config import ExperimentConfig
from mtlrec.data.file_encoding import encode_file
from mtlrec.data.synthetic.daily import daily_ctr_schema, make_daily_ctr
from mtlrec.errors import DataWarning
from mtlrec.train.run import load_run, train_run

TASKS = ("click", "conversion")
SCHEMES = ("a", "b", "c")


def write_days(folder: Path, days: int, rows: int, seed: int) -> None:
    """``day{d}.parquet`` for d in 1..days, and ``upto{d}.parquet`` (days 1..d) for d >= 2."""
    log = make_daily_ctr(days, rows, seed=seed)
    day = log.column("day")
    parts = []
    for d in range(1, days + 1):
        part = log.filter(pc.equal(day, d))
        pq.write_table(part, folder / f"day{d}.parquet")
        parts.append(part)
        if d >= 2:
            pq.write_table(pa.concat_tables(parts), folder / f"upto{d}.parquet")


def config(args: argparse.Namespace, train: Path, out: Path, init: Path | None) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "data": {"train": str(train), "split": {"fractions": [0.9, 0.1, 0.0], "seed": 0}},
            "schema": json.loads(daily_ctr_schema(embedding_dim=args.dim).to_json()),
            "model": {
                "name": "mmoe",
                "params": {"num_experts": 4, "expert_hidden": [64], "tower_hidden": [32]},
            },
            "training": {
                "epochs": args.epochs_warm if init is not None else args.epochs,
                "batch_size": args.batch_size,
                "optimizer": {"lr": args.lr_warm if init is not None else args.lr},
                "early_stopping": {"patience": 1},
                "monitor": args.monitor,
                "progress": False,
                "num_threads": args.threads,
                "init_from": None if init is None else str(init),
                "init_optimizer": args.warm_optimizer,
            },
            "output_dir": str(out),
        }
    )


def evaluate(run: Path, data: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Next-day AUC per task and OOV rate per feature of ``data`` under the run."""
    loaded = load_run(run)
    ds = encode_file(loaded.preprocessor, data, targets=True)[0]
    metrics = loaded.trainer().evaluate(ds)
    return {t: float(metrics[t]["auc"]) for t in TASKS}, oov_rates(ds)


def run_one(cfg: ExperimentConfig) -> tuple[Path, float]:
    t0 = time.perf_counter()
    res = train_run(cfg, overwrite=True)
    return res.path, time.perf_counter() - t0


def _seed_tables(res: dict[str, Any]) -> list[str]:
    rows = res["days"]
    out = [
        "| day → eval | (a) click | (b) click | (c) click | (a) conv | (b) conv | (c) conv | "
        "(a) s | (b) s | (c) s | epochs a/b/c |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        auc = [f"{r[s]['auc'][t]:.4f}" for t in TASKS for s in SCHEMES]
        secs = [f"{r[s]['seconds']:.1f}" for s in SCHEMES]
        ep = "/".join(str(r[s]["epochs"]) for s in SCHEMES)
        out.append(f"| {r['day']} → {r['day'] + 1} | " + " | ".join([*auc, *secs, ep]) + " |")
    mean = {(s, t): np.mean([r[s]["auc"][t] for r in rows]) for s in SCHEMES for t in TASKS}
    out.append(
        "| mean | " + " | ".join(f"{mean[s, t]:.4f}" for t in TASKS for s in SCHEMES) + " | | | | |"
    )
    feats = list(rows[0]["a"]["oov"])
    out += [
        "",
        "OOV rate of the evaluated day under the run's vocabularies ((a) and (b) both saw days "
        "1..d; (c) day d only):",
        "",
        "| eval day | "
        + " | ".join(f"{f} (a, b)" for f in feats)
        + " | "
        + " | ".join(f"{f} (c)" for f in feats)
        + " |",
        "|---|" + "---|" * (2 * len(feats)),
    ]
    for r in rows:
        vals = [f"{r[s]['oov'][f]:.2%}" for s in ("a", "c") for f in feats]
        out.append(f"| {r['day'] + 1} | " + " | ".join(vals) + " |")
    g = res["mean_auc_gap_a_minus_b"]
    out += [
        "",
        f"Seed {res['seed']}: mean next-day AUC (a) − (b): click {g['click']:+.4f}, conversion "
        f"{g['conversion']:+.4f}; last day (a)/(b) time {res['last_day_time_ratio_a_over_b']:.2f}"
        f"; {res['total_seconds']:.0f} s.",
    ]
    return out


def markdown(result: dict[str, Any]) -> str:
    """The result as Markdown: per seed, next-day AUC and wall time per day and OOV rates;
    then the bar over the seeds."""
    out: list[str] = []
    for res in result["seeds"]:
        out += [f"Seed {res['seed']}:", "", *_seed_tables(res), ""]
    gap = result["mean_auc_gap_a_minus_b"]
    out.append(
        f"Over {len(result['seeds'])} seed(s): mean next-day AUC (a) − (b) click "
        f"{gap['click']:+.4f}, conversion {gap['conversion']:+.4f} (bar: ≥ −0.002); last day "
        f"(a)/(b) time, worst seed {result['last_day_time_ratio_a_over_b']:.2f} (bar: ≤ 0.33). "
        f"Bar met: {'yes' if result['bar_met'] else 'no'}. Total {result['total_seconds']:.0f} s."
    )
    return "\n".join(out)


def run_seed(args: argparse.Namespace, seed: int, folder: Path) -> dict[str, Any]:
    """Day 1, then (a), (b), (c) for every later day, on the log of ``seed``."""
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_days(folder, args.days + 1, args.rows_per_day, seed)
    runs = folder / "runs"
    prev, t_first = run_one(config(args, folder / "day1.parquet", runs / "day1", None))
    rows: list[dict[str, Any]] = []
    for d in range(2, args.days + 1):
        day, nxt = folder / f"day{d}.parquet", folder / f"day{d + 1}.parquet"
        cfgs = {
            "a": config(args, day, runs / f"a{d}", prev),
            "b": config(args, folder / f"upto{d}.parquet", runs / f"b{d}", None),
            "c": config(args, day, runs / f"c{d}", None),
        }
        row: dict[str, Any] = {"day": d}
        for s, cfg in cfgs.items():
            path, secs = run_one(cfg)
            auc, oov = evaluate(path, nxt)
            epochs = json.loads((path / "summary.json").read_text())["epochs_run"]
            row[s] = {"auc": auc, "seconds": secs, "oov": oov, "epochs": epochs}
            if s == "a":
                prev = path
        rows.append(row)
        print(
            f"seed {seed} day {d}: "
            + "  ".join(
                f"({s}) click {row[s]['auc']['click']:.4f} conv {row[s]['auc']['conversion']:.4f}"
                f" {row[s]['seconds']:.1f}s"
                for s in SCHEMES
            ),
            flush=True,
        )
    gap = {t: float(np.mean([r["a"]["auc"][t] - r["b"]["auc"][t] for r in rows])) for t in TASKS}
    return {
        "seed": seed,
        "day1_seconds": t_first,
        "days": rows,
        "mean_auc_gap_a_minus_b": gap,
        "last_day_time_ratio_a_over_b": rows[-1]["a"]["seconds"] / rows[-1]["b"]["seconds"],
        "total_seconds": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--days", type=int, default=7, help="days trained (one more is evaluated)")
    p.add_argument("--rows-per-day", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=3, help="most epochs of a run from scratch")
    p.add_argument("--epochs-warm", type=int, default=3, help="most epochs of a warm run")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--lr-warm", type=float, default=None, help="(a)'s rate (default --lr)")
    p.add_argument(
        "--warm-optimizer",
        choices=["reset", "carry"],
        default="carry",
        help="(a)'s optimiser state (training.init_optimizer)",
    )
    p.add_argument("--monitor", default="mean/auc", help="what selects a run's best epoch")
    p.add_argument("--dim", type=int, default=8, help="embedding width")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one log per seed")
    p.add_argument("--out", type=Path, default=Path("continual-bench"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    args = p.parse_args()
    if args.lr_warm is None:
        args.lr_warm = args.lr
    warnings.simplefilter("ignore", DataWarning)  # the empty test split of every run
    t0 = time.perf_counter()
    per_seed = [run_seed(args, seed, args.out / f"seed{seed}") for seed in args.seeds]
    gap = {t: float(np.mean([r["mean_auc_gap_a_minus_b"][t] for r in per_seed])) for t in TASKS}
    ratio = max(r["last_day_time_ratio_a_over_b"] for r in per_seed)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "seeds": per_seed,
        "mean_auc_gap_a_minus_b": gap,
        "last_day_time_ratio_a_over_b": ratio,
        "bar_met": all(g >= -0.002 for g in gap.values()) and ratio <= 1 / 3,
        "total_seconds": time.perf_counter() - t0,
    }
    text = markdown(result)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
