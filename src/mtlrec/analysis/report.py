"""A self-contained HTML report of a run, a comparison or a synthetic study folder.

Sections (each when its input is in the folder):

* comparison (``compare.json``): the table of test metrics, mean ± sd, MTL gain and seesaw;
  the seesaw bars (gain per task and model); expert-utilisation heatmaps; routing heatmaps
  (SNR: the open probability of every connection, per routing layer); label correlation;
  loss and metric curves of every run under ``runs/``;
* run (``metrics.jsonl``): training loss and validation metric per task and epoch, gate
  entropy over training, expert utilisation (``gates.json``), test metrics (``summary.json``);
* study (``study.json``): test loss vs task correlation, loss curves, trainability histograms;
* tuning (``tune.json``, ``mtlrec tune``): validation metric vs latency, the Pareto front;
* fusion: every ``fusion*.json`` / ``fusion*.md`` file of the folder, shown as it is.

Plots are PNG images drawn with matplotlib (the ``plot`` extra; Agg backend) and inlined as
base64 ``data:`` URIs, so the page needs no other file.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from mtlrec.errors import ConfigError
from mtlrec.utils.atomic import write_text

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th:first-child,td:first-child{text-align:left}img{max-width:100%}
pre{background:#f6f6f6;padding:1em;overflow:auto}h2{border-bottom:1px solid #ddd}
"""


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "the report draws its plots with matplotlib: pip install 'mtlrec[plot]'"
        ) from None
    return plt


def _img(fig: Any, alt: str) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"{path}: a line is not JSON") from None
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


# -- runs ---------------------------------------------------------------------------------------
def _primary(metrics: dict[str, Any]) -> str | None:
    for m in ("auc", "mse", "accuracy"):
        if m in metrics:
            return m
    return None


def run_curves(records_by_label: dict[str, list[dict[str, Any]]], title: str) -> str:
    """Training loss and validation metric per task over epochs (one line per run)."""
    plt = _plt()
    tasks: list[str] = []
    for recs in records_by_label.values():
        for r in recs:
            tasks += [t for t in r.get("train_loss", {}) if t not in tasks]
    if not tasks:
        return ""
    fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6), squeeze=False)
    for j, t in enumerate(tasks):
        for label, recs in records_by_label.items():
            ep = [r["epoch"] for r in recs if t in r.get("train_loss", {})]
            loss = [r["train_loss"][t] for r in recs if t in r.get("train_loss", {})]
            if ep:
                axes[0][j].plot(ep, loss, marker=".", label=label)
            vrec = [r for r in recs if t in (r.get("valid") or {})]
            metric = _primary(vrec[0]["valid"][t]) if vrec else None
            if metric:
                axes[1][j].plot(
                    [r["epoch"] for r in vrec],
                    [r["valid"][t][metric] for r in vrec],
                    marker=".",
                    label=label,
                )
                axes[1][j].set_ylabel(f"valid {metric}")
        axes[0][j].set_title(f"{t}: training loss")
        axes[0][j].set_xlabel("epoch")
        axes[1][j].set_title(f"{t}: validation metric")
        axes[1][j].set_xlabel("epoch")
        if len(records_by_label) <= 8:
            axes[0][j].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _img(fig, f"curves {title}")


def gate_entropy_plot(records: list[dict[str, Any]], title: str) -> str:
    rec = [r for r in records if r.get("gate_entropy")]
    if not rec:
        return ""
    from mtlrec.analysis.gates import is_route

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [r["epoch"] for r in rec]
    routes = [g for g in rec[0]["gate_entropy"] if is_route(g)]
    for g in rec[0]["gate_entropy"]:
        if not is_route(g):
            ax.plot(epochs, [r["gate_entropy"].get(g) for r in rec], ".-", label=g)
    if routes:  # SNR: one line, the mean binary entropy of its connections
        mean = [sum(r["gate_entropy"].get(g, math.nan) for g in routes) / len(routes) for r in rec]
        ax.plot(epochs, mean, ".-", label=f"routes (mean of {len(routes)})")
    util = {g: u for g, u in rec[0].get("gate_utilisation", {}).items() if not is_route(g)}
    if routes and not util:
        ax.axhline(math.log(2), color="grey", ls="--", lw=0.8, label="undecided route (log 2)")
    if util:
        e = len(next(iter(util.values())))
        ax.axhline(math.log(e), color="grey", ls="--", lw=0.8, label=f"uniform (log {e})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean gate entropy (nats)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _img(fig, f"gate entropy {title}")


def gate_heatmap(gates: dict[str, dict[str, Any]], title: str) -> str:
    """Rows: gates (tasks); columns: experts; cell: mean gate weight (routes excluded: see
    :func:`routing_heatmap`)."""
    from mtlrec.analysis.gates import is_route

    rows = {
        g: v["utilisation"] for g, v in gates.items() if v.get("utilisation") and not is_route(g)
    }
    if not rows:
        return ""
    plt = _plt()
    width = max(len(u) for u in rows.values())
    grid = [list(u) + [math.nan] * (width - len(u)) for u in rows.values()]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * width, 0.8 + 0.5 * len(rows)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, aspect="auto")
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xticks(range(width))
    ax.set_xlabel("expert")
    for i, r in enumerate(grid):
        for j, v in enumerate(r):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    return _img(fig, f"gate heatmap {title}")


def routing_heatmap(gates: dict[str, dict[str, Any]], title: str) -> str:
    """One heatmap per routing layer (SNR): rows targets, columns sources, cell the
    connection's open probability ``P(z != 0)`` (0: closed, 1: always open)."""
    from mtlrec.analysis.gates import routing_matrices

    layers = routing_matrices(gates)
    if not layers:
        return ""
    plt = _plt()
    fig, axes = plt.subplots(
        1,
        len(layers),
        figsize=(
            sum(1.5 + 0.7 * len(v["sources"]) for v in layers.values()),
            1.2 + 0.5 * max(len(v["targets"]) for v in layers.values()),
        ),
        squeeze=False,
    )
    for ax, (key, v) in zip(axes[0], layers.items(), strict=True):
        grid = [[math.nan if p is None else p for p in row] for row in v["open"]]
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(v["sources"])), v["sources"], rotation=30)
        ax.set_yticks(range(len(v["targets"])), v["targets"])
        for i, row in enumerate(grid):
            for j, p in enumerate(row):
                if not math.isnan(p):
                    c = "k" if p > 0.6 else "w"  # readable on viridis' light end
                    ax.text(j, i, f"{p:.2f}", ha="center", va="center", fontsize=7, color=c)
        ax.set_title(key, fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), label="P(open)")
    fig.suptitle(title)
    return _img(fig, f"routing heatmap {title}")


def _run_section(folder: Path, name: str) -> str:
    parts = [f"<h2>Run {html.escape(name)}</h2>"]
    recs = _read_jsonl(folder / "metrics.jsonl") if (folder / "metrics.jsonl").is_file() else []
    if recs:
        parts.append(run_curves({name: recs}, name))
        parts.append(gate_entropy_plot(recs, f"{name}: gate entropy over training"))
    if (folder / "gates.json").is_file():
        gates = _read_json(folder / "gates.json")
        parts.append(gate_heatmap(gates, f"{name}: expert use"))
        parts.append(routing_heatmap(gates, f"{name}: open routes"))
    if (folder / "summary.json").is_file():
        s = _read_json(folder / "summary.json")
        test = s.get("test") or {}
        names = sorted({m for v in test.values() for m in v if m != "count"})
        rows = [
            [t] + ["" if v.get(m) is None else f"{v[m]:.5f}" for m in names]
            for t, v in test.items()
        ]
        if rows:
            parts.append(
                f"<p>best epoch {s.get('best_epoch')} ({html.escape(str(s.get('monitor')))})</p>"
            )
            parts.append(_table(["task", *names], rows))
    return "\n".join(p for p in parts if p)


# -- comparisons --------------------------------------------------------------------------------
def seesaw_bars(cmp: Any) -> str:
    from mtlrec.analysis.compare import BASELINE

    models = [m for m in cmp.models if m != BASELINE]
    if not models or BASELINE not in cmp.models:
        return ""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(models) * len(cmp.tasks) / 2, 3.5))
    width = 0.8 / len(cmp.tasks)
    for j, t in enumerate(cmp.tasks):
        gains = [cmp.gain(m, t) for m in models]
        ax.bar([i + j * width for i in range(len(models))], gains, width, label=t)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))], models, rotation=20)
    ax.set_ylabel("MTL gain over single-task")
    ax.set_title("seesaw: gain per task (> 0 better)")
    ax.legend(fontsize=7)
    return _img(fig, "seesaw bars")


def _compare_section(folder: Path) -> str:
    from mtlrec.analysis.compare import load_compare

    cmp = load_compare(folder / "compare.json")
    header, rows = cmp.table_rows()
    parts = [
        "<h2>Comparison</h2>",
        f"<p>{len(cmp.seeds)} seed(s); test metrics, mean ± sd; epoch selected on validation. "
        "Gain: the PLE paper's MTL gain over the single-task baseline (> 0 better).</p>",
        _table(header, rows),
        seesaw_bars(cmp),
    ]
    if cmp.gates:
        parts.append("<h2>Expert utilisation (test split)</h2>")
        for m, gates in cmp.gates.items():
            parts.append(gate_heatmap(gates, m))
            parts.append(routing_heatmap(gates, f"{m}: open routes"))
            flags = [
                f"{g}: dead experts {v['dead']}" if v.get("dead") else "" for g, v in gates.items()
            ] + [f"{g}: collapsed" for g, v in gates.items() if v.get("collapsed")]
            flags = [f for f in flags if f]
            if flags:
                parts.append(f"<p>{html.escape(m)}: {html.escape('; '.join(flags))}</p>")
    lc = cmp.label_correlation
    if lc:
        parts.append("<h2>Label correlation (training split, joint sample space)</h2>")
        parts.append(
            _table(
                ["", *lc["tasks"]],
                [
                    [t] + ["" if v is None else f"{v:.3f}" for v in r]
                    for t, r in zip(lc["tasks"], lc["correlation"], strict=True)
                ],
            )
        )
    runs = folder / "runs"
    if runs.is_dir():
        parts.append("<h2>Training curves</h2>")
        by_model: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for r in sorted(runs.iterdir()):
            if (r / "metrics.jsonl").is_file():
                model = r.name.split("-s")[0]
                by_model.setdefault(model, {})[r.name] = _read_jsonl(r / "metrics.jsonl")
        for model, recs in by_model.items():
            parts.append(f"<h3>{html.escape(model)}</h3>")
            parts.append(run_curves(recs, model))
            first = next(iter(recs.values()))
            parts.append(gate_entropy_plot(first, f"{model}: gate entropy (first run)"))
    return "\n".join(p for p in parts if p)


# -- studies ------------------------------------------------------------------------------------
def _study_section(folder: Path) -> str:
    import numpy as np

    st = _read_json(folder / "study.json")
    plt = _plt()
    s = st["settings"]
    models = s["models"]
    ps = list(st["results"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in models:
        done = [p for p in ps if m in st["results"][p]["models"]]
        mu = [st["results"][p]["models"][m]["mean"] for p in done]
        sd = [st["results"][p]["models"][m]["sd"] for p in done]
        ax.errorbar([float(p) for p in done], mu, yerr=sd, marker="o", capsize=3, label=m)
    ax.set_xlabel("task correlation p")
    ax.set_ylabel("final test loss (mean ± sd over runs)")
    ax.legend(fontsize=7)
    parts = [
        "<h2>Synthetic study (MMoE paper, Section 3.2)</h2>",
        f"<p>{s['runs']} runs per point, {s['steps']} steps, lr {s['optimizer']['lr']}; "
        f"generator: {html.escape(json.dumps(st.get('generator')))}</p>",
        _img(fig, "loss vs correlation"),
    ]
    fig, axes = plt.subplots(1, len(ps), figsize=(4 * len(ps), 3.2), squeeze=False)
    for j, p in enumerate(ps):
        for m in st["results"][p]["models"]:
            c = st["results"][p]["models"][m]["curve"]
            axes[0][j].plot(
                [x["step"] for x in c],
                [sum(x["test_loss"]) / len(x["test_loss"]) for x in c],
                label=m,
            )
        axes[0][j].set_title(f"p = {p}: mean test loss")
        axes[0][j].set_xlabel("step")
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    parts.append(_img(fig, "loss curves"))
    fig, axes = plt.subplots(1, len(ps), figsize=(4 * len(ps), 3.2), squeeze=False)
    for j, p in enumerate(ps):
        res = st["results"][p]["models"]
        every = [v for m in res for v in res[m]["final_test_loss"] if v is not None]
        edges = np.histogram_bin_edges(every, bins=20) if every else 20
        for m in res:
            vals = [v for v in res[m]["final_test_loss"] if v is not None]
            axes[0][j].hist(vals, bins=edges, alpha=0.5, label=m)
        axes[0][j].set_title(f"p = {p}: final test loss over runs")
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    parts.append(_img(fig, "trainability histogram"))
    return "\n".join(parts)


def _tune_section(folder: Path) -> str:
    """``mtlrec tune``'s folder: the quality / latency plot and the trials, front marked."""
    from mtlrec.analysis.tuning import load_tune, pareto_figure, table_rows

    res = load_tune(folder)
    header, rows = table_rows(res)
    return "\n".join(
        [
            "<h2>Tuning</h2>",
            f"<p>validation {html.escape(res['metric'])} against inference latency "
            f"({html.escape(res['latency'])}); * marks the Pareto front.</p>",
            _img(pareto_figure(res, _plt()), "quality vs latency"),
            _table(header, rows),
        ]
    )


def _fusion_section(folder: Path) -> str:
    files = sorted(folder.glob("fusion*.json")) + sorted(folder.glob("fusion*.md"))
    if not files:
        return ""
    parts = ["<h2>Fusion</h2>"]
    for f in files:
        text = f.read_text(errors="replace")
        if f.suffix == ".json":
            with contextlib.suppress(json.JSONDecodeError):
                text = json.dumps(json.loads(text), indent=2)
        parts.append(f"<h3>{html.escape(f.name)}</h3><pre>{html.escape(text)}</pre>")
    return "\n".join(parts)


def build_report(folder: str | Path) -> str:
    """The HTML page of a run, comparison or study folder."""
    p = Path(folder)
    if not p.is_dir():
        raise ConfigError(f"{p}: not a folder")
    sections = []
    if (p / "compare.json").is_file():
        sections.append(_compare_section(p))
    if (p / "study.json").is_file():
        sections.append(_study_section(p))
    if (p / "metrics.jsonl").is_file():
        sections.append(_run_section(p, p.name))
    if (p / "tune.json").is_file():
        sections.append(_tune_section(p))
    fusion = _fusion_section(p)
    if not sections and not fusion:
        raise ConfigError(
            f"{p}: nothing to report (no compare.json, study.json, metrics.jsonl, tune.json "
            "or fusion*.json)"
        )
    sections.append(fusion)
    title = f"mtlrec report: {html.escape(p.resolve().name)}"
    body = "\n".join(s for s in sections if s)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body><h1>{title}</h1>\n{body}\n</body></html>\n"
    )


def write_report(folder: str | Path, output: str | Path | None = None) -> Path:
    """Build the report and write it atomically (default ``FOLDER/report.html``)."""
    out = Path(output) if output is not None else Path(folder) / "report.html"
    write_text(out, build_report(folder))
    return out
