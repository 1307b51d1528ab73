"""The demo: single-task baselines, Shared-Bottom, OMoE and MMoE on census-income.

Task group 1 of the MMoE paper (income > 50K, never married), on the bundled census file split
60/20/20 by row hash. Every model's epoch is selected on the validation split (mean AUC of the
tasks); the test split is scored once, with the selected weights. The seesaw view compares each
multi-task model with the single-task baseline of every task.

The same settings are in ``examples/census/*.yaml`` (a test keeps them equal).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtlrec.config import ExperimentConfig
from mtlrec.data.loading import load_datasets
from mtlrec.models.build import build_model
from mtlrec.train.trainer import Trainer
from mtlrec.utils.atomic import write_text

DEMO_TRAINING: dict[str, Any] = {
    "epochs": 12,
    "batch_size": 512,
    "optimizer": {"name": "adam", "lr": 0.002},
    "monitor": "mean/auc",
}
DEMO_MODELS: dict[str, dict[str, Any]] = {
    "single_task": {"bottom_hidden": [128, 64], "tower_hidden": [32]},
    "shared_bottom": {"bottom_hidden": [128, 64], "tower_hidden": [32]},
    "omoe": {"num_experts": 8, "expert_hidden": [64], "tower_hidden": [32]},
    "mmoe": {"num_experts": 8, "expert_hidden": [64], "tower_hidden": [32]},
}


def demo_config(
    model: str, seed: int = 0, epochs: int | None = None, tasks: tuple[str, ...] | None = None
) -> ExperimentConfig:
    """The demo's experiment config for one model (``tasks``: a subset, for single-task
    baselines)."""
    training = {**DEMO_TRAINING, "seed": seed}
    if epochs is not None:
        training["epochs"] = epochs
    suffix = "" if tasks is None else "-" + "-".join(tasks)
    return ExperimentConfig.from_dict(
        {
            "data": {"dataset": "census-income", "options": {"task_group": 1}},
            "tasks": None if tasks is None else list(tasks),
            "model": {"name": model, "params": DEMO_MODELS[model]},
            "training": training,
            "output_dir": f"runs/census-{model}{suffix}",
        }
    )


@dataclass
class DemoResult:
    tasks: tuple[str, ...]
    # model -> task -> list of test AUC over seeds
    test_auc: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    best_epochs: dict[str, list[int | None]] = field(default_factory=dict)
    seconds: float = 0.0

    def mean(self, model: str, task: str) -> float:
        return float(np.mean(self.test_auc[model][task]))

    def sd(self, model: str, task: str) -> float:
        v = self.test_auc[model][task]
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    def gain(self, model: str, task: str) -> float:
        """Test AUC gain over the single-task baseline of the task (PLE paper's MTL gain)."""
        from mtlrec.analysis.compare import mtl_gain

        return mtl_gain(self.mean(model, task), self.mean("single_task", task), "auc")

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "test_auc": self.test_auc,
            "best_epochs": self.best_epochs,
            "seconds": self.seconds,
        }


def run_demo(
    *,
    seeds: int = 1,
    epochs: int | None = None,
    progress: bool = True,
    models: tuple[str, ...] = ("single_task", "shared_bottom", "omoe", "mmoe"),
    output: str | Path | None = None,
) -> DemoResult:
    """Train every demo model for ``seeds`` seeds and collect test AUCs."""
    t0 = time.perf_counter()
    base = demo_config("mmoe")
    data = load_datasets(base)
    pre, train, valid, test = data.preprocessor, data.train, data.valid, data.test
    assert valid is not None and test is not None
    schema = pre.schema
    result = DemoResult(schema.task_names)
    for model_name in models:
        result.test_auc[model_name] = {t: [] for t in schema.task_names}
        result.best_epochs[model_name] = []
        # a single-task baseline is one network per task, each selected on its own task
        groups = (
            [(t,) for t in schema.task_names]
            if model_name == "single_task"
            else [schema.task_names]
        )
        for seed in range(seeds):
            for tasks in groups:
                cfg = demo_config(
                    model_name, seed, epochs, tasks if model_name == "single_task" else None
                )
                sub = schema.select_tasks(tasks)
                model = build_model(model_name, sub, pre.table_sizes(), cfg.model.params)
                tcfg = cfg.training.model_copy(update={"progress": progress})
                label = f"{model_name}[{','.join(tasks)}] seed {seed}"
                trainer = Trainer(
                    model, sub, config=tcfg, monitor=cfg.monitor_key(sub), progress_label=label
                )
                fit = trainer.fit(train, valid)
                metrics = trainer.evaluate(test)
                for t in tasks:
                    result.test_auc[model_name][t].append(metrics[t]["auc"])
                result.best_epochs[model_name].append(fit.best_epoch)
    result.seconds = time.perf_counter() - t0
    if output is not None:
        write_text(Path(output) / "demo.json", json.dumps(result.to_dict(), indent=2))
    return result
