"""A run's lineage (``lineage.json`` in its folder): where its weights started and what data
it saw.

Every run writes one when it is created::

    {
      "format": 1,
      "parent": null | {"run": "/abs/path/of/the/earlier/run", "checkpoint": "best",
                        "checkpoint_file": "checkpoints/best.safetensors", "epoch": 3,
                        "schema_fingerprint": "...", "model": "mmoe"},
      "data": [{"role": "train", "path": "/abs/day2.parquet", "bytes": 123, "mtime_ns": ...}],
      "init": {...what the warm start, pretrained vectors did...},
      "ancestors": [the parent's own parent entry, its parent's, ...]
    }

Data files are recorded by absolute path, size and modification time (hashing a file of
gigabytes would cost as much as reading it); a built-in data set by its name and options.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtlrec.config import ExperimentConfig
from mtlrec.utils.atomic import write_text

LINEAGE_FILE = "lineage.json"
LINEAGE_FORMAT = 1


def data_files(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """The data a config reads: one entry per file (role, absolute path, bytes, mtime) or the
    built-in data set."""
    d = cfg.data
    if d.dataset is not None:
        return [{"role": "dataset", "name": d.dataset, "options": d.options}]
    out = []
    for role in ("train", "valid", "test"):
        rel = getattr(d, role)
        if not rel:
            continue
        p = Path(cfg.resolve_path(rel)).resolve()
        entry: dict[str, Any] = {"role": role, "path": str(p)}
        if p.is_file():
            st = p.stat()
            entry |= {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        out.append(entry)
    return out


def read_lineage(run: str | Path) -> dict[str, Any] | None:
    """A run folder's lineage, or None when it has none (runs of earlier versions)."""
    p = Path(run) / LINEAGE_FILE
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def write_lineage(
    out: str | Path,
    cfg: ExperimentConfig,
    *,
    parent: dict[str, Any] | None = None,
    init: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out/lineage.json`` (atomically) and return its content.

    Args:
        out: the run folder.
        cfg: the run's config (its data files are recorded).
        parent: the earlier run's entry (``run``, ``checkpoint``, ``schema_fingerprint``...),
            None for a run trained from scratch.
        init: what the initialisation did (vocabulary growth, tasks, pretrained vectors).
    """
    ancestors: list[dict[str, Any]] = []
    if parent is not None:
        before = read_lineage(parent["run"])
        if before is not None and before.get("parent") is not None:
            ancestors = [before["parent"], *before.get("ancestors", [])]
    data = {
        "format": LINEAGE_FORMAT,
        "parent": parent,
        "data": data_files(cfg),
        "init": init or {},
        "ancestors": ancestors,
    }
    write_text(Path(out) / LINEAGE_FILE, json.dumps(data, indent=2, default=str))
    return data
