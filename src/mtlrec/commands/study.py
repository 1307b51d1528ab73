"""``mtlrec study synthetic``: the MMoE paper's synthetic study (see
:mod:`mtlrec.analysis.study`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from mtlrec.cli import friendly

    study_app = typer.Typer(help="Studies of task relationships.", no_args_is_help=True)
    app.add_typer(study_app, name="study")

    @study_app.command("synthetic")
    @friendly
    def synthetic(
        output: Annotated[Path, typer.Option(help="folder for study.json and study.md")],
        correlations: Annotated[str, typer.Option(help="task correlations p")] = "0.5,0.9,1.0",
        models: Annotated[
            str, typer.Option(help="models (default: shared_bottom,omoe,mmoe and ple if there)")
        ] = "",
        runs: Annotated[int, typer.Option(min=1, help="runs per (p, model), trained as one")] = 20,
        steps: Annotated[int, typer.Option(min=1, help="Adam steps per run")] = 1000,
        batch_size: Annotated[int, typer.Option(min=1)] = 128,
        train_rows: Annotated[int, typer.Option(min=1, help="training rows per run")] = 10_000,
        test_rows: Annotated[int, typer.Option(min=1, help="test rows per run")] = 2_000,
        lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
        eval_every: Annotated[int, typer.Option(min=1)] = 100,
        preset: Annotated[str, typer.Option(help="generator preset: mmoe-fig2 or ple2020")] = (
            "mmoe-fig2"
        ),
        seed: Annotated[int, typer.Option(min=0)] = 0,
        threads: Annotated[int | None, typer.Option(min=1, help="torch threads")] = None,
    ) -> None:
        """MMoE paper's synthetic study: loss vs task correlation, trainability over runs."""
        from mtlrec.analysis.study import run_synthetic_study
        from mtlrec.cli import err, out
        from mtlrec.errors import ConfigError
        from mtlrec.utils.runtime import configure_runtime

        try:
            ps = [float(x) for x in correlations.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--correlations {correlations!r}: expected numbers") from None
        configure_runtime(threads, True)
        names = [m.strip() for m in models.split(",") if m.strip()] or None
        res = run_synthetic_study(
            correlations=ps,
            models=names,
            runs=runs,
            steps=steps,
            batch_size=batch_size,
            n_train=train_rows,
            n_test=test_rows,
            lr=lr,
            eval_every=eval_every,
            preset=preset,
            seed=seed,
            output=output,
            on_progress=lambda msg: err.print(f"[dim]{msg}[/]"),
        )
        out.print((output / "study.md").read_text())
        out.print(f"wrote {output / 'study.json'} ({res['seconds']:.0f} s)")
