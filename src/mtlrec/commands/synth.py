"""``mtlrec synth``: write synthetic data sets (the MMoE paper's pair, CTR tables, a daily log,
a position-biased log, a conversion funnel)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from mtlrec.cli import friendly, out
    from mtlrec.errors import ConfigError

    synth_app = typer.Typer(help="Write synthetic data sets.", no_args_is_help=True)
    app.add_typer(synth_app, name="synth")

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
        rows: Annotated[
            int, typer.Option(min=1, help="rows (with --days: rows per day)")
        ] = 100_000,
        seed: Annotated[int, typer.Option()] = 0,
        days: Annotated[
            int | None,
            typer.Option(
                min=1,
                help="a daily log with a day column and drift: new items every day, popularity "
                "and category appeal shifting (docs/continual.md)",
            ),
        ] = None,
        position_bias: Annotated[
            bool,
            typer.Option(
                help="a click log in requests, clicks biased by position, with the true relevance "
                "(true_ctr, relevant) of every row (docs/architectures.md, bias tower)",
            ),
        ] = False,
        positions: Annotated[
            int, typer.Option(min=2, help="with --position-bias: impressions per request")
        ] = 10,
    ) -> None:
        """A CTR-style table: 26 Zipf categorical fields, 13 dense, click and conversion labels
        (with --days: a daily log of users, items, categories... with drift)."""
        from mtlrec.data.io import write_table
        from mtlrec.data.synthetic import make_ctr_table

        if position_bias:
            from mtlrec.data.synthetic.position import make_position_bias_table

            if days is not None:
                raise ConfigError("--position-bias and --days: choose one")
            write_table(make_position_bias_table(rows, positions=positions, seed=seed), output)
            out.print(f"wrote {rows} rows ({positions} positions per request) to {output}")
            return
        if days is not None:
            from mtlrec.data.synthetic.daily import make_daily_ctr

            write_table(make_daily_ctr(days, rows, seed=seed), output)
            out.print(f"wrote {days} days of {rows} rows to {output}")
            return
        write_table(make_ctr_table(rows, seed=seed), output)
        out.print(f"wrote {rows} rows to {output}")

    @synth_app.command("funnel")
    @friendly
    def synth_funnel(
        output: Annotated[Path, typer.Option(help="CSV/Parquet file to write")],
        rows: Annotated[int, typer.Option(min=1)] = 100_000,
        seed: Annotated[int, typer.Option(help="seed of the rows")] = 0,
        model_seed: Annotated[int, typer.Option(help="seed of the hidden model")] = 0,
        correlation: Annotated[float, typer.Option(help="purchase vs click id effects")] = 0.5,
    ) -> None:
        """A click -> action -> purchase funnel with the true CVR of every row (true_cvr)."""
        from mtlrec.data.io import write_table
        from mtlrec.data.synthetic import make_funnel_table

        table = make_funnel_table(rows, seed=seed, model_seed=model_seed, correlation=correlation)
        write_table(table, output)
        out.print(f"wrote {rows} rows to {output}")
