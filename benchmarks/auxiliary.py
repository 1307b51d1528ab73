"""Quality of the two auxiliary losses of issue 16.3, over seeds.

* ``adversarial`` (census-income, Ganin & Lempitsky, ICML 2015): MMoE on task group 1
  (income, never married) with ``sex`` removed from the inputs and added as an auxiliary task
  ``female``. Variants: no sex task; ``female`` as a plain auxiliary task; ``female`` through a
  gradient reversal (``adversarial_tasks: {female: lambda}``). Reported: the main tasks' test
  AUC, the ``female`` tower's test AUC, and a *probe*: a logistic regression fitted (on the
  first 20,000 training rows, features standardised) to predict sex from the trained model's
  expert outputs, its test AUC: how much of the sex information the shared representation
  still carries.
* ``next_item`` (MovieLens latest-small, DIEN's auxiliary loss, Zhou et al., AAAI 2019): MMoE
  over user, movie, genre and the user's last 20 rated movies (mean-pooled), tasks like /
  rating, with and without ``next_item: {feature: history}`` (a GRU over the history whose
  state scores the next movie against sampled negatives; the loss trains the movie table the
  model reads). Reported: like AUC, like GAUC by user, rating MSE, on the test rows.

Each run trains with early stopping on the validation split (mean AUC of the primary tasks;
auxiliary tasks never select the epoch). Example::

    python benchmarks/auxiliary.py adversarial --seeds 0 1 2
    python benchmarks/auxiliary.py next_item --seeds 0 1 2 \\
        --movielens ../shared/data/movielens-latest-small
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import _as_cli  # noqa: F401  (first: the mtlrec command's process settings)
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mtlrec.config import TrainingConfig
from mtlrec.data.census import census_schema, read_census
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.split import hash_split
from mtlrec.metrics.ranking import gauc
from mtlrec.models import build_model
from mtlrec.schema import Schema, SequenceFeature, SparseFeature, TaskSpec
from mtlrec.train.trainer import Trainer

MMOE = {"num_experts": 8, "expert_hidden": [64], "tower_hidden": [32]}
PROBE_ROWS = 20_000  # training rows the sex probe is fitted on
ML_MMOE = {"num_experts": 4, "expert_hidden": [64], "tower_hidden": [32]}


def _training(seed: int, threads: int, epochs: int) -> TrainingConfig:
    return TrainingConfig(
        epochs=epochs,
        batch_size=512,
        optimizer={"name": "adam", "lr": 0.002},
        seed=seed,
        progress=False,
        num_threads=threads,
        early_stopping={"patience": 3},
    )


def _fit(
    schema: Schema, params: dict[str, Any], parts: list[pa.Table], cfg: TrainingConfig
) -> tuple[Preprocessor, Trainer]:
    pre = Preprocessor.fit(schema, parts[0])
    torch.manual_seed(cfg.seed)
    model = build_model("mmoe", schema, pre.table_sizes(), params)
    trainer = Trainer(model, schema, config=cfg)
    trainer.fit(pre.encode(parts[0]), pre.encode(parts[1]))
    return pre, trainer


def _split(table: pa.Table, fractions: tuple[float, ...], seed: int) -> list[pa.Table]:
    return [table.take(pa.array(i)) for i in hash_split(table.num_rows, fractions, seed)]


def _record(into: dict[str, list[float]], row: dict[str, float], label: str, t0: float) -> None:
    """Append one run's metrics to its variant's lists and print them."""
    for k, v in row.items():
        into.setdefault(k, []).append(float(v))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items())
    print(f"{label}: {shown} ({time.perf_counter() - t0:.0f} s)", flush=True)


def _expert_outputs(trainer: Trainer, data: Any) -> np.ndarray:
    """The expert bank's output for every row of ``data``, flattened to [rows, experts x d]."""
    got: list[torch.Tensor] = []
    bank = trainer.model.experts
    handle = bank.register_forward_hook(lambda _m, _i, out: got.append(out.detach().float()))
    try:
        trainer.predict(data)
    finally:
        handle.remove()
    out = torch.cat([g.transpose(0, 1) for g in got])  # each [E, B, d] -> [B, E, d]
    return out.reshape(out.shape[0], -1).numpy()


def adversarial(seeds: list[int], threads: int, epochs: int, lambdas: list[float]) -> dict:
    table = read_census()
    female = pc.cast(pc.equal(table.column("sex"), "Female"), pa.int8())
    table = table.append_column("female", female)
    base = census_schema(1)
    feats = tuple(f for f in base.features if f.name != "sex")
    main = Schema(features=feats, tasks=base.tasks)
    with_sex = Schema(
        features=feats,
        tasks=(*base.tasks, TaskSpec(name="female", kind="binary", auxiliary=True)),
    )
    variants: dict[str, tuple[Schema, dict[str, Any]]] = {
        "no sex task": (main, {}),
        "female: auxiliary": (with_sex, {}),
    }
    for lam in lambdas:
        variants[f"female: adversarial {lam:g}"] = (
            with_sex,
            {"adversarial_tasks": {"female": lam}},
        )
    out: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    for seed in seeds:
        parts = _split(table, (0.6, 0.2, 0.2), seed)
        sex_test = parts[2].column("female").to_numpy()
        sex_train = parts[0].column("female").to_numpy()
        for name, (schema, extra) in variants.items():
            t0 = time.perf_counter()
            cfg = _training(seed, threads, epochs)
            pre, trainer = _fit(schema, {**MMOE, **extra}, parts, cfg)
            test = pre.encode(parts[2])
            scores = trainer.predict(test)
            row: dict[str, float] = {}
            for task in ("income", "never_married"):
                row[f"{task} AUC"] = roc_auc_score(parts[2].column(task).to_numpy(), scores[task])
            if "female" in scores:
                row["female tower AUC"] = roc_auc_score(sex_test, scores["female"])
            probe_rows = parts[0].slice(0, PROBE_ROWS)
            train_rep = _expert_outputs(trainer, pre.encode(probe_rows, targets=False))
            test_rep = _expert_outputs(trainer, pre.encode(parts[2], targets=False))
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            probe.fit(train_rep, sex_train[:PROBE_ROWS])
            row["sex probe AUC"] = roc_auc_score(sex_test, probe.decision_function(test_rep))
            _record(out[name], row, f"seed {seed} {name}", t0)
    return out


def _movielens_schema(with_history_table: bool = True) -> Schema:
    return Schema(
        features=(
            SparseFeature(name="user", embedding_dim=16),
            SparseFeature(name="movie", embedding_dim=16, table="movie"),
            SparseFeature(name="genre", embedding_dim=8),
            SequenceFeature(name="history", embedding_dim=16, table="movie", max_len=20),
        ),
        tasks=(TaskSpec(name="like", kind="binary"), TaskSpec(name="rating", kind="regression")),
        group_column="user",
    )


def next_item(seeds: list[int], threads: int, epochs: int, data: Path, weights: list[float]):
    from movielens_sequences import build

    table = build(data)
    schema = _movielens_schema()
    variants: dict[str, dict[str, Any]] = {"without": {}}
    for w in weights:
        variants[f"next_item weight {w:g}"] = {
            "next_item": {"feature": "history", "weight": w, "negatives": 1}
        }
    out: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    for seed in seeds:
        parts = _split(table, (0.8, 0.1, 0.1), seed)
        like = parts[2].column("like").to_numpy()
        rating = parts[2].column("rating").to_numpy()
        users = parts[2].column("user").to_numpy()
        for name, extra in variants.items():
            t0 = time.perf_counter()
            pre, trainer = _fit(
                schema, {**ML_MMOE, **extra}, parts, _training(seed, threads, epochs)
            )
            scores = trainer.predict(pre.encode(parts[2], targets=False))
            row = {
                "like AUC": roc_auc_score(like, scores["like"]),
                "like GAUC": gauc(scores["like"], like, users),
                "rating MSE": float(np.mean((np.asarray(scores["rating"]) - rating) ** 2)),
            }
            _record(out[name], row, f"seed {seed} {name}", t0)
    return out


def table_md(out: dict[str, dict[str, list[float]]], base: str) -> str:
    cols = list(dict.fromkeys(k for v in out.values() for k in v))
    lines = ["| variant | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in out.items():
        cells = []
        for c in cols:
            if c not in row:
                cells.append("—")
                continue
            v = np.asarray(row[c])
            cell = f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}"
            if name != base and c in out[base]:
                d = v - np.asarray(out[base][c])
                cell += f" ({d.mean():+.4f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", choices=["adversarial", "next_item"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=20, help="the most (early stopping, patience 3)")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0])
    ap.add_argument("--movielens", type=Path, help="folder with ratings.csv and movies.csv")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(f"machine: {platform.machine()} torch {torch.__version__}, {args.threads} threads")
    t0 = time.perf_counter()
    if args.experiment == "adversarial":
        out = adversarial(args.seeds, args.threads, args.epochs, args.lambdas)
        base = "no sex task"
    else:
        if args.movielens is None:
            ap.error("next_item needs --movielens (the MovieLens latest-small folder)")
        out = next_item(args.seeds, args.threads, args.epochs, args.movielens, args.weights)
        base = "without"
    print(f"\n{args.experiment}, seeds {args.seeds}, {time.perf_counter() - t0:.0f} s")
    print("mean ± sd over seeds (in brackets: mean paired difference to the first row)")
    print(table_md(out, base))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
