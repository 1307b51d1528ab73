"""CLI commands of the optional parts (compare, report, fuse, export, serve, ...).

Each module here defines ``register(app: typer.Typer) -> None``; :mod:`mtlrec.cli` imports every
module of this package and calls it. Import heavy dependencies inside the command functions.
Reuse :func:`mtlrec.cli.friendly`, ``mtlrec.cli.out`` and ``mtlrec.cli.err`` for errors and output.
"""
