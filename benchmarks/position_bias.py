"""Position bias: the shallow bias tower vs position as an ordinary feature vs no position.

Data: ``make_position_bias_table`` (``mtlrec synth ctr --position-bias``): requests of 10
impressions ranked by an informed, promotion-biased logging ranker; clicks depend on the true
relevance and on the position (and device); every row carries its true relevance ``true_ctr``
and an unbiased click label ``relevant ~ Bernoulli(true_ctr)`` drawn apart from ``click``.
The requests are split 80/20 into training and test rows (by request).

Models (the same MMoE, one task ``click``, trained on the biased clicks, fixed epochs):

* ``bias tower``: position and device are ``role: bias`` features read by a shallow tower
  (``bias_tower``, 10% feature drop-out); scored without them (the tower dropped).
* ``position as a feature``: position and device are ordinary inputs; scored with every test
  row put at position 0 on device 0, as practitioners do; ``(position missing)``: scored with
  them absent (the OOV id), for reference.
* ``no position``: position and device are not read at all.
* ``(oracle: true_ctr)``: the true relevance itself, the ceiling of every figure.

Quality of the position-free ranking on the test rows:

* ``relevance AUC``: AUC of the score against the unbiased labels ``relevant``;
* ``true-CTR AUC``: the expected value of that AUC under the true relevance (each row counted
  as a positive with weight ``true_ctr`` and as a negative with weight ``1 - true_ctr``);
* ``request AUC``: the mean over requests of the true-CTR AUC within the request (how well the
  10 candidates of one request are ordered);
* ``click AUC``: against the observed (position-biased) clicks, for context.

Usage::

    python benchmarks/position_bias.py [--rows 100000] [--seeds 0,1,2] [--epochs 3] [--md out.md]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import _as_cli  # noqa: F401  (first: the mtlrec command's process settings)
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from sklearn.metrics import roc_auc_score

from mtlrec.config import TrainingConfig
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.synthetic import make_position_bias_table, position_bias_schema
from mtlrec.models import build_model
from mtlrec.train.trainer import Trainer

POSITIONS = 10
MODEL = "mmoe"
PARAMS = {"num_experts": 4, "expert_hidden": [64, 32], "tower_hidden": [16]}
TOWER = {"tasks": ["click"], "features": ["position", "device"], "hidden": [16], "dropout": 0.1}
VARIANTS = (
    "bias tower",
    "position as a feature",
    "(position missing)",
    "no position",
    "(oracle: true_ctr)",
)


def soft_auc(score: np.ndarray, p: np.ndarray) -> float:
    """AUC with every row a positive of weight ``p`` and a negative of weight ``1 - p``."""
    y = np.r_[np.ones(len(p)), np.zeros(len(p))]
    return float(roc_auc_score(y, np.r_[score, score], sample_weight=np.r_[p, 1.0 - p]))


def request_auc(score: np.ndarray, p: np.ndarray, request: np.ndarray) -> float:
    """Mean over requests of the pairwise ordering accuracy weighted by the true relevance
    gap: ``sum_(i,j) [s_i > s_j] (p_i - p_j)+ / sum_(i,j) (p_i - p_j)+`` within a request."""
    order = np.argsort(request, kind="stable")
    s, q, r = score[order], p[order], request[order]
    starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    ends = np.r_[starts[1:], len(r)]
    vals = []
    for a, b in zip(starts, ends, strict=True):
        ds = s[a:b, None] - s[None, a:b]  # [K, K]
        dp = q[a:b, None] - q[None, a:b]
        w = np.clip(dp, 0, None)
        if w.sum() > 0:
            vals.append(float((w * ((ds > 0) + 0.5 * (ds == 0))).sum() / w.sum()))
    return float(np.mean(vals))


def with_columns(table: pa.Table, **values: int) -> pa.Table:
    """``table`` with some int64 columns set to one value."""
    for name, v in values.items():
        i = table.column_names.index(name)
        table = table.set_column(i, name, pa.array(np.full(table.num_rows, v, dtype=np.int64)))
    return table


def run_seed(
    seed: int, rows: int, epochs: int, threads: int, data: dict[str, float]
) -> dict[str, dict[str, float]]:
    table = make_position_bias_table(rows, positions=POSITIONS, seed=seed, **data)
    req = table.column("request").to_numpy()
    rng = np.random.default_rng(seed + 1000)
    test_req = rng.random(req.max() + 1) < 0.2
    is_test = test_req[req]
    train = table.filter(pa.array(~is_test))
    test = table.filter(pa.array(is_test))
    truth = test.column("true_ctr").to_numpy()
    relevant = test.column("relevant").to_numpy()
    clicks = test.column("click").to_numpy()
    test_req_ids = test.column("request").to_numpy()
    cfg = TrainingConfig(
        epochs=epochs,
        batch_size=512,
        optimizer={"lr": 3e-3},
        seed=seed,
        progress=False,
        num_threads=threads,
    )

    def fit(role: str, extra: dict) -> tuple[Preprocessor, Trainer]:
        schema = position_bias_schema(positions=POSITIONS, position_role=role)
        pre = Preprocessor.fit(schema, train)
        torch.manual_seed(seed)
        model = build_model(MODEL, schema, pre.table_sizes(), {**PARAMS, **extra})
        trainer = Trainer(model, schema, config=cfg)
        trainer.fit(pre.encode(train))
        return pre, trainer

    def scores(pre: Preprocessor, trainer: Trainer, rows: pa.Table) -> np.ndarray:
        return trainer.predict(pre.encode(rows, targets=False))["click"]

    scored: dict[str, np.ndarray] = {}
    pre, tr = fit("bias", {"bias_tower": TOWER})
    scored["bias tower"] = scores(pre, tr, test.drop(["position", "device"]))
    pre, tr = fit("input", {})
    scored["position as a feature"] = scores(pre, tr, with_columns(test, position=0, device=0))
    missing = test.set_column(
        test.column_names.index("position"),
        "position",
        pa.nulls(test.num_rows, pa.int64()),
    )
    missing = missing.set_column(
        missing.column_names.index("device"), "device", pa.nulls(test.num_rows, pa.int64())
    )
    scored["(position missing)"] = scores(pre, tr, missing)
    pre, tr = fit("bias", {})  # role: bias without a tower: never read
    scored["no position"] = scores(pre, tr, test.drop(["position", "device"]))
    scored["(oracle: true_ctr)"] = truth
    assert pc.sum(test.column("click")).as_py() > 0
    return {
        name: {
            "relevance AUC": float(roc_auc_score(relevant, s)),
            "true-CTR AUC": soft_auc(s, truth),
            "request AUC": request_auc(s, truth, test_req_ids),
            "click AUC": float(roc_auc_score(clicks, s)),
        }
        for name, s in scored.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--promotion", type=float, default=None, help="generator option")
    ap.add_argument("--logging-noise", type=float, default=None, help="generator option")
    ap.add_argument("--position-effect", type=float, default=None, help="generator option")
    ap.add_argument("--md", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    data = {
        k: v
        for k, v in (
            ("promotion", args.promotion),
            ("logging_noise", args.logging_noise),
            ("position_effect", args.position_effect),
        )
        if v is not None
    }
    per_seed = [run_seed(s, args.rows, args.epochs, args.threads, data) for s in seeds]
    metrics = list(per_seed[0][VARIANTS[0]])
    lines = [
        f"{args.rows} rows ({POSITIONS} per request), 80/20 split by request, {MODEL} "
        f"{PARAMS}, {args.epochs} epochs; generator options {data or 'default'}; "
        f"seeds {seeds}; mean ± std over seeds",
        "",
        "| model | " + " | ".join(metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for v in VARIANTS:
        cells = []
        for m in metrics:
            x = np.array([r[v][m] for r in per_seed])
            cells.append(f"{x.mean():.4f} ± {x.std():.4f}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "Paired by seed, bias tower minus the other (mean ± std; wins / seeds):", ""]
    for v in ("position as a feature", "no position"):
        cells = []
        for m in metrics:
            d = np.array([r["bias tower"][m] - r[v][m] for r in per_seed])
            cells.append(f"{m} {d.mean():+.4f} ± {d.std():.4f} ({int((d > 0).sum())}/{len(d)})")
        lines.append(f"- vs {v}: " + "; ".join(cells))
    lines += ["", "Per seed (relevance AUC / true-CTR AUC / request AUC):", ""]
    for s, r in zip(seeds, per_seed, strict=True):
        parts = [
            f"{v}: {r[v]['relevance AUC']:.4f} / {r[v]['true-CTR AUC']:.4f} / "
            f"{r[v]['request AUC']:.4f}"
            for v in VARIANTS
        ]
        lines.append(f"- seed {s}: " + "; ".join(parts))
    lines += ["", f"{time.perf_counter() - t0:.0f} s on {platform.processor() or 'cpu'}"]
    text = "\n".join(lines)
    print(text)
    if args.md is not None:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
