"""Pareto-front plot of a fusion search (matplotlib, the ``plot`` extra, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtlrec.errors import ConfigError
from mtlrec.fusion.search import SearchResult
from mtlrec.utils.atomic import atomic_path


def plot_pareto(
    result: SearchResult, path: str | Path, tasks: tuple[str, str] | None = None
) -> None:
    """Scatter the per-task metrics of every explored point for two tasks (the first two scored
    by default), the Pareto front as a line, the start and the best point marked; PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need the plot extra: pip install 'mtlrec[plot]'") from None
    names = result.tasks
    if len(names) < 2:
        raise ConfigError("a Pareto plot needs at least two scored tasks")
    a, b = tasks or (names[0], names[1])
    for t in (a, b):
        if t not in names:
            raise ConfigError(f"plot task {t!r} is not scored (scored: {', '.join(names)})")
    i, j = names.index(a), names.index(b)
    m = np.array([t.metrics for t in result.trials])  # [K, T]
    front = np.array([t.metrics for t in result.pareto()])
    front = front[np.argsort(front[:, i])]
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    ax.scatter(m[:, i], m[:, j], s=8, alpha=0.4, label=f"explored ({len(m)})")
    ax.plot(front[:, i], front[:, j], "-o", ms=3, color="C3", label="Pareto front (all tasks)")
    ax.scatter(*result.start.metrics[[i, j]], marker="s", s=60, color="k", label="start")
    ax.scatter(*result.best.metrics[[i, j]], marker="*", s=140, color="C2", label="best")
    metric = (
        "GAUC"
        if result.fusion is not None and result.fusion.meta.get("metric") == "gauc"
        else "AUC"
    )
    ax.set_xlabel(f"{a} {metric}")
    ax.set_ylabel(f"{b} {metric}")
    kind = result.fusion.kind if result.fusion is not None else "fusion"
    ax.set_title(f"{kind} search ({result.method}, {len(m)} points)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
