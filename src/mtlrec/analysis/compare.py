"""Compare models over seeds against single-task baselines: mean ± sd, MTL gain, seesaw.

**MTL gain** (Tang et al., "Progressive Layered Extraction (PLE)", RecSys 2020, Section 5):
the improvement of a multi-task model over the single-task model of the same task, on the test
metric: ``gain = M_mtl - M_single`` for a metric where higher is better (AUC, GAUC, accuracy)
and ``gain = M_single - M_mtl`` for a loss-like metric (MSE, MAE, logloss), so a positive gain is
always an improvement. The means over seeds are compared.

**Seesaw**: a model shows the seesaw phenomenon when it gains on at least one task and loses on
at least another. With several seeds a gain only counts when it is larger than the noise of the
two means: ``|gain| > z * se`` with ``se = sqrt(sd_model^2 / n_model + sd_single^2 / n_single)``
(Welch's standard error of the difference of the means, ``z`` = :data:`SEESAW_Z` = 1.96, a two-
sided 95% level); a gain within the noise is shown without a sign marker and neither gains nor
loses. With one seed there is no noise estimate and the signs decide.

Every (model, seed) is one run folder trained by :func:`mtlrec.train.run.train_run`: its epoch
is selected on the validation split only, then the test split is scored once. The single-task
baseline is one network per task (``single_task`` with ``tasks: [t]``). Finished runs (a
``summary.json`` with test metrics) are read back instead of trained again, and an interrupted
run resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mtlrec.analysis.gates import GateEntropyLogger, expert_utilisation, gate_flags
from mtlrec.config import ExperimentConfig
from mtlrec.errors import ConfigError
from mtlrec.metrics import HIGHER_IS_BETTER
from mtlrec.utils.atomic import write_text

BASELINE = "single_task"
PRIMARY_METRIC = {"binary": "auc", "regression": "mse", "multiclass": "accuracy"}


def higher_is_better(metric: str) -> bool:
    if metric not in HIGHER_IS_BETTER:
        raise ConfigError(f"unknown metric {metric!r}; known: {sorted(HIGHER_IS_BETTER)}")
    return HIGHER_IS_BETTER[metric]


def mtl_gain(value: float, baseline: float, metric: str) -> float:
    """PLE paper's MTL gain of ``value`` over the single-task ``baseline`` (sign flipped for
    metrics where lower is better, so that > 0 is an improvement)."""
    d = value - baseline
    return d if higher_is_better(metric) else -d


SEESAW_Z = 1.96


def clear_sign(gain: float, se: float = 0.0, z: float = SEESAW_Z) -> int:
    """+1 / -1 for a gain / loss beyond ``z`` standard errors ``se``; 0 within the noise (or
    NaN)."""
    if math.isnan(gain) or abs(gain) <= z * (0.0 if math.isnan(se) else se):
        return 0
    return 1 if gain > 0 else -1


def seesaw(gains: Sequence[float], ses: Sequence[float] | None = None) -> bool:
    """Whether some gain is clearly positive and another clearly negative (see
    :func:`clear_sign`; without ``ses`` the signs decide; NaN gains are ignored)."""
    signs = [
        clear_sign(g, 0.0 if ses is None else e) for g, e in zip(gains, ses or gains, strict=True)
    ]
    return 1 in signs and -1 in signs


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value; NaN for none)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


@dataclass
class CompareResult:
    """Test metrics of every (model, task, seed), with the derived summary."""

    tasks: tuple[str, ...]
    primary: dict[str, str]  # task -> metric of the gain (auc / mse / accuracy)
    seeds: list[int] = field(default_factory=list)
    # model -> task -> metric -> values over seeds (in seed order)
    metrics: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    best_epochs: dict[str, list[int | None]] = field(default_factory=dict)
    # model -> gate -> {"utilisation": mean over seeds, flags...}
    gates: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    label_correlation: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def models(self) -> list[str]:
        return list(self.metrics)

    def values(self, model: str, task: str, metric: str | None = None) -> list[float]:
        return self.metrics[model][task].get(metric or self.primary[task], [])

    def mean(self, model: str, task: str, metric: str | None = None) -> float:
        return mean_sd(self.values(model, task, metric))[0]

    def sd(self, model: str, task: str, metric: str | None = None) -> float:
        return mean_sd(self.values(model, task, metric))[1]

    def gain(self, model: str, task: str, metric: str | None = None) -> float:
        """MTL gain of ``model`` on ``task`` over the single-task baseline (NaN without one)."""
        metric = metric or self.primary[task]
        if BASELINE not in self.metrics:
            return math.nan
        return mtl_gain(self.mean(model, task, metric), self.mean(BASELINE, task, metric), metric)

    def gains(self, model: str) -> dict[str, float]:
        return {t: self.gain(model, t) for t in self.tasks}

    def gain_se(self, model: str, task: str, metric: str | None = None) -> float:
        """Standard error of :meth:`gain` (Welch: the two means' variances over their seed
        counts); NaN without a baseline, 0 with single runs."""
        metric = metric or self.primary[task]
        if BASELINE not in self.metrics:
            return math.nan
        var = 0.0
        for m in (model, BASELINE):
            vals = [v for v in self.values(m, task, metric) if v is not None]
            if len(vals) > 1:
                var += float(np.var(vals, ddof=1)) / len(vals)
        return math.sqrt(var)

    def seesaw(self, model: str) -> bool:
        if model == BASELINE:
            return False
        gains = [self.gain(model, t) for t in self.tasks]
        return seesaw(gains, [self.gain_se(model, t) for t in self.tasks])

    def extra_metrics(self) -> list[str]:
        """Metrics shown besides the primary one (GAUC when the data has a group column)."""
        found = {m for per_task in self.metrics.values() for ms in per_task.values() for m in ms}
        return [m for m in ("gauc",) if m in found]

    def to_dict(self) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        for m in self.models:
            summary[m] = {}
            for t in self.tasks:
                row: dict[str, Any] = {}
                for metric in self.metrics[m][t]:
                    mu, sd = mean_sd(self.metrics[m][t][metric])
                    row[metric] = {"mean": _num(mu), "sd": _num(sd)}
                row["gain"] = None if m == BASELINE else _num(self.gain(m, t))
                row["gain_se"] = None if m == BASELINE else _num(self.gain_se(m, t))
                summary[m][t] = row
            summary[m]["seesaw"] = self.seesaw(m)
        return {
            "format": 1,
            "tasks": list(self.tasks),
            "primary_metric": self.primary,
            "seeds": self.seeds,
            "metrics": self.metrics,
            "best_epochs": self.best_epochs,
            "summary": summary,
            "gates": self.gates,
            "label_correlation": self.label_correlation,
            "gain_definition": (
                "PLE paper (Tang et al. 2020): M_mtl - M_single for higher-is-better metrics, "
                "M_single - M_mtl for MSE/MAE/logloss; means over seeds"
            ),
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompareResult:
        return cls(
            tasks=tuple(d["tasks"]),
            primary=dict(d["primary_metric"]),
            seeds=list(d.get("seeds", [])),
            metrics=d["metrics"],
            best_epochs=d.get("best_epochs", {}),
            gates=d.get("gates", {}),
            label_correlation=d.get("label_correlation"),
            seconds=float(d.get("seconds", 0.0)),
        )

    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the comparison table (strings), shared by markdown and rich."""
        header = ["model"]
        for t in self.tasks:
            header.append(f"{t} {self.primary[t]}")
            header += [f"{t} {m}" for m in self.extra_metrics()]
        header += [f"gain {t}" for t in self.tasks] + ["seesaw"]
        rows = []
        for m in self.models:
            row = [m]
            for t in self.tasks:
                for metric in (self.primary[t], *self.extra_metrics()):
                    mu, sd = mean_sd(self.values(m, t, metric))
                    row.append(
                        ""
                        if math.isnan(mu)
                        else f"{mu:.4f} ± {sd:.4f}"
                        if len(self.seeds) > 1
                        else f"{mu:.4f}"
                    )
            if m == BASELINE:
                row += ["—"] * len(self.tasks) + [""]
            else:
                for t in self.tasks:
                    g = self.gain(m, t)
                    clear = clear_sign(g, self.gain_se(m, t)) != 0 and len(self.seeds) > 1
                    row.append(_fmt_gain(g) + (" *" if clear else ""))
                row.append("yes" if self.seesaw(m) else "no")
            rows.append(row)
        return header, rows

    def to_markdown(self) -> str:
        header, rows = self.table_rows()
        lines = [
            f"# Model comparison ({len(self.seeds)} seed{'s' if len(self.seeds) != 1 else ''})",
            "",
            "Test metrics, mean ± sd over seeds; each run's epoch selected on the validation "
            "split. Gain: the PLE paper's MTL gain over the single-task baseline "
            "(sign flipped for MSE, so > 0 is better); * marks a gain beyond 1.96 standard "
            "errors of the difference of the means. Seesaw: a clear gain on one task and a "
            "clear loss on another.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        if self.gates:
            lines += ["", "## Expert utilisation (test split, mean over seeds)", ""]
            for m, gs in self.gates.items():
                for g, info in gs.items():
                    u = ", ".join(f"{x:.3f}" for x in info["utilisation"])
                    flags = []
                    if info.get("dead"):
                        flags.append(f"dead experts {info['dead']}")
                    if info.get("collapsed"):
                        flags.append("collapsed")
                    lines.append(
                        f"- {m} / {g}: [{u}]" + (f" — {'; '.join(flags)}" if flags else "")
                    )
        if self.label_correlation:
            lc = self.label_correlation
            lines += ["", "## Label correlation (training split, joint sample space)", ""]
            lines.append("| | " + " | ".join(lc["tasks"]) + " |")
            lines.append("|---|" + "|".join("---" for _ in lc["tasks"]) + "|")
            for name, r in zip(lc["tasks"], lc["correlation"], strict=True):
                cells = ["" if v is None else f"{v:.3f}" for v in r]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", f"{self.seconds:.0f} s"]
        return "\n".join(lines) + "\n"


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _fmt_gain(g: float) -> str:
    return "" if math.isnan(g) else f"{g:+.4f}"


def check_models(models: Sequence[str]) -> None:
    """Every name must be a registered model (one clear error otherwise)."""
    from mtlrec.registry import MODELS

    known = MODELS.names()
    missing = [m for m in models if m not in known]
    if missing:
        raise ConfigError(
            f"--models: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a "
            f"registered model (registered: {', '.join(known)})"
        )
    if len(set(models)) != len(models):
        raise ConfigError(f"--models: a model is named twice in {list(models)}")


def run_config(
    base: ExperimentConfig,
    model: str,
    seed: int,
    folder: Path,
    *,
    tasks: Sequence[str] | None = None,
    params: dict[str, Any] | None = None,
    progress: bool = False,
) -> ExperimentConfig:
    """The config of one (model, seed[, task]) run of a comparison."""
    data = yaml.safe_load(base.to_yaml())
    data["model"] = {"name": model, "params": dict(params or {})}
    data["training"] = {**data.get("training", {}), "seed": seed, "progress": progress}
    if tasks is not None:
        data["tasks"] = list(tasks)
        # a monitor naming another task (e.g. ctcvr/auc): a one-task baseline selects its
        # epoch by the default rule (on its own task) instead
        task, _, metric = str(data["training"].get("monitor") or "").partition("/")
        if metric and task != "mean" and task not in tasks:
            data["training"]["monitor"] = None
    data["output_dir"] = str(folder)
    return ExperimentConfig.from_dict(data, source="compare", base_dir=base.base_dir)


def _finished(folder: Path, cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The summary of a finished run of this config in ``folder``, else None."""
    summ, conf = folder / "summary.json", folder / "config.yaml"
    if not (summ.is_file() and conf.is_file()):
        return None
    from mtlrec.train.run import same_config

    try:
        same = same_config(yaml.safe_load(conf.read_text()), cfg)
        summary = json.loads(summ.read_text())
    except (yaml.YAMLError, json.JSONDecodeError):
        return None
    if not same or not isinstance(summary, dict) or not summary.get("test"):
        return None
    return summary


def _run_gates(folder: Path, base_dir: str | None) -> dict[str, Any]:
    """Expert utilisation of a run's best weights on its test split (cached in gates.json)."""
    path = folder / "gates.json"
    if path.is_file():
        return json.loads(path.read_text())
    from mtlrec.data.loading import load_datasets
    from mtlrec.train.run import load_run

    loaded = load_run(folder)
    # data paths of the run's config are relative to the comparison's config file
    run_cfg = loaded.config.model_copy(update={"base_dir": base_dir})
    sets = load_datasets(run_cfg, loaded.preprocessor)
    ds = sets.test if sets.test is not None else sets.valid
    stats = {} if ds is None else expert_utilisation(loaded.model, ds)
    write_text(path, json.dumps(stats, indent=2))
    return stats


def run_compare(
    cfg: ExperimentConfig,
    models: Sequence[str],
    seeds: int | Sequence[int],
    output: str | Path,
    *,
    model_params: dict[str, dict[str, Any]] | None = None,
    progress: bool = False,
    gates: bool = True,
    on_run: Callable[[str], None] | None = None,
) -> CompareResult:
    """Train every model for every seed (resuming), then summarise; writes ``compare.json`` and
    ``compare.md`` in ``output`` (also after each finished run, so a partial result is there).

    Args:
        cfg: the experiment (data, schema, training); its ``model`` section gives the params of
            the model it names, ``model_params`` those of the others (defaults otherwise).
        models: registered model names; ``single_task`` is the per-task baseline.
        seeds: a count (``training.seed + 0 .. n-1``) or explicit seeds.
        output: the comparison folder (``runs/<model>-s<seed>[-<task>]`` inside).
        gates: compute expert utilisation of gated models on the test split.
        on_run: called with a label before each run (progress messages).
    """
    from mtlrec.analysis.relations import label_correlation
    from mtlrec.data.loading import load_datasets
    from mtlrec.train.run import train_run

    t0 = time.perf_counter()
    models = list(models)
    if not models:
        raise ConfigError("--models: give at least one model")
    check_models(models)
    seed_list = (
        [cfg.training.seed + k for k in range(seeds)] if isinstance(seeds, int) else list(seeds)
    )
    if not seed_list:
        raise ConfigError("--seeds: give at least one seed")
    params = dict(model_params or {})
    params.setdefault(cfg.model.name, dict(cfg.model.params))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)

    data = load_datasets(cfg)
    schema = data.preprocessor.schema
    tasks = schema.task_names
    result = CompareResult(
        tasks=tasks, primary={t.name: PRIMARY_METRIC[t.kind] for t in schema.tasks}
    )
    result.seeds = seed_list
    result.label_correlation = label_correlation(data.train)
    del data

    gate_stats: dict[str, list[dict[str, Any]]] = {}
    for model in models:
        result.metrics[model] = {t: {} for t in tasks}
        result.best_epochs[model] = []
        groups: list[tuple[str, ...] | None] = (
            [(t,) for t in tasks] if model == BASELINE else [None]
        )
        for seed in seed_list:
            for group in groups:
                name = f"{model}-s{seed}" + ("" if group is None else "-" + "-".join(group))
                folder = out / "runs" / name
                rcfg = run_config(
                    cfg,
                    model,
                    seed,
                    folder,
                    tasks=group if group is not None else cfg.tasks,
                    params=params.get(model, {}),
                    progress=progress,
                )
                summary = _finished(folder, rcfg)
                if summary is None:
                    if on_run is not None:
                        on_run(name)
                    res = train_run(
                        rcfg,
                        output_dir=folder,
                        callbacks=[GateEntropyLogger()],
                        progress_label=name,
                    )
                    test, best = res.test_metrics or {}, res.fit.best_epoch
                else:
                    test, best = summary["test"], summary.get("best_epoch")
                for t in group or tasks:
                    for metric, v in test[t].items():
                        if metric == "count":
                            continue
                        result.metrics[model][t].setdefault(metric, []).append(
                            math.nan if v is None else float(v)
                        )
                result.best_epochs[model].append(best)
                if gates and model != BASELINE:
                    stats = _run_gates(folder, cfg.base_dir)
                    if stats:
                        gate_stats.setdefault(model, []).append(stats)
                result.seconds = time.perf_counter() - t0
                write_compare(result, out)
    for model, per_seed in gate_stats.items():
        result.gates[model] = {}
        for g in per_seed[0]:
            u = np.mean([s[g]["utilisation"] for s in per_seed if g in s], axis=0).tolist()
            ent = float(np.mean([s[g]["entropy"] for s in per_seed if g in s]))
            result.gates[model][g] = {
                "utilisation": u,
                "entropy": ent,
                "max_entropy": per_seed[0][g]["max_entropy"],
                **gate_flags(g, u),
            }
    result.seconds = time.perf_counter() - t0
    write_compare(result, out)
    return result


def write_compare(result: CompareResult, output: str | Path) -> None:
    """``compare.json`` and ``compare.md`` in ``output`` (atomic)."""
    out = Path(output)
    write_text(out / "compare.json", json.dumps(_clean(result.to_dict()), indent=2))
    write_text(out / "compare.md", result.to_markdown())


def load_compare(path: str | Path) -> CompareResult:
    p = Path(path)
    f = p / "compare.json" if p.is_dir() else p
    try:
        return CompareResult.from_dict(json.loads(f.read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{f}: not a comparison result ({e})") from None


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
