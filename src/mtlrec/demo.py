"""The demo: single-task baselines, Shared-Bottom, OMoE and MMoE on census-income.

Task group 1 of the MMoE paper (income > 50K, never married), on the bundled census file split
60/20/20 by row hash. Every model's epoch is selected on the validation split (mean AUC of the
tasks); the test split is scored once, with the selected weights. The seesaw view compares each
multi-task model with the single-task baseline of every task, with the noise-aware rule of
:mod:`mtlrec.analysis.compare` (a seesaw needs a clear gain on one task and a clear loss on
another; with one seed there is no noise estimate, and no seesaw is flagged).

Every model is seeded as :func:`mtlrec.train.run.train_run` seeds it (``training.seed`` before
the model is built), so a seed's numbers for a model do not depend on which other models the
demo trains.

The same settings are in ``examples/census/*.yaml`` (a test keeps them equal).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlrec.config import ExperimentConfig
from mtlrec.data.loading import load_datasets
from mtlrec.models.build import build_model
from mtlrec.train.trainer import Trainer
from mtlrec.utils.atomic import write_text

# Up to 20 epochs, stopped 3 epochs after the best validation epoch. With a fixed 12 epochs the
# best epoch was the 11th or 12th in 5 of the 9 multi-task runs of benchmarks/RESULTS.md (3
# seeds: Shared-Bottom 12, 12, 9; OMoE 10, 12, 11; MMoE 10, 9, 11), so they were cut short;
# the single-task networks peaked at epochs 8-9 in 5 of 6 runs and now stop there + 3.
DEMO_TRAINING: dict[str, Any] = {
    "epochs": 20,
    "batch_size": 512,
    "optimizer": {"name": "adam", "lr": 0.002},
    "monitor": "mean/auc",
    "early_stopping": {"patience": 3},
}
DEMO_MODELS: dict[str, dict[str, Any]] = {
    "single_task": {"bottom_hidden": [128, 64], "tower_hidden": [32]},
    "shared_bottom": {"bottom_hidden": [128, 64], "tower_hidden": [32]},
    "omoe": {"num_experts": 8, "expert_hidden": [64], "tower_hidden": [32]},
    "mmoe": {"num_experts": 8, "expert_hidden": [64], "tower_hidden": [32]},
}
SEESAW_CAPTION = (
    "Seesaw: a multi-task model gains on one task but loses on another, against the "
    "single-task networks. A gain or loss counts only beyond 1.96 standard errors of the seed "
    "noise (marked * in the gain columns)."
)


def demo_config(
    model: str,
    seed: int = 0,
    epochs: int | None = None,
    tasks: tuple[str, ...] | None = None,
    data_options: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """The demo's experiment config for one model (``tasks``: a subset, for single-task
    baselines; ``data_options``: census-income options, e.g. another ``path``)."""
    training = {**DEMO_TRAINING, "seed": seed}
    if epochs is not None:
        training["epochs"] = epochs
    suffix = "" if tasks is None else "-" + "-".join(tasks)
    return ExperimentConfig.from_dict(
        {
            "data": {
                "dataset": "census-income",
                "options": {"task_group": 1, **(data_options or {})},
            },
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
    epochs_run: dict[str, list[int]] = field(default_factory=dict)
    seeds: int = 1
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

    def comparison(self) -> Any:
        """The same numbers as a :class:`mtlrec.analysis.compare.CompareResult` (its gain,
        standard error and seesaw rule)."""
        from mtlrec.analysis.compare import CompareResult

        return CompareResult(
            tasks=self.tasks,
            primary=dict.fromkeys(self.tasks, "auc"),
            seeds=list(range(self.seeds)),
            metrics={
                m: {t: {"auc": list(v)} for t, v in per_task.items()}
                for m, per_task in self.test_auc.items()
            },
            best_epochs=dict(self.best_epochs),
            seconds=self.seconds,
        )

    def seesaw(self, model: str) -> bool | None:
        """Whether ``model`` shows the seesaw beyond the seed noise; None with one seed (no
        noise estimate: the sign of a gain of 0.0002 may be noise) and for the baseline."""
        if model == "single_task" or self.seeds < 2 or "single_task" not in self.test_auc:
            return None
        return bool(self.comparison().seesaw(model))

    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the demo's table: test AUC per task (mean ± sd with several
        seeds), gain per task (``*``: beyond the noise), and the seesaw flag."""
        header, rows = self.comparison().table_rows()
        header = ["model", *self.tasks, *header[1 + len(self.tasks) :]]
        if self.seeds < 2:
            for row in rows:
                if row[0] != "single_task":
                    row[-1] = "n/a (1 seed)"
        return header, rows

    def caption(self) -> str:
        """What the table shows, the seesaw column included."""
        if self.seeds > 1:
            return SEESAW_CAPTION
        return SEESAW_CAPTION + (
            " With one seed the noise is unknown, so no seesaw is flagged (n/a): "
            "--seeds 3 measures it."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "test_auc": self.test_auc,
            "best_epochs": self.best_epochs,
            "epochs_run": self.epochs_run,
            "seesaw": {m: self.seesaw(m) for m in self.test_auc if m != "single_task"},
            "seconds": self.seconds,
        }


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}:{s:02d}"


def run_demo(
    *,
    seeds: int = 1,
    epochs: int | None = None,
    progress: bool = True,
    models: tuple[str, ...] = ("single_task", "shared_bottom", "omoe", "mmoe"),
    output: str | Path | None = None,
    data_options: dict[str, Any] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Train every demo model for ``seeds`` seeds and collect test AUCs.

    Args:
        seeds: seeds per model (0, 1, ...).
        epochs: the most epochs of a run (default: the demo's; early stopping may end it).
        progress: a progress bar per epoch.
        models: the demo models to train.
        output: folder for ``demo.json``.
        data_options: census-income options (e.g. ``path`` of a smaller file, for tests).
        on_progress: called with one line before each run: run k of n, its epochs, and the
            time elapsed and left (estimated from the runs so far).
    """
    t0 = time.perf_counter()
    base = demo_config("mmoe", data_options=data_options)
    data = load_datasets(base)
    pre, train, valid, test = data.preprocessor, data.train, data.valid, data.test
    assert valid is not None and test is not None
    schema = pre.schema
    result = DemoResult(schema.task_names, seeds=seeds)
    # a single-task baseline is one network per task, each selected on its own task
    plan = [
        (model_name, seed, tasks)
        for model_name in models
        for seed in range(seeds)
        for tasks in (
            [(t,) for t in schema.task_names]
            if model_name == "single_task"
            else [schema.task_names]
        )
    ]
    for model_name in models:
        result.test_auc[model_name] = {t: [] for t in schema.task_names}
        result.best_epochs[model_name] = []
        result.epochs_run[model_name] = []
    train_seconds, epochs_done = 0.0, 0
    for k, (model_name, seed, tasks) in enumerate(plan, start=1):
        cfg = demo_config(
            model_name,
            seed,
            epochs,
            tasks if model_name == "single_task" else None,
            data_options=data_options,
        )
        planned = cfg.training.epochs
        label = f"{model_name}[{','.join(tasks)}] seed {seed}"
        if on_progress is not None:
            runs_done = k - 1
            if epochs_done:
                per_run = min(planned, epochs_done / runs_done)  # early stopping shortens runs
                left = (len(plan) - runs_done) * per_run * train_seconds / epochs_done
                eta = f"about {_clock(left)} left"
            else:
                eta = "time left known after the first run"
            stop = cfg.training.early_stopping
            upto = f"up to {planned} epoch{'s' if planned != 1 else ''}" + (
                f" (early stopping after {stop.patience} without improvement)" if stop else ""
            )
            on_progress(
                f"[{k}/{len(plan)}] {label}: {upto}; "
                f"{_clock(time.perf_counter() - t0)} elapsed, {eta}"
            )
        sub = schema.select_tasks(tasks)
        params = cfg.model.params
        # training.seed fixes the initial weights as in train_run: a model's numbers for a seed
        # do not depend on the models trained before it
        torch.manual_seed(cfg.training.seed)
        model = build_model(model_name, sub, pre.table_sizes(), params)
        tcfg = cfg.training.model_copy(update={"progress": progress})
        trainer = Trainer(
            model, sub, config=tcfg, monitor=cfg.monitor_key(sub), progress_label=f"[{k}] {label}"
        )
        t_run = time.perf_counter()
        fit = trainer.fit(train, valid)
        train_seconds += time.perf_counter() - t_run
        epochs_done += fit.epochs_run
        metrics = trainer.evaluate(test)
        for t in tasks:
            result.test_auc[model_name][t].append(metrics[t]["auc"])
        result.best_epochs[model_name].append(fit.best_epoch)
        result.epochs_run[model_name].append(fit.epochs_run)
    result.seconds = time.perf_counter() - t0
    if output is not None:
        write_text(Path(output) / "demo.json", json.dumps(result.to_dict(), indent=2))
    return result
