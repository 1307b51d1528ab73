"""CVR sample selection bias on a synthetic funnel where the true CVR of every row is known.

For each seed: a training table of ``make_funnel_table`` (impression -> click -> action ->
purchase; the hidden model is fixed by ``--model-seed``, the rows by the seed) and a separate
evaluation table of the same world. Each model trains on the funnel schema (``ctr``, ``ctavr``,
``cvr`` masked by click, ``ctcvr``; ``funnel_schema``) and predicts the CVR of every evaluation
row. Reported, per model, mean ± sd over seeds:

* bias of the predicted CVR on non-clicked rows: mean predicted CVR minus mean true CVR there
  (ESMM's and ESM²'s entire-space CVR against MMoE's and DBMTL's CVR trained on clicked rows);
* the same on clicked rows, the mean absolute error on non-clicked rows, the CVR AUC on clicked
  rows (label: purchase) and the CTCVR AUC on all rows.

Usage::

    python benchmarks/funnel_bias.py --seeds 3 --epochs 4 --rows 100000 --output runs/funnel \
        --json runs/funnel/bias.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import _as_cli  # noqa: F401  (first: the mtlrec command's process settings)
import numpy as np
import pyarrow.parquet as pq

from mtlrec.config import ExperimentConfig
from mtlrec.data.synthetic import funnel_schema, make_funnel_table
from mtlrec.metrics.ranking import auc
from mtlrec.train.run import load_run, train_run

PARAMS: dict[str, dict[str, Any]] = {
    "esmm": {"base": "embedding", "tower_hidden": [64, 32]},
    "esm2": {"base": "embedding", "tower_hidden": [64, 32]},
    "dbmtl": {"bottom_hidden": [64], "tower_hidden": [32]},
    "mmoe": {"num_experts": 4, "expert_hidden": [64], "tower_hidden": [32]},
}
METRICS = ("bias_nonclicked", "bias_clicked", "mae_nonclicked", "cvr_auc_clicked", "ctcvr_auc")


def run_one(model: str, seed: int, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    train = folder / f"train-s{seed}.parquet"
    if not train.is_file():
        pq.write_table(make_funnel_table(args.rows, seed=seed, model_seed=args.model_seed), train)
    cfg = ExperimentConfig.from_dict(
        {
            "data": {"train": str(train), "split": {"fractions": [0.8, 0.2, 0.0], "seed": seed}},
            "schema": json.loads(funnel_schema(8).to_json()),
            "model": {"name": model, "params": PARAMS[model]},
            "training": {
                "epochs": args.epochs,
                "batch_size": 512,
                "optimizer": {"name": "adam", "lr": 0.002},
                "monitor": "ctcvr/auc",
                "seed": seed,
                "progress": False,
                "num_threads": 1,
            },
            "output_dir": str(folder / f"{model}-s{seed}"),
        }
    )
    run = train_run(cfg, overwrite=True).path
    ev = make_funnel_table(args.eval_rows, seed=10_000 + seed, model_seed=args.model_seed)
    loaded = load_run(run)
    pred = loaded.trainer().predict(loaded.preprocessor.encode(ev, targets=False))
    col = {c: ev.column(c).to_numpy() for c in ("click", "buy", "true_cvr")}
    nc, cl = col["click"] == 0, col["click"] == 1
    cvr, truth = pred["cvr"].astype(np.float64), col["true_cvr"].astype(np.float64)
    return {
        "bias_nonclicked": float(cvr[nc].mean() - truth[nc].mean()),
        "bias_clicked": float(cvr[cl].mean() - truth[cl].mean()),
        "mae_nonclicked": float(np.abs(cvr[nc] - truth[nc]).mean()),
        "cvr_auc_clicked": float(auc(cvr[cl], col["buy"][cl])),
        "ctcvr_auc": float(auc(pred["ctcvr"], col["buy"])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="esmm,esm2,dbmtl,mmoe")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--eval-rows", type=int, default=50_000)
    ap.add_argument("--model-seed", type=int, default=0)
    ap.add_argument("--output", default="runs/funnel-bias")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict[str, dict[str, list[float]]] = {}
    for seed in range(args.seeds):
        for model in args.models.split(","):
            r = run_one(model, seed, args, folder)
            print(model, seed, {k: round(v, 4) for k, v in r.items()}, flush=True)
            for k, v in r.items():
                res.setdefault(model, {}).setdefault(k, []).append(v)
    print(f"{time.perf_counter() - t0:.0f} s")
    print("| model | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for model, m in res.items():
        cells = [f"{np.mean(m[k]):+.4f} ± {np.std(m[k], ddof=1):.4f}" for k in METRICS]
        print(f"| {model} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": res}, indent=2))


if __name__ == "__main__":
    main()
