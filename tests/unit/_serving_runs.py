"""Tiny trained run folders for the export and serving tests (a few steps each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mtlrec.config import ExperimentConfig
from mtlrec.errors import ConfigError
from mtlrec.registry import MODELS
from mtlrec.testing import tiny_table
from mtlrec.train.run import train_run

FEATURES: list[dict[str, Any]] = [
    {"type": "sparse", "name": "user", "embedding_dim": 4},
    {"type": "sparse", "name": "item", "embedding_dim": 4, "table": "item"},
    {"type": "dense", "name": "price", "transform": "log1p_standardize"},
    {"type": "sequence", "name": "hist", "embedding_dim": 4, "table": "item", "max_len": 5},
]
TASKS: list[dict[str, Any]] = [
    {"name": "click", "kind": "binary"},
    {"name": "watch", "kind": "regression", "mask": "click"},
]
# small widths for whichever of these options a model has
SMALL = {
    "num_experts": 2,
    "expert_hidden": [8],
    "bottom_hidden": [8],
    "tower_hidden": [4],
    "hidden": [8],
}


def small_params(model: str) -> dict[str, Any]:
    params = MODELS.get(model).params
    fields = params.model_fields if params is not None else {}
    out: dict[str, Any] = {}
    for k, v in SMALL.items():
        if k in fields:
            default = fields[k].default
            out[k] = (v[0] if isinstance(v, list) else v) if isinstance(default, int) else v
    return out


def make_run(folder: Path, model: str = "mmoe", rows: int = 300) -> Path:
    """Train ``model`` for one epoch on :func:`tiny_table` rows; returns the run folder.

    Raises:
        ConfigError: the model cannot be built for the tiny schema.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny.parquet"
    if not data.is_file():
        pq.write_table(tiny_table(rows), data)
    cfg = ExperimentConfig.from_dict(
        {
            "data": {"train": str(data), "split": {"fractions": [0.7, 0.15, 0.15], "seed": 0}},
            "schema": {"features": FEATURES, "tasks": TASKS},
            "model": {"name": model, "params": small_params(model)},
            "training": {
                "epochs": 1,
                "batch_size": 64,
                "optimizer": {"lr": 0.01},
                "progress": False,
                "num_threads": 1,
            },
            "output_dir": str(folder / f"run-{model}"),
        }
    )
    try:
        res = train_run(cfg, overwrite=True)
    except (ConfigError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return res.path
