"""``mtlrec export``: a run to ONNX or TorchScript, with its encoders and a parity check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from mtlrec.cli import friendly

    @app.command("export")
    @friendly
    def export(
        run: Annotated[Path, typer.Argument(help="run folder")],
        format: Annotated[str, typer.Option("--format", help="onnx or torchscript")] = "onnx",
        output: Annotated[
            Path | None, typer.Option(help="export folder (default: RUN/export-FORMAT)")
        ] = None,
        fusion: Annotated[
            Path | None, typer.Option(help="fusion JSON file: adds the fused 'score' output")
        ] = None,
        parity_rows: Annotated[
            int, typer.Option(min=1, help="rows of the run's data for the parity check")
        ] = 256,
    ) -> None:
        """Export a trained run (named per-task outputs, dynamic batch size) and check it
        against the eager model (fails above a max abs difference of 1e-5)."""
        from mtlrec.cli import out
        from mtlrec.export import PARITY_TOLERANCE, export_run

        dest = output if output is not None else run / f"export-{format}"
        res = export_run(run, dest, format=format, fusion=fusion, parity_rows=parity_rows)
        out.print(
            f"exported {run} to {res.path} ({res.format}); outputs: {', '.join(res.outputs)}",
            highlight=False,
        )
        out.print(
            f"parity with eager PyTorch on {res.parity_rows} rows (and batches of 1 and 37): "
            f"max abs difference {res.max_abs_diff:.3g} (tolerance {PARITY_TOLERANCE:g})",
            highlight=False,
        )
