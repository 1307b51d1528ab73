"""Growing vocabularies for a warm start: old values keep their ids, new values are appended.

A run that starts from an earlier run (``training.init_from``, :mod:`mtlrec.train.warm_start`)
keeps every value the earlier run knew at the id it had, so that the embedding rows of the
earlier run can be copied bit for bit (the rows of a table only grow at the end). Values of the
new training rows that are not in the vocabulary yet are appended when they pass ``min_count``:

* ``counts="new"``: counted on the new training rows only;
* ``counts="cumulative"``: counted on the new rows plus the counts the earlier run kept
  (``vocab_counts.parquet`` in its folder: the counts over its training rows and its
  ancestors').

``max_size`` still holds, and what it drops is fixed: **old values are never dropped**; the new
values fill the remaining ``max_size - len(old)`` slots (none when the old vocabulary is
already that large) by count descending, then value ascending (the order of a fresh fit); the
others map to the OOV id and are counted as ``dropped_by_max_size``. Hashed (``hash_buckets``)
and pre-indexed (``vocab_size``) tables have no vocabulary and are unchanged.

Everything is vectorised (pyarrow ``is_in``, ``sort_indices``, ``group_by``): no Python per
value.

Example:
    >>> import pyarrow as pa
    >>> old = pa.array(["a", "b"])
    >>> counts = pa.table({"v": ["b", "c", "d", "e"], "c": [5, 3, 3, 1]})
    >>> g = grow_vocabulary(old, counts, min_count=2, max_size=3)
    >>> g.vocab.to_pylist(), g.added, g.dropped_by_max_size, g.below_min_count
    (['a', 'b', 'c'], 1, 1, 1)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtlrec.data.columns import combine
from mtlrec.data.encoders import CategoricalEncoder
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import CheckpointError, ConfigError
from mtlrec.utils.atomic import atomic_path

COUNTS_FILE = "vocab_counts.parquet"
"""The file of a run folder holding every counted value of every table (columns ``table``,
``value``, ``count``)."""
VocabCounts = Literal["new", "cumulative"]
DenseStats = Literal["keep", "refit"]


def empty_counts() -> pa.Table:
    """A counts table without rows (columns ``v`` string, ``c`` int64)."""
    return pa.table({"v": pa.array([], pa.string()), "c": pa.array([], pa.int64())})


def merge_counts(*tables: pa.Table | None) -> pa.Table:
    """Sum the counts of several ``(v, c)`` tables by value (missing tables are skipped)."""
    parts = [t.select(["v", "c"]).cast(empty_counts().schema) for t in tables if t is not None]
    if not parts:
        return empty_counts()
    merged = pa.concat_tables(parts).group_by("v").aggregate([("c", "sum")])
    return merged.rename_columns(["v", "c"]).combine_chunks()


@dataclass(frozen=True)
class Growth:
    """The grown vocabulary of one table and what happened to the candidates.

    Attributes:
        vocab: the old values (in their order), then the added ones.
        added: new values appended.
        dropped_by_max_size: new values that passed ``min_count`` but found no slot.
        below_min_count: new values counted fewer than ``min_count`` times.
    """

    vocab: pa.Array
    added: int
    dropped_by_max_size: int
    below_min_count: int


def grow_vocabulary(
    old: pa.Array,
    counts: pa.Table,
    *,
    min_count: int = 1,
    max_size: int | None = None,
) -> Growth:
    """The old vocabulary followed by the new values that pass ``min_count`` and fit under
    ``max_size`` (count descending, then value ascending).

    Args:
        old: the earlier vocabulary (most frequent first, as fitted): kept whole, in order.
        counts: value counts (columns ``v``, ``c``) the new values are chosen by.
        min_count: fewest counts a new value needs.
        max_size: most values in the grown vocabulary; old values are never dropped, so the
            result may exceed it when the old vocabulary already does.

    Returns:
        The :class:`Growth`.
    """
    old = combine(old)
    if not pa.types.is_string(old.type):
        old = old.cast(pa.string())
    counts = counts.select(["v", "c"]).combine_chunks()
    unseen = pc.invert(pc.is_in(counts.column("v"), value_set=old))
    fresh = counts.filter(pc.and_(unseen, pc.is_valid(counts.column("v"))))
    passing = fresh.filter(pc.greater_equal(fresh.column("c"), min_count))
    below = fresh.num_rows - passing.num_rows
    order = pc.sort_indices(passing, sort_keys=[("c", "descending"), ("v", "ascending")])
    slots = len(order) if max_size is None else max(0, min(len(order), max_size - len(old)))
    added = pc.take(passing.column("v"), order[:slots]).combine_chunks()
    vocab = pa.concat_arrays([old, added.cast(pa.string())]) if len(added) else old
    return Growth(vocab, len(added), len(order) - slots, below)


def grow_preprocessor(
    parent: Preprocessor,
    fitted: Preprocessor,
    *,
    counts: VocabCounts = "new",
    parent_counts: Mapping[str, pa.Table] | None = None,
    dense: DenseStats = "keep",
) -> tuple[Preprocessor, dict[str, dict[str, Any]]]:
    """The encoders of a warm-started run: the parent's vocabularies grown with the values of
    ``fitted`` (a fresh fit on the new training rows, which keeps its counts).

    Args:
        parent: the earlier run's encoders.
        fitted: encoders fitted on the new training rows (their ``counts`` are used; the new
            ``min_count`` / ``max_size`` apply).
        counts: ``new`` (the new rows' counts) or ``cumulative`` (plus ``parent_counts``).
        parent_counts: the earlier run's kept counts per table (``vocab_counts.parquet``).
        dense: ``keep`` the parent's dense statistics (scores stay comparable) or ``refit``
            them (``fitted``'s).

    Returns:
        The grown :class:`Preprocessor` (schema and null tokens of ``fitted``; each table's
        ``counts`` are the parent's kept counts plus the new ones, to be saved for the next
        run) and a report per table.

    Raises:
        ConfigError: ``cumulative`` counts without the parent's counts, or tables that differ.
    """
    if set(parent.tables) != set(fitted.tables):
        raise ConfigError(
            f"the embedding tables differ from the earlier run's: {sorted(parent.tables)} there, "
            f"{sorted(fitted.tables)} here"
        )
    if counts == "cumulative" and parent_counts is None:
        raise ConfigError(
            "data.vocab_counts: cumulative needs the counts of the earlier run "
            f"({COUNTS_FILE} in its folder, written by runs of this mtlrec version); use "
            "data.vocab_counts: new"
        )
    tables: dict[str, CategoricalEncoder] = {}
    report: dict[str, dict[str, Any]] = {}
    for name, new in fitted.tables.items():
        old = parent.tables[name]
        if not old.fitted:
            tables[name] = old
            kind = "hashed" if old.hash_buckets is not None else "pre-indexed"
            report[name] = {"kind": kind, "rows_before": old.size, "rows_after": old.size}
            continue
        if new.counts is None:
            raise ValueError(f"table {name!r}: the fitted encoder kept no counts")
        kept = None if parent_counts is None else parent_counts.get(name, empty_counts())
        basis = merge_counts(kept, new.counts) if counts == "cumulative" else new.counts
        g = grow_vocabulary(old.vocab, basis, min_count=new.min_count, max_size=new.max_size)
        enc = CategoricalEncoder(min_count=new.min_count, max_size=new.max_size, vocab=g.vocab)
        enc.counts = merge_counts(kept, new.counts)
        tables[name] = enc
        report[name] = {
            "kind": "vocabulary",
            "rows_before": old.size,
            "rows_after": enc.size,
            "added": g.added,
            "dropped_by_max_size": g.dropped_by_max_size,
            "below_min_count": g.below_min_count,
        }
    dense_enc = parent.dense if dense == "keep" else fitted.dense
    grown = Preprocessor(fitted.schema, tables, dict(dense_enc), null_values=fitted.null_values)
    return grown, report


def check_prefix(old: Preprocessor, new: Preprocessor) -> None:
    """Refuse encoders whose vocabularies do not start with ``old``'s (every old value at its
    old id): the condition for copying embedding rows as a prefix.

    Raises:
        CheckpointError: a table whose old values moved.
    """
    for name, o in old.tables.items():
        n = new.tables.get(name)
        if n is None or n.size < o.size:
            raise CheckpointError(f"table {name!r} shrank or vanished: cannot copy its rows")
        if o.fitted and not n.vocab.slice(0, len(o.vocab)).equals(o.vocab):
            raise CheckpointError(f"table {name!r}: the earlier values are not kept at their ids")


# -- kept counts ---------------------------------------------------------------------------
def table_counts(pre: Preprocessor) -> dict[str, pa.Table]:
    """The counts each fitted table of ``pre`` keeps (tables without counts left out)."""
    return {k: v.counts for k, v in pre.tables.items() if v.fitted and v.counts is not None}


def write_counts(path: str | Path, counts: Mapping[str, pa.Table]) -> None:
    """Write per-table counts as one Parquet file (``table``, ``value``, ``count``), atomically.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / COUNTS_FILE
        >>> write_counts(p, {"item": pa.table({"v": ["a", "b"], "c": [3, 1]})})
        >>> read_counts(p)["item"].to_pydict()
        {'v': ['a', 'b'], 'c': [3, 1]}
    """
    parts = []
    for name, t in counts.items():
        t = t.select(["v", "c"]).cast(empty_counts().schema)
        name_col = pa.repeat(pa.scalar(name, pa.string()), t.num_rows)
        parts.append(pa.table({"table": name_col, "value": t.column("v"), "count": t.column("c")}))
    schema = pa.schema([("table", pa.string()), ("value", pa.string()), ("count", pa.int64())])
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_counts(path: str | Path) -> dict[str, pa.Table]:
    """Per-table counts written by :func:`write_counts` (columns ``v``, ``c``).

    Raises:
        CheckpointError: unreadable or not a counts file.
    """
    try:
        t = pq.read_table(path, columns=["table", "value", "count"])
    except (OSError, pa.ArrowException) as e:
        raise CheckpointError(f"{path}: not a vocabulary counts file ({e})") from None
    out: dict[str, pa.Table] = {}
    names = t.column("table")
    for name in pc.unique(names).to_pylist():
        sel = t.filter(pc.equal(names, name))
        out[name] = pa.table(
            {"v": sel.column("value").cast(pa.string()), "c": sel.column("count")}
        ).combine_chunks()
    return out


__all__ = [
    "COUNTS_FILE",
    "Growth",
    "check_prefix",
    "grow_preprocessor",
    "grow_vocabulary",
    "merge_counts",
    "read_counts",
    "table_counts",
    "write_counts",
]
