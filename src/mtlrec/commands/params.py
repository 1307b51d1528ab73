"""``mtlrec list-params``: the parameter names of a run's (or a config's) model, to write
``training.freeze`` patterns against (docs/continual.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from mtlrec.cli import friendly

    @app.command("list-params")
    @friendly
    def list_params(
        source: Annotated[
            Path, typer.Argument(help="run folder, or an experiment YAML (shapes of tables: ?)")
        ],
        freeze: Annotated[
            list[str] | None,
            typer.Option(
                "--freeze",
                help="a training.freeze pattern to try (repeatable; default: the config's)",
            ),
        ] = None,
    ) -> None:
        """Every parameter of the model: name, shape, values, owner (a task or shared) and
        whether the freeze patterns freeze it."""
        from rich.markup import escape
        from rich.table import Table

        from mtlrec.cli import out
        from mtlrec.train.freeze import freeze_parameters
        from mtlrec.train.params_view import model_of
        from mtlrec.train.remap import parameter_owners

        model, cfg, sized = model_of(source)
        patterns = list(freeze) if freeze else list(cfg.training.freeze)
        report = freeze_parameters(model, patterns)
        owners = parameter_owners(model)
        table = Table(title=escape(f"parameters of {cfg.model.name} ({source})"))
        for c in ("parameter", "shape", "values", "owner", "frozen"):
            table.add_column(c, justify="right" if c == "values" else "left", no_wrap=c != "owner")
        frozen = set(report.frozen_names)
        for name, p in model.named_parameters():
            shape = list(p.shape)
            shown = str(shape) if sized or "tables." not in name else f"[?, {shape[-1]}]"
            values = f"{p.numel():,}" if sized or "tables." not in name else "?"
            table.add_row(
                escape(name),
                shown,
                values,
                owners.get(name) or "shared",
                "yes" if name in frozen else "",
            )
        out.print(table)
        if patterns:
            out.print(escape(report.line()), highlight=False)
