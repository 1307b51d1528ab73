"""``mtlrec report``: a self-contained HTML page of a run, comparison or study folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from mtlrec.cli import friendly

    @app.command()
    @friendly
    def report(
        folder: Annotated[Path, typer.Argument(help="run, compare or study folder")],
        output: Annotated[
            Path | None, typer.Option(help="HTML file (default: FOLDER/report.html)")
        ] = None,
    ) -> None:
        """Self-contained HTML report of a run, comparison or study folder (plots inlined)."""
        from mtlrec.analysis.report import write_report
        from mtlrec.cli import out

        path = write_report(folder, output)
        out.print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
