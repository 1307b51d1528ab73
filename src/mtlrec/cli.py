"""The ``mtlrec`` command.

Every error caused by input (a file, a column, a config key, a checkpoint) is printed as one line
``error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mtlrec.errors import ConfigError, MtlrecError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Multi-task ranking models: train, evaluate, predict, and a census demo.",
    pretty_exceptions_enable=False,
)
out = Console(width=max(Console().width, 120))
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


_show_warning_default = warnings.showwarning


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """mtlrec's own warnings (a config that works, but not as written; data that trains, but
    probably not as meant) as one ``warning: ...`` line on stderr; others as Python shows
    them."""
    if issubclass(category, UserWarning) and category.__module__.startswith("mtlrec"):
        err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _show_warning_default(message, category, filename, lineno, file, line)


def friendly(fn: F) -> F:
    """Turn MtlrecError into one line on stderr and exit status 2 (and mtlrec's warnings into
    one ``warning:`` line each)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except MtlrecError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _metrics_table(title: str, metrics: dict[str, dict[str, float]]) -> Table:
    """Per-task metrics and, last, each task's valid-row count ``n``. A task without a valid
    row shows ``n`` 0 and no values (never a number from nothing); an undefined value (e.g.
    AUC on one class) shows as ``—``."""
    names: list[str] = []
    for m in metrics.values():
        names += [k for k in m if k not in names and k != "count"]
    table = Table(title=title)
    table.add_column("task")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("n", justify="right")
    for task, m in metrics.items():
        count = m.get("count")
        empty = count is not None and int(count) == 0
        row = [task]
        for n in names:
            v = m.get(n)
            if v is None:
                row.append("")
            else:
                row.append("—" if empty or v != v else f"{v:.5f}")  # v != v: NaN
        row.append("" if count is None else str(int(count)))
        table.add_row(*row)
    return table


@app.command()
@friendly
def train(
    config: Annotated[Path, typer.Argument(help="experiment YAML")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a config value: key.path=value (repeatable)"),
    ] = None,
    output: Annotated[Path | None, typer.Option(help="run folder (default: output_dir)")] = None,
    overwrite: Annotated[bool, typer.Option(help="start over in an existing run folder")] = False,
    resume: Annotated[bool, typer.Option(help="resume from the folder's last checkpoint")] = True,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    nproc: Annotated[
        int, typer.Option(min=1, help="data-parallel processes on this machine (docs/scale.md)")
    ] = 1,
    strict: Annotated[
        bool,
        typer.Option(
            help="with --set model.name=NAME, refuse the file's model parameters that NAME "
            "does not take (default: drop them with a warning; mtlrec list NAME shows them)"
        ),
    ] = False,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="warm start from an earlier run folder: its weights, vocabularies grown "
            "with the new data (training.init_from; docs/continual.md)",
        ),
    ] = None,
    init_checkpoint: Annotated[
        str | None,
        typer.Option(help="the --init-from run's checkpoint: best (default) or last"),
    ] = None,
) -> None:
    """Train a model from a YAML config; writes a run folder (checkpoints, metrics, summary)."""
    from mtlrec.config import ExperimentConfig
    from mtlrec.train import distributed as ddp
    from mtlrec.train.run import train_run
    from mtlrec.train.warm_start import describe_init, init_overrides

    set_ = [*(set_ or []), *init_overrides(init_from, init_checkpoint)]
    cfg = ExperimentConfig.load(config, set_ or [], strict=strict)
    if nproc > 1:
        if ddp.env_world_size() > 1:
            raise ConfigError("--nproc inside a torchrun group: use one or the other")
        args = ["train", str(config), *[a for s in set_ or [] for a in ("--set", s)]]
        args += ["--output", str(output)] if output is not None else []
        args += ["--overwrite" if overwrite else "--no-overwrite"]
        args += ["--resume" if resume else "--no-resume"]
        args += ["--progress" if progress else "--no-progress"]
        args += ["--strict"] if strict else []
        raise typer.Exit(ddp.launch(args, nproc))
    if not progress:
        cfg = cfg.model_copy(
            update={"training": cfg.training.model_copy(update={"progress": False})}
        )
    backend = None
    if ddp.env_world_size() > 1:  # nccl between GPUs, gloo between CPU processes
        from mtlrec.train.placement import dist_backend, resolve_device

        backend = dist_backend(resolve_device(cfg.training.device))
    context = ddp.init_from_env(backend)
    try:
        result = train_run(
            cfg, output_dir=output, resume=resume, overwrite=overwrite, distributed=context
        )
    except BaseException:
        ddp.shutdown()
        raise
    ddp.shutdown(synchronize=True)
    if context is not None and not context.is_main:
        return
    fit = result.fit
    out.print(
        f"run: {result.path}  best epoch {fit.best_epoch} by valid {fit.monitor} = "
        f"{fit.best_value if fit.best_value is None else round(fit.best_value, 5)}"
        + (f"  ({fit.stop_reason})" if fit.stop_reason else "")
    )
    for line in describe_init(result.init):
        err.print(escape(line), highlight=False, soft_wrap=True)
    if result.test_metrics is not None:
        out.print(_metrics_table("test metrics (best epoch)", result.test_metrics))
    _report_unknown(result.unknown_counts.get("test", {}), "test")


def _report_unknown(counts: dict[str, int], what: str) -> None:
    shown = {k: v for k, v in counts.items() if v}
    if shown:
        err.print(
            f"{what}: unknown categories mapped to the OOV id: "
            + ", ".join(f"{k}={v}" for k, v in shown.items())
        )


@app.command()
@friendly
def evaluate(
    run: Annotated[Path, typer.Argument(help="run folder")],
    data: Annotated[Path | None, typer.Option(help="labelled CSV/Parquet file")] = None,
    split: Annotated[str, typer.Option(help="split of the run's data: test or valid")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    drift_json: Annotated[
        Path | None,
        typer.Option(help="with --data: also write the drift report here as JSON"),
    ] = None,
) -> None:
    """Per-task metrics of a trained run on its test split or on a file; with --data, the drift
    of the file from the run's training data (OOV rate per feature, positive rate and mean
    prediction per task: docs/continual.md)."""
    from mtlrec.data.file_encoding import encode_file
    from mtlrec.data.loading import load_datasets
    from mtlrec.train.run import load_run

    loaded = load_run(run)
    if data is not None:
        ds = encode_file(
            loaded.preprocessor, data, targets=True, delimiter=loaded.config.data.delimiter
        )[0]
        what = str(data)
    else:
        if split not in ("test", "valid"):
            raise typer.BadParameter("split must be test or valid")
        sets = load_datasets(loaded.config, loaded.preprocessor)
        found = sets.get(split)
        if found is None:
            raise MtlrecError(f"the run's data has no {split} split; pass --data")
        ds, what = found, sets.names[split]
    metrics = loaded.trainer().evaluate(ds)
    if as_json:
        out.print_json(json.dumps(metrics))
    else:
        out.print(_metrics_table(f"{loaded.model_name} on {what}", metrics))
    _report_unknown(ds.unknown_counts, what)
    if data is not None:
        from mtlrec.analysis.drift import run_drift
        from mtlrec.commands._drift_view import drift_tables
        from mtlrec.utils.atomic import write_text

        report = run_drift(run, ds, loaded.trainer().predict(ds))
        if drift_json is not None:
            write_text(drift_json, json.dumps(report, indent=2))
        if not as_json:
            for table in drift_tables(report, what):
                out.print(table)


@app.command()
@friendly
def predict(
    run: Annotated[Path, typer.Argument(help="run folder")],
    input: Annotated[Path, typer.Option("--input", help="CSV/Parquet file of raw features")],
    output: Annotated[Path, typer.Option("--output", help="CSV/Parquet file to write")],
    keep: Annotated[
        str, typer.Option(help="input columns to copy to the output, comma-separated")
    ] = "",
    prefix: Annotated[
        str, typer.Option(help="prefix of the prediction columns (e.g. 'pred_')")
    ] = "",
    fusion: Annotated[
        Path | None,
        typer.Option(help="fusion JSON (mtlrec fuse): adds a fused 'score' column"),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="fp32, or bf16 (autocast) when it keeps every task's validation AUC within "
            "0.001 of fp32's (checked once, saved in the run folder)"
        ),
    ] = "fp32",
) -> None:
    """Score a file: one column per task (probability, value, or one per class)."""
    import numpy as np
    import pyarrow as pa

    from mtlrec.data.file_encoding import encode_file, record_batches
    from mtlrec.data.io import file_format, write_table
    from mtlrec.train.run import load_run

    file_format(output)  # fail early on an unknown output format
    if precision not in ("fp32", "bf16"):
        raise typer.BadParameter("precision must be fp32 or bf16")
    loaded = load_run(run)
    if precision != "fp32":
        from mtlrec.train.precision_check import require_precision

        require_precision(loaded, precision)
    kept = [c for c in keep.split(",") if c]
    pred_cols = [
        f"{prefix}{t.name}_p{k}" if t.kind == "multiclass" else f"{prefix}{t.name}"
        for t in loaded.schema.primary_tasks  # auxiliary tasks are not served
        for k in range(t.output_dim)
    ]
    fuser = None
    if fusion is not None:
        from mtlrec.fusion import load_fusion

        fuser = load_fusion(
            fusion,
            [t.name for t in loaded.schema.primary_tasks if t.kind != "multiclass"],
            auxiliary=[t.name for t in loaded.schema.tasks if t.auxiliary],
        )
        pred_cols.append(f"{prefix}score")
    if clash := sorted(set(kept) & set(pred_cols)):
        raise ConfigError(
            f"--keep {','.join(clash)}: the predictions are written under the same name; "
            "pass --prefix (e.g. --prefix pred_) to keep both"
        )
    ds = encode_file(
        loaded.preprocessor, input, targets=False, delimiter=loaded.config.data.delimiter
    )[0]
    cols: dict[str, Any] = {}
    if kept:
        kept_table = pa.concat_tables(
            record_batches(input, kept, delimiter=loaded.config.data.delimiter)
        )
        cols = {c: kept_table.column(c) for c in kept}
    preds = loaded.trainer(precision=precision).predict(ds)
    for task in loaded.schema.primary_tasks:
        p = preds[task.name]
        if p.ndim == 2:
            for k in range(p.shape[1]):
                cols[f"{prefix}{task.name}_p{k}"] = pa.array(p[:, k].astype(np.float64))
        else:
            cols[f"{prefix}{task.name}"] = pa.array(p.astype(np.float64))
    if fuser is not None:  # one list per request when the data has the group column
        groups = None if ds.groups is None else ds.groups.numpy()
        cols[f"{prefix}score"] = pa.array(np.asarray(fuser(preds, groups), dtype=np.float64))
    write_table(pa.table(cols), output)
    out.print(f"wrote {len(ds)} rows to {output}")
    _report_unknown(ds.unknown_counts, str(input))


def _load_command_modules() -> None:
    """Commands of the optional parts live in ``mtlrec.commands.<name>`` modules, each with a
    ``register(app)`` function (they import their heavy dependencies inside the commands, so
    ``mtlrec --help`` stays fast)."""
    import importlib
    import pkgutil

    from mtlrec import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"mtlrec.commands.{info.name}").register(app)


_load_command_modules()


def main() -> None:
    """Entry point of the ``mtlrec`` console script (opts the process in to the speed and
    memory settings of :mod:`mtlrec.utils.runtime`; a library import does not)."""
    from mtlrec.utils.runtime import enable_process_tuning

    enable_process_tuning()
    try:
        app()
    except SystemExit as e:  # click's usage errors already exit with 2
        sys.exit(e.code)


if __name__ == "__main__":
    main()
