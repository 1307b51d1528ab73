"""``mtlrec tune``: search expert count, gate depth and width, widths, learning rate and
balancing strategy with optuna (see :mod:`mtlrec.analysis.tuning`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from mtlrec.cli import friendly

    @app.command()
    @friendly
    def tune(
        config: Annotated[Path, typer.Argument(help="experiment YAML (data, schema, training)")],
        trials: Annotated[
            int | None,
            typer.Option(
                min=1,
                help="finished trials wanted in all (a resumed search runs the rest); "
                "default 20, or the grid's size with --grid",
            ),
        ] = None,
        space: Annotated[
            Path | None,
            typer.Option(help="YAML search space (default: docs/tuning.md's default space)"),
        ] = None,
        grid: Annotated[
            bool, typer.Option(help="visit every combination of the space's values (no TPE)")
        ] = False,
        output: Annotated[
            Path | None, typer.Option(help="study folder (default: <output_dir>-tune)")
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="override a config value: key.path=value (repeatable)"),
        ] = None,
        pruner: Annotated[
            str, typer.Option(help="median, hyperband or none (default: none with --grid)")
        ] = "",
        budgets: Annotated[
            str,
            typer.Option(
                help="latency budgets in ms per 1,000 rows, comma-separated, one "
                "best_under_<ms>ms.yaml each (default: the Pareto front's latencies)"
            ),
        ] = "",
        seed: Annotated[int, typer.Option(min=0, help="sampler seed")] = 0,
        latency_repeats: Annotated[
            int, typer.Option(min=1, help="timed runs per latency measurement (median)")
        ] = 15,
        remeasure: Annotated[
            int,
            typer.Option(
                min=0,
                help="measure every finished trial's latency again in this many interleaved "
                "rounds (comparable latencies on a machine whose load drifts)",
            ),
        ] = 0,
        progress: Annotated[bool, typer.Option(help="show progress bars")] = False,
    ) -> None:
        """Search the model's size, gates and training settings (optuna TPE with pruning, or a
        grid): quality/latency Pareto front and the best config per latency budget."""
        import itertools

        import yaml
        from rich.table import Table

        from mtlrec.analysis.tuning import TuneSettings, default_space, parse_space, run_tune
        from mtlrec.analysis.tuning import table_rows as tune_rows
        from mtlrec.cli import err, out
        from mtlrec.config import ExperimentConfig
        from mtlrec.errors import ConfigError

        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("mtlrec tune needs optuna: pip install 'mtlrec[search]'") from None
        cfg = ExperimentConfig.load(config, set_ or [])
        if space is not None:
            if not space.is_file():
                raise ConfigError(f"--space {space}: file not found")
            try:
                raw = yaml.safe_load(space.read_text())
            except yaml.YAMLError as e:
                raise ConfigError(f"{space}: not valid YAML ({e})") from None
            if isinstance(raw, dict) and set(raw) == {"space"}:
                raw = raw["space"]
        else:
            raw = default_space(cfg.model.name)
        dims = parse_space(raw, source=str(space or "default space"))
        n = trials
        if grid:
            axes = [g for d in dims if (g := d.grid()) is not None]
            size = len(list(itertools.product(*axes)))
            n = min(n or size, size)
        try:
            cut = tuple(float(b) for b in budgets.split(",") if b.strip())
        except ValueError:
            raise ConfigError(f"--budgets {budgets!r}: expected numbers") from None
        settings = TuneSettings(
            trials=n or 20,
            space=raw,
            grid=grid,
            pruner=pruner or ("none" if grid else "median"),
            seed=seed,
            budgets=cut,
            latency_repeats=latency_repeats,
            progress=progress,
            remeasure=remeasure,
        )
        folder = output or Path(cfg.resolve_path(cfg.output_dir + "-tune"))
        res = run_tune(cfg, folder, settings, on_trial=lambda line: err.print(f"[dim]{line}[/]"))
        header, rows = tune_rows(res, front_only=True)
        table = Table(title=f"Pareto front: validation {res['metric']} vs latency")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for r in rows:
            table.add_row(*r)
        out.print(table)
        for name, number in res["best_under"].items():
            out.print(f"wrote {folder / name} (trial {number})")
        out.print(f"wrote {folder / 'tune.json'} and {folder / 'pareto.md'}")
