"""Census-income quality: test AUC per task over several seeds, epoch chosen on validation.

The demo's models and settings (``mtlrec.demo``; ``examples/census/*.yaml``): single-task
baselines (one network per task), Shared-Bottom, OMoE and MMoE on MMoE-paper task group 1
(income > 50K, never married), the bundled census file split 60/20/20 by row hash. Each model's
epoch is selected on the validation split (mean AUC of its tasks); the test split is scored once.

Usage::

    python benchmarks/census.py --seeds 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import _as_cli  # noqa: F401  (first: the mtlrec command's process settings)
import torch

from mtlrec.demo import run_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--models", default="single_task,shared_bottom,omoe,mmoe")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = run_demo(seeds=args.seeds, progress=False, models=tuple(args.models.split(",")))
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {time.perf_counter() - t0:.0f} s"
    )
    head = (
        "| model | "
        + " | ".join(f"{t} test AUC" for t in res.tasks)
        + " | "
        + " | ".join(f"gain {t}" for t in res.tasks)
        + " | best epochs |"
    )
    print(head)
    print("|" + "---|" * (2 * len(res.tasks) + 2))
    for m in res.test_auc:
        cells = [f"{res.mean(m, t):.4f} ± {res.sd(m, t):.4f}" for t in res.tasks]
        gains = ["—" if m == "single_task" else f"{res.gain(m, t):+.4f}" for t in res.tasks]
        print(f"| {m} | " + " | ".join(cells + gains) + f" | {res.best_epochs[m]} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.to_dict(), f, indent=2)


if __name__ == "__main__":
    main()
