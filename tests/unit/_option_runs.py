"""A tiny trained run with the bias-tower and auxiliary-task options (for the export, serving
and option tests): the features of :func:`mtlrec.testing.tiny_bias_schema` (bias features
``pos``, ``dev``), tasks ``click``, ``watch`` and the auxiliary ``domain``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from _serving_runs import small_params

from mtlrec.config import ExperimentConfig
from mtlrec.testing import tiny_bias_schema, tiny_bias_table
from mtlrec.train.run import train_run

OPTIONS: dict[str, Any] = {
    "bias_tower": {"tasks": ["click"], "hidden": [4], "serve_as": {"pos": 0}},
    "adversarial_tasks": {"domain": 0.5},
    "next_item": {"feature": "hist"},
}


def options_run(
    folder: Path,
    model: str = "mmoe",
    *,
    options: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    rows: int = 300,
) -> Path:
    """Train ``model`` with ``options`` (default :data:`OPTIONS`) for one epoch; returns the
    run folder."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "bias.parquet"
    if not data.is_file():
        pq.write_table(tiny_bias_table(rows), data)
    schema = json.loads(tiny_bias_schema().to_json())
    opts = OPTIONS if options is None else options
    key = json.dumps([opts, training or {}], sort_keys=True).encode()
    name = f"run-{model}-{hashlib.sha256(key).hexdigest()[:8]}"
    cfg = ExperimentConfig.from_dict(
        {
            "data": {"train": str(data), "split": {"fractions": [0.7, 0.15, 0.15], "seed": 0}},
            "schema": schema,
            "model": {"name": model, "params": {**small_params(model), **opts}},
            "training": {
                "epochs": 1,
                "batch_size": 64,
                "optimizer": {"lr": 0.01},
                "progress": False,
                "num_threads": 1,
                **(training or {}),
            },
            "output_dir": str(folder / name),
        }
    )
    return train_run(cfg, overwrite=True).path
