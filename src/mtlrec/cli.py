"""The ``mtlrec`` command.

Every error caused by input (a file, a column, a config key, a checkpoint) is printed as one line
``error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from mtlrec.errors import ConfigError, MtlrecError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Multi-task ranking models: train, evaluate, predict, and a census demo.",
    pretty_exceptions_enable=False,
)
synth_app = typer.Typer(help="Write synthetic data sets.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")
out = Console(width=max(Console().width, 120))
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn MtlrecError into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MtlrecError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _metrics_table(title: str, metrics: dict[str, dict[str, float]]) -> Table:
    names: list[str] = []
    for m in metrics.values():
        names += [k for k in m if k not in names]
    table = Table(title=title)
    table.add_column("task")
    for n in names:
        table.add_column(n, justify="right")
    for task, m in metrics.items():
        row = [task]
        for n in names:
            v = m.get(n)
            row.append("" if v is None else (str(int(v)) if n == "count" else f"{v:.5f}"))
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
) -> None:
    """Train a model from a YAML config; writes a run folder (checkpoints, metrics, summary)."""
    from mtlrec.config import ExperimentConfig
    from mtlrec.train import distributed as ddp
    from mtlrec.train.run import train_run

    cfg = ExperimentConfig.load(config, set_ or [])
    if nproc > 1:
        if ddp.env_world_size() > 1:
            raise ConfigError("--nproc inside a torchrun group: use one or the other")
        args = ["train", str(config), *[a for s in set_ or [] for a in ("--set", s)]]
        args += ["--output", str(output)] if output is not None else []
        args += ["--overwrite" if overwrite else "--no-overwrite"]
        args += ["--resume" if resume else "--no-resume"]
        args += ["--progress" if progress else "--no-progress"]
        raise typer.Exit(ddp.launch(args, nproc))
    if not progress:
        cfg = cfg.model_copy(
            update={"training": cfg.training.model_copy(update={"progress": False})}
        )
    context = ddp.init_from_env()
    try:
        result = train_run(
            cfg, output_dir=output, resume=resume, overwrite=overwrite, distributed=context
        )
    finally:
        ddp.shutdown()
    if context is not None and not context.is_main:
        return
    fit = result.fit
    out.print(
        f"run: {result.path}  best epoch {fit.best_epoch} by valid {fit.monitor} = "
        f"{fit.best_value if fit.best_value is None else round(fit.best_value, 5)}"
        + (f"  ({fit.stop_reason})" if fit.stop_reason else "")
    )
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
) -> None:
    """Per-task metrics of a trained run on its test split or on a file."""
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
) -> None:
    """Score a file: one column per task (probability, value, or one per class)."""
    import numpy as np
    import pyarrow as pa

    from mtlrec.data.file_encoding import encode_file, record_batches
    from mtlrec.data.io import file_format, write_table
    from mtlrec.train.run import load_run

    file_format(output)  # fail early on an unknown output format
    loaded = load_run(run)
    kept = [c for c in keep.split(",") if c]
    pred_cols = [
        f"{prefix}{t.name}_p{k}" if t.kind == "multiclass" else f"{prefix}{t.name}"
        for t in loaded.schema.tasks
        for k in range(t.output_dim)
    ]
    fuser = None
    if fusion is not None:
        from mtlrec.fusion import load_fusion

        fuser = load_fusion(fusion, [t.name for t in loaded.schema.tasks if t.kind != "multiclass"])
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
    preds = loaded.trainer().predict(ds)
    for task in loaded.schema.tasks:
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


@app.command("list")
def list_() -> None:
    """The registered models, balancing strategies and fusions."""
    from mtlrec.registry import FUSIONS, MODELS, WEIGHTINGS

    for title, reg in (
        ("models", MODELS),
        ("balancing strategies", WEIGHTINGS),
        ("fusions (mtlrec fuse)", FUSIONS),
    ):
        table = Table(title=title)
        table.add_column("name")
        table.add_column("description")
        for e in reg.entries():
            table.add_row(e.name, e.description)
        out.print(table)


@app.command()
@friendly
def demo(
    seeds: Annotated[int, typer.Option(min=1, help="seeds per model")] = 1,
    epochs: Annotated[int | None, typer.Option(min=1, help="epochs (default 12)")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    output: Annotated[Path | None, typer.Option(help="write demo.json here")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads")] = None,
) -> None:
    """Census-income (MMoE paper, task group 1): single-task, Shared-Bottom, OMoE, MMoE."""
    from mtlrec.demo import run_demo
    from mtlrec.utils.runtime import configure_runtime

    configure_runtime(threads, True)
    err.print("census-income: 60/20/20 split by row hash; epoch chosen on validation mean AUC")
    res = run_demo(seeds=seeds, epochs=epochs, progress=progress, output=output)
    table = Table(
        title=f"census-income test AUC ({seeds} seed{'s' if seeds > 1 else ''}); "
        "gain = AUC - single-task AUC"
    )
    table.add_column("model", no_wrap=True)
    for t in res.tasks:
        table.add_column(t, justify="right", no_wrap=True)
    for t in res.tasks:
        table.add_column(f"gain {t}", justify="right", no_wrap=True)
    table.add_column("seesaw")
    for m in res.test_auc:
        cells = []
        for t in res.tasks:
            cell = f"{res.mean(m, t):.4f}"
            if seeds > 1:
                cell += f" ± {res.sd(m, t):.4f}"
            cells.append(cell)
        gains = [round(res.gain(m, t), 4) for t in res.tasks]  # at the shown precision
        if m == "single_task":
            cells += ["—"] * len(res.tasks) + [""]
        else:
            cells += [f"{g:+.4f}" for g in gains]
            cells.append("yes" if max(gains) > 0 > min(gains) else "no")
        table.add_row(m, *cells)
    out.print(table)
    out.print(f"{res.seconds:.0f} s")


@synth_app.command("mmoe")
@friendly
def synth_mmoe(
    output: Annotated[Path, typer.Option(help="CSV/Parquet file to write")],
    correlation: Annotated[float, typer.Option(help="task correlation p (cosine of w1, w2)")],
    rows: Annotated[int, typer.Option(min=1)] = 10_000,
    preset: Annotated[str, typer.Option(help="mmoe-fig2 or ple2020")] = "mmoe-fig2",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """The MMoE paper's synthetic regression pair (Section 3.2); constants in a .json beside."""
    from mtlrec.data.io import write_table
    from mtlrec.data.synthetic import make_mmoe_synthetic
    from mtlrec.utils.atomic import write_text

    table, meta = make_mmoe_synthetic(correlation, rows, preset=preset, seed=seed)
    write_table(table, output)
    write_text(str(output) + ".json", json.dumps(meta, indent=2))
    out.print(
        f"wrote {rows} rows to {output}; label correlation "
        f"{meta.get('label_correlation', float('nan')):.3f}; constants in {output}.json"
    )


@synth_app.command("ctr")
@friendly
def synth_ctr(
    output: Annotated[Path, typer.Option(help="CSV/Parquet file to write")],
    rows: Annotated[int, typer.Option(min=1)] = 100_000,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """A CTR-style table: 26 Zipf categorical fields, 13 dense, click and conversion labels."""
    from mtlrec.data.io import write_table
    from mtlrec.data.synthetic import make_ctr_table

    write_table(make_ctr_table(rows, seed=seed), output)
    out.print(f"wrote {rows} rows to {output}")


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
    """Entry point of the ``mtlrec`` console script."""
    try:
        app()
    except SystemExit as e:  # click's usage errors already exit with 2
        sys.exit(e.code)


if __name__ == "__main__":
    main()
