"""``mtlrec compare``: models × seeds against single-task baselines (see
:mod:`mtlrec.analysis.compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    from mtlrec.cli import friendly

    @app.command()
    @friendly
    def compare(
        config: Annotated[Path, typer.Argument(help="experiment YAML (data, schema, training)")],
        models: Annotated[
            str, typer.Option(help="registered models, comma-separated; single_task = baseline")
        ] = "single_task,shared_bottom,mmoe",
        seeds: Annotated[int, typer.Option(min=1, help="seeds per model")] = 3,
        output: Annotated[
            Path | None, typer.Option(help="comparison folder (default: <output_dir>-compare)")
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="override a config value: key.path=value (repeatable)"),
        ] = None,
        model_params: Annotated[
            Path | None,
            typer.Option(help="YAML mapping model name -> params (else the model's defaults)"),
        ] = None,
        progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    ) -> None:
        """Models x seeds vs single-task baselines: test mean ± sd, MTL gain, seesaw."""
        import yaml
        from rich.table import Table

        from mtlrec.analysis.compare import run_compare
        from mtlrec.cli import err, out
        from mtlrec.config import ExperimentConfig
        from mtlrec.errors import ConfigError

        cfg = ExperimentConfig.load(config, set_ or [])
        params: dict[str, Any] = {}
        if model_params is not None:
            if not model_params.is_file():
                raise ConfigError(f"--model-params {model_params}: file not found")
            try:
                params = yaml.safe_load(model_params.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{model_params}: not valid YAML ({e})") from None
            if not isinstance(params, dict) or not all(
                isinstance(v, dict) for v in params.values()
            ):
                raise ConfigError(f"{model_params}: expected a mapping model name -> params")
        names = [m.strip() for m in models.split(",") if m.strip()]
        folder = output or Path(cfg.resolve_path(cfg.output_dir + "-compare"))
        res = run_compare(
            cfg,
            names,
            seeds,
            folder,
            model_params=params,
            progress=progress,
            on_run=lambda name: err.print(f"[dim]training {name}[/]"),
        )
        header, rows = res.table_rows()
        table = Table(
            title=f"test metrics ({len(res.seeds)} seed{'s' if len(res.seeds) > 1 else ''}); "
            "gain = PLE paper's MTL gain over single-task (> 0 better)"
        )
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for r in rows:
            table.add_row(*r)
        out.print(table)
        for m, gates in res.gates.items():
            for g, info in gates.items():
                if info.get("dead") or info.get("collapsed"):
                    err.print(
                        f"{m} gate {g}: "
                        + ("collapsed onto one expert; " if info.get("collapsed") else "")
                        + (f"dead experts {info['dead']}" if info.get("dead") else "")
                    )
        out.print(
            f"wrote {folder / 'compare.json'} and {folder / 'compare.md'} ({res.seconds:.0f} s)"
        )
