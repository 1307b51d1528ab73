"""``mtlrec demo``: census-income, single-task baselines vs Shared-Bottom, OMoE, MMoE."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from rich.markup import escape
    from rich.table import Table

    from mtlrec.cli import err, friendly, out

    @app.command()
    @friendly
    def demo(
        seeds: Annotated[int, typer.Option(min=1, help="seeds per model")] = 1,
        epochs: Annotated[
            int | None,
            typer.Option(
                min=1,
                help="most epochs per model (default 20; early stopping after 3 epochs "
                "without improvement)",
            ),
        ] = None,
        progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
        output: Annotated[Path | None, typer.Option(help="write demo.json here")] = None,
        threads: Annotated[int | None, typer.Option(min=1, help="torch threads")] = None,
    ) -> None:
        """Census-income (MMoE paper, task group 1): single-task, Shared-Bottom, OMoE, MMoE."""
        from mtlrec.demo import run_demo
        from mtlrec.utils.runtime import configure_runtime

        configure_runtime(threads, True)
        err.print("census-income: 60/20/20 split by row hash; epoch chosen on validation mean AUC")
        res = run_demo(
            seeds=seeds,
            epochs=epochs,
            progress=progress,
            output=output,
            on_progress=lambda line: err.print(escape(line), highlight=False, soft_wrap=True),
        )
        header, rows = res.table_rows()
        table = Table(
            title=f"census-income test AUC ({seeds} seed{'s' if seeds > 1 else ''}); "
            "gain = AUC - single-task AUC",
            caption=res.caption(),
        )
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for r in rows:
            table.add_row(*r)
        out.print(table)
        out.print(f"{res.seconds:.0f} s")
