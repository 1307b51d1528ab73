"""Which process holds which part of every embedding table (``model.embedding_backend:
torchrec``).

One rule per table, by size, overridable per table (``model.sharding.tables``):

* ``table_wise``: the whole table on one process. Tables below ``row_wise_min_rows`` rows,
  placed largest first on the process holding the fewest bytes so far;
* ``row_wise``: the rows split evenly over all processes. Tables of ``row_wise_min_rows`` rows
  or more: a table larger than one process's memory trains;
* ``column_wise``: the columns split over ``k`` processes (``k`` the largest divisor of the
  width not above the number of processes), only on request.

The plan depends only on the tables and the number of processes, so every process computes the
same plan without talking to the others, and a resumed run gets the plan it had.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mtlrec.errors import ConfigError

KINDS = ("table_wise", "row_wise", "column_wise")


@dataclass(frozen=True)
class TableShape:
    """A table to place: its key (``module path/table``), rows and width."""

    key: str
    rows: int
    dim: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * 4


@dataclass(frozen=True)
class Placement:
    """How one table is split: the kind and the processes holding it."""

    kind: str
    ranks: tuple[int, ...]


def column_shards(dim: int, world_size: int) -> int:
    """Column shards of a table of width ``dim`` over ``world_size`` processes: the largest
    ``k`` not above ``world_size`` that splits the columns evenly into widths that are a
    multiple of 4 (TorchRec's rule for column shards); 1 when there is none.

    Example:
        >>> column_shards(16, 2), column_shards(16, 3), column_shards(8, 4), column_shards(6, 2)
        (2, 2, 2, 1)
    """
    fits = [k for k in range(1, min(dim, world_size) + 1) if dim % k == 0 and dim // k % 4 == 0]
    return max(fits, default=1)


def choose_plan(
    tables: Sequence[TableShape],
    world_size: int,
    *,
    row_wise_min_rows: int,
    overrides: Mapping[str, str] | None = None,
) -> dict[str, Placement]:
    """The placement of every table.

    Args:
        tables: the tables (keys ``module/table``; an override may name the table alone, which
            applies to that table in every module).
        world_size: number of processes.
        row_wise_min_rows: tables with at least this many rows are split by rows.
        overrides: table (or ``module/table``) -> ``table_wise | row_wise | column_wise``.

    Returns:
        key -> :class:`Placement`.

    Raises:
        ConfigError: an override names no table or an unknown kind.

    Example:
        >>> plan = choose_plan([TableShape("e/big", 10**6, 16), TableShape("e/a", 100, 16),
        ...                     TableShape("e/b", 50, 16)], 2, row_wise_min_rows=10**5)
        >>> [(k, p.kind, p.ranks) for k, p in plan.items()]
        [('e/big', 'row_wise', (0, 1)), ('e/a', 'table_wise', (0,)), ('e/b', 'table_wise', (1,))]
    """
    overrides = dict(overrides or {})
    names = {t.key for t in tables} | {t.key.rsplit("/", 1)[-1] for t in tables}
    for k, v in overrides.items():
        if k not in names:
            raise ConfigError(
                f"model.sharding.tables: no table {k!r} (tables: "
                f"{sorted({t.key.rsplit('/', 1)[-1] for t in tables})})"
            )
        if v not in KINDS:
            raise ConfigError(f"model.sharding.tables.{k}: {v!r} is not one of {', '.join(KINDS)}")
    load = [0] * world_size
    plan: dict[str, Placement] = {}
    whole: list[TableShape] = []
    for t in tables:
        kind = overrides.get(t.key, overrides.get(t.key.rsplit("/", 1)[-1]))
        if kind is None:
            kind = "row_wise" if t.rows >= row_wise_min_rows else "table_wise"
        if kind == "row_wise":
            plan[t.key] = Placement("row_wise", tuple(range(world_size)))
            for r in range(world_size):
                load[r] += t.nbytes // world_size
        elif kind == "column_wise":
            k = column_shards(t.dim, world_size)
            ranks = tuple(sorted(range(world_size), key=lambda r: (load[r], r))[:k])
            ranks = tuple(sorted(ranks))
            plan[t.key] = Placement("column_wise", ranks)
            for r in ranks:
                load[r] += t.nbytes // k
        else:
            whole.append(t)
    for t in sorted(whole, key=lambda t: -t.nbytes):  # largest first, stable for ties
        r = min(range(world_size), key=lambda r: (load[r], r))
        plan[t.key] = Placement("table_wise", (r,))
        load[r] += t.nbytes
    return {t.key: plan[t.key] for t in tables}


def describe(plan: Mapping[str, Placement]) -> str:
    """One line per table: ``key: kind on ranks``."""
    return "\n".join(f"{k}: {p.kind} on {list(p.ranks)}" for k, p in plan.items())
