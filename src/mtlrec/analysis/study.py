"""The MMoE paper's synthetic study (Ma et al., "Modeling Task Relationships in Multi-task
Learning with Multi-gate Mixture-of-Experts", KDD 2018, Section 3.2 and Figures 4 and 6).

For every task correlation ``p`` (the cosine of the two tasks' weight vectors) and model, ``R``
runs are trained, each on its own data set (:func:`mtlrec.data.synthetic.make_mmoe_synthetic`
with seed ``seed + r``) and its own initial weights; the ``R`` runs train side by side as one
vectorised model (:class:`mtlrec.analysis.vectorized.VectorizedRuns`). Reported per (p, model):
the test loss (mean of the two tasks' MSE) of every run over training (Figure 4: its mean) and
at the end (Figure 6, the trainability histogram: its distribution over runs).

The paper's budget is far larger (hundreds of runs, many thousands of steps); a small budget
need not reproduce its ordering. The output records every setting, and the generator's
constants.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlrec.analysis.vectorized import VectorizedRuns
from mtlrec.data.synthetic import make_mmoe_synthetic, mmoe_synthetic_schema
from mtlrec.errors import ConfigError
from mtlrec.models.build import build_model
from mtlrec.utils.atomic import write_text

# Our sizes (the paper's exact widths are not reproduced): small experts, as in its Section 3.
STUDY_PARAMS: dict[str, dict[str, Any]] = {
    "shared_bottom": {"bottom_hidden": [64], "tower_hidden": [8]},
    "omoe": {"num_experts": 8, "expert_hidden": [16], "tower_hidden": [8]},
    "mmoe": {"num_experts": 8, "expert_hidden": [16], "tower_hidden": [8]},
    "ple": {
        "experts_per_task": 3,
        "shared_experts": 2,
        "expert_hidden": [16],
        "num_levels": 2,
        "tower_hidden": [8],
    },
}


def study_models() -> list[str]:
    """Shared-Bottom, OMoE, MMoE, and PLE when it is registered."""
    from mtlrec.registry import MODELS

    return [m for m in ("shared_bottom", "omoe", "mmoe", "ple") if m in MODELS.names()]


def _data(
    p: float, runs: int, n_train: int, n_test: int, preset: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    xs, ys, metas = [], [], []
    for r in range(runs):
        table, meta = make_mmoe_synthetic(p, n_train + n_test, preset=preset, seed=seed + r)
        d = meta["d"]
        x = np.stack([table.column(f"x{i}").to_numpy() for i in range(d)], axis=1)
        y = np.stack([table.column("y1").to_numpy(), table.column("y2").to_numpy()], axis=1)
        xs.append(torch.from_numpy(x.astype(np.float32)))
        ys.append(torch.from_numpy(y.astype(np.float32)))
        metas.append(meta)
    x, y = torch.stack(xs), torch.stack(ys)  # [R, N, d], [R, N, 2]
    return x[:, :n_train], y[:, :n_train], x[:, n_train:], y[:, n_train:], metas


def run_synthetic_study(
    *,
    correlations: Sequence[float] = (0.5, 0.9, 1.0),
    models: Sequence[str] | None = None,
    runs: int = 20,
    steps: int = 1000,
    batch_size: int = 128,
    n_train: int = 10_000,
    n_test: int = 2_000,
    lr: float = 1e-3,
    eval_every: int = 100,
    preset: str = "mmoe-fig2",
    seed: int = 0,
    params: dict[str, dict[str, Any]] | None = None,
    output: str | Path | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the study; returns (and writes to ``output/study.json``, ``study.md``) the results."""
    from mtlrec.registry import MODELS

    t0 = time.perf_counter()
    models = list(models) if models else study_models()
    missing = [m for m in models if m not in MODELS.names()]
    if missing:
        raise ConfigError(
            f"--models: {', '.join(missing)} not registered (registered: "
            f"{', '.join(MODELS.names())})"
        )
    if runs < 1 or steps < 1 or n_train < batch_size or n_test < 1:
        raise ConfigError("need runs >= 1, steps >= 1, n_test >= 1, n_train >= batch_size")
    sizes = {**STUDY_PARAMS, **(params or {})}
    results: dict[str, Any] = {}
    generator: dict[str, Any] | None = None

    def settings(models: list[str]) -> dict[str, Any]:
        return {
            "correlations": list(correlations),
            "models": models,
            "model_params": {m: sizes.get(m, {}) for m in models},
            "runs": runs,
            "steps": steps,
            "batch_size": batch_size,
            "n_train": n_train,
            "n_test": n_test,
            "optimizer": {"name": "adam", "lr": lr},
            "eval_every": eval_every,
            "seed": seed,
            "loss": "mean over the two tasks of the test MSE",
            "vectorised": "R runs as one model (torch.func.vmap over stacked parameters)",
        }

    for p in correlations:
        xtr, ytr, xte, yte, metas = _data(p, runs, n_train, n_test, preset, seed)
        if generator is None:
            generator = {
                k: metas[0][k]
                for k in ("preset", "d", "c", "m", "alphas", "betas", "noise_var", "basis")
            }
        label_corr = [m["label_correlation"] for m in metas]
        schema = mmoe_synthetic_schema(int(metas[0]["d"]))
        results[str(p)] = {"label_correlation_mean": float(np.mean(label_corr)), "models": {}}
        for name in models:
            t1 = time.perf_counter()
            built = []
            for r in range(runs):
                torch.manual_seed(seed * 1_000_003 + r)
                built.append(build_model(name, schema, {}, sizes.get(name, {})))
            vr = VectorizedRuns(built, lr=lr)
            g = torch.Generator().manual_seed(seed)
            curve: list[dict[str, Any]] = []
            for step in range(1, steps + 1):
                idx = torch.randint(0, n_train, (batch_size,), generator=g)
                vr.step(xtr[:, idx], ytr[:, idx])
                if step % eval_every == 0 or step == steps:
                    loss = vr.evaluate(xte, yte).mean(dim=1)  # [R]
                    curve.append({"step": step, "test_loss": loss.tolist()})
            final = curve[-1]["test_loss"]
            finite = [v for v in final if math.isfinite(v)]
            results[str(p)]["models"][name] = {
                "final_test_loss": final,
                "mean": float(np.mean(finite)) if finite else None,
                "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
                "median": float(np.median(finite)) if finite else None,
                "curve": curve,
                "seconds": time.perf_counter() - t1,
            }
            if on_progress is not None:
                on_progress(
                    f"p={p} {name}: mean test loss {results[str(p)]['models'][name]['mean']:.4f} "
                    f"({time.perf_counter() - t1:.0f} s)"
                )
            if output is not None:  # partial results after every (p, model)
                _write(output, _study(results, generator, t0, settings(models)))
    return _write(output, _study(results, generator, t0, settings(models)))


def _write(output: str | Path | None, out: dict[str, Any]) -> dict[str, Any]:
    if output is not None:
        folder = Path(output)
        write_text(folder / "study.json", json.dumps(out, indent=2))
        write_text(folder / "study.md", study_markdown(out))
    return out


def _study(
    results: dict[str, Any], generator: dict[str, Any] | None, t0: float, settings: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format": 1,
        "study": "mmoe-synthetic",
        "paper": "Ma et al., KDD 2018, Section 3.2, Figures 4 and 6",
        "generator": generator,
        "settings": settings,
        "results": results,
        "seconds": time.perf_counter() - t0,
    }


def study_markdown(study: dict[str, Any]) -> str:
    s = study["settings"]
    models = s["models"]
    lines = [
        "# MMoE synthetic study (Ma et al., KDD 2018, Section 3.2)",
        "",
        f"{s['runs']} runs per (correlation, model), {s['steps']} Adam steps (lr "
        f"{s['optimizer']['lr']}), batch {s['batch_size']}, {s['n_train']} training and "
        f"{s['n_test']} test rows per run; test loss = mean of the two tasks' MSE. "
        f"{study['seconds']:.0f} s.",
        "",
        "| correlation | label corr. | " + " | ".join(models) + " |",
        "|---|---|" + "|".join("---" for _ in models) + "|",
    ]
    for p, res in study["results"].items():
        cells = []
        for m in models:
            r = res["models"].get(m)
            cells.append(
                "" if r is None or r["mean"] is None else f"{r['mean']:.4f} ± {r['sd']:.4f}"
            )
        lines.append(f"| {p} | {res['label_correlation_mean']:.3f} | " + " | ".join(cells) + " |")
    g = study["generator"] or {}
    lines += [
        "",
        "Generator constants: "
        + ", ".join(f"{k}={g[k]}" for k in ("preset", "d", "c", "m", "noise_var") if k in g),
        "(alphas and betas in study.json).",
    ]
    return "\n".join(lines) + "\n"
