"""The search loop of ``mtlrec tune``: optuna study in the output folder, one
:func:`~mtlrec.train.run.train_run` per trial with per-epoch pruning, latency and parameter
count, resumption of a stopped search. See :mod:`mtlrec.analysis.tuning`."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from mtlrec.analysis.tuning.results import LATENCY_ROWS, format_value, write_outputs
from mtlrec.analysis.tuning.space import apply_values, parse_space
from mtlrec.config import ExperimentConfig, monitor_key
from mtlrec.errors import ConfigError, TrainingError
from mtlrec.metrics.selection import is_better
from mtlrec.train.callbacks import Callback
from mtlrec.utils.atomic import write_text

if TYPE_CHECKING:
    import optuna

    from mtlrec.batch import Features
    from mtlrec.models.base import MultiTaskModel
    from mtlrec.train.state import TrainerView, TrainState


@torch.inference_mode()
def latency_ms(
    model: MultiTaskModel, features: Features, *, warmup: int = 3, repeats: int = 15
) -> float:
    """Milliseconds to score 1,000 rows: ``features`` (a batch of ``LATENCY_ROWS`` rows) through
    the model in eval mode on one thread, ``warmup`` untimed runs, then the median of
    ``repeats`` timed ones (scaled to 1,000 rows)."""
    threads = torch.get_num_threads()
    was_training = model.training
    model.eval()
    torch.set_num_threads(1)
    try:
        for _ in range(warmup):
            model(features).predictions()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(features).predictions()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    return 1000.0 * statistics.median(times) * LATENCY_ROWS / features.batch_size


class PruningCallback(Callback):
    """Reports the monitored validation value to an optuna trial after every epoch and stops
    the trial (``optuna.TrialPruned``) when its pruner says so."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def on_epoch_end(self, trainer: TrainerView, state: TrainState, record: dict[str, Any]) -> None:
        import optuna

        value = (record.get("monitor") or {}).get("value")
        if value is None:
            return
        epoch = int(record["epoch"])
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} ({float(value):.5f})")


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """``median`` (after 2 finished trials, from the second epoch), ``hyperband`` or ``none``."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {name!r}: choose median, hyperband or none")


@dataclass
class TuneSettings:
    """How to search (what ``mtlrec tune``'s options set).

    Args:
        trials: finished (complete or pruned) trials wanted in all; a resumed search runs the
            rest.
        space: the search space as written in YAML (:func:`~mtlrec.analysis.tuning.parse_space`).
        grid: every combination of the space's values instead of TPE.
        pruner: ``median``, ``hyperband`` or ``none`` (:func:`make_pruner`).
        seed: the sampler's seed.
        budgets: latency budgets in ms per 1,000 rows (default: the front's latencies).
        latency_repeats: timed runs per latency measurement (their median counts).
        progress: progress bars while trials train.
        remeasure: after the search, measure every finished trial's latency again in this
            many interleaved rounds (:func:`remeasure_latency`; 0: keep each trial's own).

    Example:
        >>> TuneSettings(trials=4, space={"num_experts": [2, 4]}, grid=True).pruner
        'median'
    """

    trials: int
    space: dict[str, Any]
    grid: bool = False
    pruner: str = "median"
    seed: int = 0
    budgets: tuple[float, ...] = ()
    latency_repeats: int = 15
    progress: bool = False
    remeasure: int = 0


def run_tune(
    cfg: ExperimentConfig,
    output: str | Path,
    settings: TuneSettings,
    *,
    on_trial: Callable[[str], None] | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Run (or resume) a search; returns what ``tune.json`` holds.

    Args:
        cfg: the base experiment (its data, schema, training and monitor).
        output: the study folder (``study.db``, ``trials/``, ``tune.json``, ``pareto.md``,
            ``best_under_<ms>ms.yaml``).
        settings: trials wanted in all (finished ones count: a resumed search runs the rest),
            space, grid or TPE, pruner, seed, latency budgets.
        on_trial: called with a line per finished trial.
        callbacks: extra trainer callbacks of every trial (tests).

    Raises:
        ConfigError: a bad space, or a folder holding a search of another config or space.
    """
    import optuna

    from mtlrec.data.loading import load_datasets
    from mtlrec.train.run import load_run, train_run

    out = Path(output)
    dims = parse_space(settings.space)
    _check_same_search(out, cfg, settings)
    data = load_datasets(cfg)
    eval_ds = data.test or data.valid
    if eval_ds is None or data.valid is None:
        raise ConfigError("tune needs validation rows (to compare trials) and test rows")
    task, metric = monitor_key(cfg.training.monitor, data.preprocessor.schema)
    higher = is_better(metric, 1.0, 0.0)
    rows = eval_ds.features_at(torch.arange(LATENCY_ROWS) % len(eval_ds))
    del data
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if settings.grid:
        axes = {d.name: g for d in dims if (g := d.grid()) is not None}
        sampler: optuna.samplers.BaseSampler = optuna.samplers.GridSampler(axes, seed=settings.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=settings.seed)
    study = optuna.create_study(
        study_name="mtlrec-tune",
        storage=f"sqlite:///{(out / 'study.db').resolve()}",
        load_if_exists=True,
        direction="maximize" if higher else "minimize",
        sampler=sampler,
        pruner=make_pruner(settings.pruner, cfg.training.epochs),
    )
    _retry_interrupted(study)

    def objective(trial: optuna.Trial) -> float:
        values = {d.name: d.suggest(trial) for d in dims}
        run_dir = trial.user_attrs.get("run_dir") or f"trials/{trial.number:04d}"
        trial.set_user_attr("run_dir", run_dir)
        tcfg = apply_values(cfg, values)
        tcfg = tcfg.model_copy(
            update={"training": tcfg.training.model_copy(update={"progress": settings.progress})}
        )
        trial.set_user_attr("config", yaml.safe_load(tcfg.to_yaml()))
        try:
            res = train_run(
                tcfg,
                output_dir=out / run_dir,
                callbacks=[PruningCallback(trial), *callbacks],
                progress_label=f"trial {trial.number}",
            )
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        model = load_run(out / run_dir).model
        trial.set_user_attr("latency_ms", latency_ms(model, rows, repeats=settings.latency_repeats))
        trial.set_user_attr("n_params", sum(p.numel() for p in model.parameters()))
        trial.set_user_attr("test", res.test_metrics)
        trial.set_user_attr("best_epoch", res.fit.best_epoch)
        return float(res.fit.best_value)

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        write_outputs(out, study, cfg, f"{task}/{metric}", higher, settings.budgets)
        if on_trial is not None:
            on_trial(_trial_line(trial))

    done = _finished(study)
    if settings.trials > done:
        study.optimize(
            objective,
            n_trials=settings.trials - done,
            callbacks=[after],
            catch=(TrainingError,),
        )
    if settings.remeasure:
        remeasure_latency(
            out, study, rows, rounds=settings.remeasure, repeats=settings.latency_repeats
        )
    return write_outputs(out, study, cfg, f"{task}/{metric}", higher, settings.budgets)


def remeasure_latency(
    out: Path, study: optuna.Study, rows: Features, *, rounds: int = 5, repeats: int = 15
) -> dict[int, float]:
    """Measure every finished trial's latency again, in interleaved rounds: each round measures
    every trial once (:func:`latency_ms`, the order rotated from round to round), and a trial's
    latency is the median over the rounds. On a shared machine whose load drifts, this makes
    the trials comparable (each trial's own measurement saw only the load of its moment).
    Written to ``OUT/latency.json``, which :func:`~mtlrec.analysis.tuning.write_outputs` uses
    in place of the trials' own measurements.

    Returns:
        Trial number -> ms per 1,000 rows.
    """
    from optuna.trial import TrialState

    from mtlrec.train.run import load_run

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    dirs = {t.number: out / t.user_attrs["run_dir"] for t in trials if "run_dir" in t.user_attrs}
    times: dict[int, list[float]] = {n: [] for n in dirs}
    order = list(dirs)
    for r in range(rounds):
        for n in order[r % max(len(order), 1) :] + order[: r % max(len(order), 1)]:
            times[n].append(latency_ms(load_run(dirs[n]).model, rows, repeats=repeats))
    ms = {n: statistics.median(v) for n, v in times.items() if v}
    record = {
        "method": f"{rounds} interleaved rounds, each the median of {repeats} timed runs "
        f"after 3 warm-up runs, 1 thread; the median over the rounds",
        "ms": {str(n): v for n, v in ms.items()},
        "rounds": {str(n): v for n, v in times.items()},
    }
    write_text(out / "latency.json", json.dumps(record, indent=2))
    return ms


def _finished(study: optuna.Study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _retry_interrupted(study: optuna.Study) -> None:
    """Queue again every trial a stopped search left unfinished (still ``RUNNING``: the process
    was killed; or failed by an interrupt), once, with its run folder, so it resumes from its
    last checkpoint. One search process per folder is assumed."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == TrialState.RUNNING:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")):
            continue
        if t.number in retried or "retry_of" in t.user_attrs or not t.params:
            continue
        attrs = {"retry_of": t.number, "run_dir": t.user_attrs.get("run_dir")}
        study.enqueue_trial(t.params, user_attrs={k: v for k, v in attrs.items() if v})


def _check_same_search(out: Path, cfg: ExperimentConfig, settings: TuneSettings) -> None:
    """Write ``tune.yaml`` (the base config and space) or refuse a folder of another search."""
    mine = {
        "config": yaml.safe_load(cfg.to_yaml()),
        "space": settings.space,
        "grid": settings.grid,
        "pruner": settings.pruner,
        "seed": settings.seed,
    }
    mine = json.loads(json.dumps(mine))
    mine["config"].pop("output_dir", None)  # where the runs would go is no difference
    path = out / "tune.yaml"
    if path.is_file():
        saved = yaml.safe_load(path.read_text()) or {}
        diff = [k for k in mine if saved.get(k) != mine[k]]
        if diff:
            raise ConfigError(
                f"{out} holds a search of another {' and '.join(diff)}; to resume it, run the "
                f"same command; to start over, remove the folder or choose another --output"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(mine, sort_keys=False))


def _trial_line(t: optuna.trial.FrozenTrial) -> str:
    values = ", ".join(f"{k}={format_value(v)}" for k, v in t.params.items())
    if t.value is None:
        return f"trial {t.number} {t.state.name.lower()}: {values}"
    lat = t.user_attrs.get("latency_ms")
    return (
        f"trial {t.number}: {values} -> {t.value:.5f}"
        + (f", {lat:.2f} ms/1k" if lat is not None else "")
        + (f", {t.user_attrs['n_params']:,} params" if "n_params" in t.user_attrs else "")
    )
