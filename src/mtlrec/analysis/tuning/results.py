"""The outputs of ``mtlrec tune``: the quality / latency Pareto front, ``tune.json``,
``pareto.md``, the best configuration per latency budget and the report's plot. See
:mod:`mtlrec.analysis.tuning`."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mtlrec.config import ExperimentConfig
from mtlrec.errors import ConfigError
from mtlrec.utils.atomic import write_text

if TYPE_CHECKING:
    import optuna

LATENCY_ROWS = 1000
"""Rows of the batch every trial's latency is measured on."""


def format_value(v: Any) -> str:
    """A searched value for a table: floats to 3 significant digits."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def pareto_front(
    points: Sequence[tuple[float, float]], *, higher_is_better: bool = True
) -> list[int]:
    """The points no other point beats on both quality and latency.

    Args:
        points: ``(quality, latency)`` pairs; lower latency is better.
        higher_is_better: the quality's direction.

    Returns:
        The indices of the non-dominated points, by increasing latency. A point is dominated
        when another is at least as good on both and strictly better on one (equal points
        both stay).

    Example:
        >>> pareto_front([(0.90, 1.0), (0.92, 2.0), (0.91, 3.0), (0.95, 5.0)])
        [0, 1, 3]
    """
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for i, (q, lat) in enumerate(points):
        dominated = any(
            sign * q2 >= sign * q and lat2 <= lat and (sign * q2 > sign * q or lat2 < lat)
            for j, (q2, lat2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][1], -sign * points[i][0]))


def write_outputs(
    out: Path,
    study: optuna.Study,
    cfg: ExperimentConfig,
    metric: str,
    higher: bool,
    budgets: Sequence[float] = (),
) -> dict[str, Any]:
    """``tune.json``, ``pareto.md`` and the ``best_under_<ms>ms.yaml`` files of a study.

    Budgets default to the latencies of the front's points (rounded up to 2 significant
    digits): one file per point of the front.
    """
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "params": t.params,
                "value": t.value,
                "latency_ms": t.user_attrs.get("latency_ms"),
                "n_params": t.user_attrs.get("n_params"),
                "test": t.user_attrs.get("test"),
                "best_epoch": t.user_attrs.get("best_epoch"),
                "run_dir": t.user_attrs.get("run_dir"),
                "retry_of": t.user_attrs.get("retry_of"),
            }
        )
    latency = f"ms per {LATENCY_ROWS} rows, 1 thread, median after warm-up"
    if (out / "latency.json").is_file():  # measured again, interleaved (remeasure_latency)
        again = json.loads((out / "latency.json").read_text())
        latency = f"ms per {LATENCY_ROWS} rows: {again['method']}"
        for t in trials:
            if str(t["number"]) in again["ms"]:
                t["latency_ms_in_trial"] = t["latency_ms"]
                t["latency_ms"] = again["ms"][str(t["number"])]
    done = [t for t in trials if t["state"] == "complete" and t["latency_ms"] is not None]
    points = [(float(t["value"]), float(t["latency_ms"])) for t in done]
    front = [done[i]["number"] for i in pareto_front(points, higher_is_better=higher)]
    chosen = list(budgets) or sorted(
        {_round_up(t["latency_ms"]) for t in done if t["number"] in front}
    )
    configs = {t.number: t.user_attrs.get("config") for t in study.get_trials(deepcopy=False)}
    best: dict[str, int] = {}
    for b in chosen:
        under = [t for t in done if t["latency_ms"] <= b]
        if not under:
            continue
        pick = max(under, key=lambda t: t["value"] if higher else -t["value"])
        name = f"best_under_{b:g}ms.yaml"
        best[name] = pick["number"]
        trial_cfg = dict(configs[pick["number"]] or {})
        trial_cfg["output_dir"] = f"{cfg.output_dir}-best-under-{b:g}ms"
        if cfg.base_dir is not None:
            trial_cfg["base_dir"] = str(Path(cfg.base_dir).resolve())
        header = (
            f"# the best trial (number {pick['number']}) with inference under {b:g} ms per "
            f"1,000 rows: {metric} {pick['value']:.5f} on validation, "
            f"{pick['latency_ms']:.3f} ms\n"
        )
        write_text(out / name, header + yaml.safe_dump(trial_cfg, sort_keys=False))
    for stale in out.glob("best_under_*ms.yaml"):
        if stale.name not in best:  # the front moved since it was written
            stale.unlink()
    result = {
        "metric": metric,
        "higher_is_better": higher,
        "latency": latency,
        "trials": trials,
        "pareto": front,
        "best_under": best,
    }
    write_text(out / "tune.json", json.dumps(result, indent=2, allow_nan=True))
    header, rows = table_rows(result)
    md = [f"# Tuning: {metric} (validation) vs latency\n", "| " + " | ".join(header) + " |"]
    md.append("|" + "---|" * len(header))
    md += ["| " + " | ".join(r) + " |" for r in rows]
    write_text(out / "pareto.md", "\n".join(md) + "\n")
    return result


def _round_up(x: float) -> float:
    if x <= 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(x)) - 1)
    return round(math.ceil(x / scale - 1e-9) * scale, 12)


def table_rows(
    result: dict[str, Any], *, front_only: bool = False
) -> tuple[list[str], list[list[str]]]:
    """The trials of a ``tune.json`` as table rows (front marked ``*``), best first."""
    trials = [t for t in result["trials"] if t["state"] == "complete"]
    if front_only:
        trials = [t for t in trials if t["number"] in result["pareto"]]
    keys = list(dict.fromkeys(k for t in trials for k in t["params"]))
    tasks = list(dict.fromkeys(k for t in trials for k in (t.get("test") or {})))
    sign = 1 if result["higher_is_better"] else -1
    trials.sort(key=lambda t: -sign * t["value"])
    header = ["trial", *keys, f"valid {result['metric']}"]
    header += [f"test {k} auc" for k in tasks] + ["ms / 1k rows", "params", "front"]
    rows = []
    for t in trials:
        test = t.get("test") or {}
        rows.append(
            [str(t["number"])]
            + [format_value(t["params"].get(k, "")) for k in keys]
            + [f"{t['value']:.5f}"]
            + [f"{test[k]['auc']:.5f}" if "auc" in test.get(k, {}) else "" for k in tasks]
            + [
                "" if t["latency_ms"] is None else f"{t['latency_ms']:.3f}",
                "" if t["n_params"] is None else f"{t['n_params']:,}",
                "*" if t["number"] in result["pareto"] else "",
            ]
        )
    return header, rows


def load_tune(folder: str | Path) -> dict[str, Any]:
    """A study folder's ``tune.json``."""
    path = Path(folder) / "tune.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable tune.json ({e})") from None


def pareto_figure(result: dict[str, Any], plt: Any) -> Any:
    """Validation metric against latency, every finished trial, the front joined (matplotlib
    figure drawn with ``plt``)."""
    done = [t for t in result["trials"] if t["state"] == "complete" and t["latency_ms"]]
    front = [t for t in done if t["number"] in result["pareto"]]
    front.sort(key=lambda t: t["latency_ms"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter(
        [t["latency_ms"] for t in done], [t["value"] for t in done], s=18, alpha=0.6, label="trials"
    )
    ax.plot(
        [t["latency_ms"] for t in front],
        [t["value"] for t in front],
        "o-",
        color="C3",
        label="Pareto front",
    )
    for t in front:
        ax.annotate(
            str(t["number"]),
            (t["latency_ms"], t["value"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(3, 3),
        )
    lats = [t["latency_ms"] for t in done]
    if lats and max(lats) > 20 * min(lats):
        ax.set_xscale("log")
    ax.set_xlabel(f"inference ms per {LATENCY_ROWS:,} rows (1 thread)")
    ax.set_ylabel(f"validation {result['metric']}")
    ax.legend(fontsize=7)
    return fig
