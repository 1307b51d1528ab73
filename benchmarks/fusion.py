"""Score fusion on held-out census-income predictions: equal weights vs every searcher vs
LightGBM vs the neural fusion layer.

An MMoE is trained on census-income (MMoE paper task group 1: income > 50K, never married;
``examples/census/mmoe.yaml``), or an existing run is reused (``--run``). Every fusion is fitted
on the *validation* split's predictions and reported on the *test* split: the objective
``sum_t c_t * AUC_t(fused score)``, each task's AUC and the fitting time. The two tasks pull
in opposite directions (young people are rarely high earners), so the per-task AUCs trade off
and the objective's coefficients decide the point of the Pareto front.

Usage::

    python benchmarks/fusion.py [--run runs/census-mmoe] [--epochs 4] [--budget 200] \
        [--objective income:2,never_married:1] [--md out.md]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import _as_cli  # noqa: F401  (first: the mtlrec command's process settings)
import numpy as np
import torch

from mtlrec.config import ExperimentConfig
from mtlrec.fusion import (
    FusionObjective,
    ProductParams,
    RankFusion,
    RankParams,
    SumParams,
    WeightedProduct,
    WeightedSum,
    business_label,
    fit_lgbm,
    fit_neural,
    search_fusion,
)
from mtlrec.fusion.heldout import run_predictions
from mtlrec.train.run import load_run, train_run

ROOT = Path(__file__).resolve().parents[1]


def _objective_spec(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in (p.split(":") for p in text.split(","))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="census run folder: reused, or trained there")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--objective", default="income:2,never_married:1")
    ap.add_argument("--md", default=None, help="write the table here too")
    args = ap.parse_args()
    t_all = time.perf_counter()
    run_dir = Path(args.run or Path(tempfile.mkdtemp(prefix="fusion-bench-")) / "mmoe")
    if not (run_dir / "summary.json").is_file():  # train (or finish training) the run there
        cfg = ExperimentConfig.load(
            ROOT / "examples" / "census" / "mmoe.yaml",
            [f"training.epochs={args.epochs}", "training.progress=false"],
        )
        train_run(cfg, output_dir=run_dir)
    train_s = time.perf_counter() - t_all
    loaded = load_run(run_dir)
    valid, test = run_predictions(loaded, "valid"), run_predictions(loaded, "test")
    coefs = _objective_spec(args.objective)
    tasks = list(coefs)
    ov = FusionObjective(valid.labels, coefs, masks=valid.masks)
    ot = FusionObjective(test.labels, coefs, masks=test.masks)
    expr = " + ".join(f"{c:g}*{t}" for t, c in coefs.items())

    rows: list[tuple[str, Any, float]] = []  # name, fusion, fit seconds
    ones = dict.fromkeys(tasks, 1.0)
    product = WeightedProduct(ProductParams(exponents=ones))
    rows.append(("equal weights (product)", product, 0.0))
    rows.append(("equal weights (sum)", WeightedSum(SumParams(weights=ones)), 0.0))
    for t in tasks:
        rows.append((f"{t} score only", WeightedSum(SumParams(weights={t: 1.0})), 0.0))
    for method in ("grid", "random", "cem", "es", "tpe", "cmaes"):
        r = search_fusion(
            product, valid.probs, ov, method=method, budget=args.budget, seed=args.seed
        )
        rows.append((f"product, {method}", r.fusion, r.seconds))
    logit_sum = WeightedSum(SumParams(weights=ones, transform="logit"))
    r = search_fusion(logit_sum, valid.probs, ov, method="cem", budget=args.budget, seed=args.seed)
    rows.append(("sum of logits, cem", r.fusion, r.seconds))
    rank = RankFusion(RankParams(weights=ones))
    rows.append(("rank (100 buckets), equal weights", rank, 0.0))
    r = search_fusion(rank, valid.probs, ov, method="cem", budget=args.budget, seed=args.seed)
    rows.append(("rank (100 buckets), cem", r.fusion, r.seconds))
    p = np.stack([valid.probs[t] for t in tasks], 1)
    y = business_label(expr, valid.labels)
    t0 = time.perf_counter()
    lg = fit_lgbm(p, y, tasks, seed=args.seed)
    rows.append(
        (
            f"LightGBM ({lg.params.objective}, {lg.booster.num_trees()} trees)",
            lg,
            time.perf_counter() - t0,
        )
    )
    t0 = time.perf_counter()
    nf = fit_neural(p, y, tasks, seed=args.seed)
    rows.append(("neural fusion (monotone, 16 hidden)", nf, time.perf_counter() - t0))

    metric = "AUC"
    head = (
        "| fusion | objective valid | objective test | "
        + " | ".join(f"{t} test {metric}" for t in tasks)
        + " | fit s |"
    )
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    for name, f, secs in rows:
        vals = []
        for obj, h in ((ov, valid), (ot, test)):
            m = obj.per_task(np.asarray(f({t: h.probs[t] for t in f.tasks})))
            vals.append((obj.value(m)[0], m))
        (v_valid, _), (v_test, m_test) = vals
        lines.append(
            f"| {name} | {v_valid:.4f} | {v_test:.4f} | "
            + " | ".join(f"{x:.4f}" for x in m_test)
            + f" | {secs:.2f} |"
        )
    text = "\n".join(
        [
            f"objective = {' + '.join(f'{c:g}*AUC({t})' for t, c in coefs.items())}; fitted on "
            f"{valid.name} ({len(valid)} rows), reported on {test.name} ({len(test)} rows); "
            f"budget {args.budget} evaluations per searcher, seed {args.seed}; LightGBM/neural "
            f"label `{expr}`",
            "",
            *lines,
            "",
            f"machine: {platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; model training {train_s:.0f} s, "
            f"total {time.perf_counter() - t_all:.0f} s",
        ]
    )
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
