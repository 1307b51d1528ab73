"""``mtlrec list``: the registered models, balancing strategies and fusions, or one's parameters."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from rich.markup import escape
    from rich.table import Table

    from mtlrec.cli import friendly, out
    from mtlrec.errors import ConfigError

    @app.command("list")
    @friendly
    def list_(
        name: Annotated[
            str | None,
            typer.Argument(
                help="a model, balancing strategy or fusion: list its parameters (types, defaults, "
                "help)"
            ),
        ] = None,
    ) -> None:
        """The registered models, balancing strategies and fusions; with a NAME, its parameters."""
        from mtlrec.registry import FUSIONS, MODELS, WEIGHTINGS, did_you_mean

        registries = (
            ("models", MODELS),
            ("balancing strategies", WEIGHTINGS),
            ("fusions (mtlrec fuse)", FUSIONS),
        )
        if name is None:
            for title, reg in registries:
                table = Table(title=title)
                table.add_column("name")
                table.add_column("description")
                for e in reg.entries():
                    table.add_row(e.name, escape(e.description))
                out.print(table)
            out.print("mtlrec list NAME lists the parameters of one of them")
            return
        found = [reg for _, reg in registries if name in reg]
        if not found:
            every = [n for _, reg in registries for n in reg.names()]
            raise ConfigError(
                f"{name!r} is not a registered model, balancing strategy or fusion"
                f"{did_you_mean(name, every)}; mtlrec list shows them all"
            )
        for reg in found:
            entry = reg.get(name)
            params = reg.describe(name)
            title = f"{reg.kind} {name}: {entry.description}" + (
                f" ({entry.paper})" if entry.paper else ""
            )
            if not params:
                out.print(escape(title) + "\n  takes no parameters")
                continue
            table = Table(title=escape(title))
            table.add_column("parameter", no_wrap=True)
            table.add_column("type")
            table.add_column("default")
            table.add_column("help")
            for p in params:
                table.add_row(p.name, escape(p.type), escape(p.default), escape(p.help))
            out.print(table)
