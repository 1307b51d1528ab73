"""Training from a Parquet file larger than memory: rows are read and encoded as they are used.

:class:`StreamingDataset` is a :class:`~mtlrec.data.batch_source.BatchSource`. An epoch reads
the file's row groups in an order drawn from ``(seed, epoch)``, gathers consecutive row groups
into *shuffle buffers* of at least ``shuffle_buffer`` rows, and permutes the rows inside each
buffer with a generator seeded by ``(seed, epoch, buffer)``. Batches are consecutive slices of
``batch_size`` rows of that sequence (a batch may straddle two buffers), as for an in-memory
data set.

Everything about an epoch's order is a function of the row counts, which are known from the
file's metadata before any row is read; so:

* resuming at batch ``start`` skips every buffer that ends before row ``start * batch_size``
  without reading it, and reads the buffer holding that row from its beginning only to drop the
  rows before it: a resumed epoch yields exactly the batches an uninterrupted one would;
* only the rows a process uses are encoded: with ``world_size > 1`` each process takes its
  contiguous share of every global batch (as :meth:`ColumnarDataset.batches` does), and from each
  row group it encodes only the rows of its shares.

Memory: one row group's raw columns (read in slices of ``read_rows``) plus one encoded shuffle
buffer. Write the file with row groups smaller than the shuffle buffer (e.g. pyarrow's
``row_group_size=100_000``) so that the order of row groups is itself shuffled.

Rows of a hash split (``split = (fractions, seed)``) are the rows whose
:func:`~mtlrec.data.split.hash_part` is ``part``, exactly as in
:func:`mtlrec.data.stream.encode_file`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtlrec.batch import Batch
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.io import file_format
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.split import hash_part
from mtlrec.data.stream import BATCH_ROWS
from mtlrec.errors import ConfigError, DataError
from mtlrec.utils.runtime import mmap_large_blocks

if TYPE_CHECKING:
    from mtlrec.config import ExperimentConfig
    from mtlrec.data.sources import Datasets

DEFAULT_SHUFFLE_BUFFER = 262_144


def _generator(*keys: int) -> np.random.Generator:
    return np.random.default_rng([k & 0xFFFFFFFF for k in keys])


@dataclass(frozen=True)
class _Buffer:
    groups: tuple[int, ...]  # row groups, in reading order
    begin: int  # position of its first row in the epoch's row sequence
    size: int
    index: int


class StreamingDataset:
    """Encoded batches of a Parquet file, read on the fly (see the module notes).

    Args:
        pre: fitted encoders (e.g. :func:`mtlrec.data.stream.fit_file`, which streams too).
        path: a Parquet file.
        split: ``(fractions, seed)`` of a hash split, with ``part`` the part to use (0: train).
        shuffle_buffer: rows permuted together (at least; whole row groups are added).
        read_rows: rows decoded from the file at a time.
        rank, world_size: this process's share of every global batch.
    """

    def __init__(
        self,
        pre: Preprocessor,
        path: str | os.PathLike[str],
        *,
        split: tuple[tuple[float, ...], int] | None = None,
        part: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        read_rows: int = BATCH_ROWS,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        p = Path(path)
        if not p.is_file():
            raise DataError("file not found", file=str(path))
        if file_format(p) != "parquet":
            raise ConfigError(
                f"data.streaming reads Parquet files; {path} is not one (convert it, or set "
                "data.streaming: false)"
            )
        if shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.pre = pre
        self.schema = pre.schema
        self.path = p
        self.source = str(path)
        self.split = split
        self.part = part
        self.shuffle_buffer = shuffle_buffer
        self.read_rows = read_rows
        self.rank, self.world_size = rank, world_size
        try:
            pf = pq.ParquetFile(p)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read: {str(e).splitlines()[0]}", file=str(path)) from None
        names = pf.schema_arrow.names
        cols = self.schema.input_columns() + self.schema.target_columns()
        group = self.schema.group_column
        if group is not None and group in names:
            cols.append(str(group))
        for c in dict.fromkeys(cols):
            if c not in names:
                raise DataError("missing column", file=str(path), column=c)
        self.columns = list(dict.fromkeys(cols))
        md = pf.metadata
        sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        self._group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        # rows of the part in each row group (from row numbers only: nothing is read)
        self._group_rows = np.array(
            [int(self._keep(g).sum()) for g in range(len(sizes))], dtype=np.int64
        )
        self._len = int(self._group_rows.sum())
        if self._len == 0:
            raise DataError("no rows to train on (empty file or empty split part)", file=str(p))
        self.unknown_counts: dict[str, int] = {}

    # -- BatchSource ------------------------------------------------------------------------
    @property
    def has_targets(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._len

    def num_batches(self, batch_size: int) -> int:
        return -(-self._len // batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
    ) -> Iterator[Batch]:
        n, nb = self._len, self.num_batches(batch_size)
        if start >= nb:
            return
        lo_b, hi_b = self._shares(batch_size, n)  # this rank's [lo, hi) of every batch
        # this rank's rows, as a concatenation of ranges of the epoch's sequence
        begin = start * batch_size
        carry: ColumnarDataset | None = None
        b = start
        for buf in self._plan(shuffle, seed, epoch):
            end = buf.begin + buf.size
            if end <= begin:
                continue
            # positions (in the buffer) this rank needs, in order
            first = int(np.searchsorted(hi_b, buf.begin, side="right"))
            last = int(np.searchsorted(lo_b, end, side="left"))
            pos = _ranges(
                np.maximum(lo_b[first:last], max(buf.begin, begin)) - buf.begin,
                np.minimum(hi_b[first:last], end) - buf.begin,
            )
            enc = self._encode_buffer(buf, pos, shuffle, seed, epoch)
            with mmap_large_blocks():  # a buffer's blocks must not fragment training's heap
                carry = enc if carry is None else ColumnarDataset.concat([carry, enc], consume=True)
            del enc
            offset = 0
            while b < nb and hi_b[b] <= end:
                k = max(int(hi_b[b] - max(lo_b[b], begin)), 0)
                yield carry.take(slice(offset, offset + k))
                offset += k
                b += 1
            if offset:
                with mmap_large_blocks():
                    rest = torch.arange(offset, len(carry))
                    carry = carry.subset(rest) if len(rest) else None
            if b >= nb:
                return

    # -- internals ------------------------------------------------------------------------
    def _keep(self, g: int) -> np.ndarray:
        a, z = int(self._group_start[g]), int(self._group_start[g + 1])
        if self.split is None:
            return np.ones(z - a, dtype=bool)
        rows = np.arange(a, z, dtype=np.uint64)
        return hash_part(rows, self.split[0], self.split[1]) == self.part

    def _shares(self, batch_size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.arange(0, n, batch_size, dtype=np.int64)
        hi = np.minimum(lo + batch_size, n)
        if self.world_size > 1:
            share = -(-(hi - lo) // self.world_size)
            lo, hi = lo + self.rank * share, np.minimum(lo + (self.rank + 1) * share, hi)
            hi = np.maximum(hi, lo)
            lo = np.minimum(lo, hi)
        return lo, hi

    def _plan(self, shuffle: bool, seed: int, epoch: int) -> list[_Buffer]:
        groups = np.flatnonzero(self._group_rows > 0)
        if shuffle:
            groups = groups[_generator(seed, epoch, 1).permutation(len(groups))]
        plan: list[_Buffer] = []
        pending: list[int] = []
        size = begin = 0
        for g in groups.tolist():
            pending.append(g)
            size += int(self._group_rows[g])
            if size >= self.shuffle_buffer:
                plan.append(_Buffer(tuple(pending), begin, size, len(plan)))
                begin += size
                pending, size = [], 0
        if pending:
            plan.append(_Buffer(tuple(pending), begin, size, len(plan)))
        return plan

    @mmap_large_blocks()  # the buffers of reading and encoding go back to the OS when freed
    def _encode_buffer(
        self, buf: _Buffer, pos: np.ndarray, shuffle: bool, seed: int, epoch: int
    ) -> ColumnarDataset:
        """Encode the rows at buffer positions ``pos`` (in that order)."""
        if shuffle:
            perm = _generator(seed, epoch, 2, buf.index).permutation(buf.size)
            src = perm[pos]  # source row (within the buffer's row groups, in reading order)
        else:
            src = pos
        order = np.argsort(src, kind="stable")
        wanted = src[order]
        pieces: list[ColumnarDataset] = []
        pf = pq.ParquetFile(self.path)
        base = 0  # buffer source index of the current row group's first kept row
        for g in buf.groups:
            count = int(self._group_rows[g])
            a, z = np.searchsorted(wanted, [base, base + count])
            if z > a:
                pieces.append(self._read_rows(pf, g, wanted[a:z] - base))
            base += count
        if not pieces:
            return self._empty()
        enc = ColumnarDataset.concat(pieces, consume=True)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return enc.subset(torch.from_numpy(inverse))

    def _read_rows(self, pf: pq.ParquetFile, g: int, rows: np.ndarray) -> ColumnarDataset:
        """Encode the given kept rows (sorted indices among the part's rows) of row group g."""
        keep = self._keep(g)
        kept_index = np.flatnonzero(keep)  # row-group rows of the part
        want = kept_index[rows]  # row-group row numbers to encode (sorted)
        pieces: list[ColumnarDataset] = []
        offset = 0
        file_row = int(self._group_start[g])
        try:
            for rb in pf.iter_batches(
                batch_size=self.read_rows, row_groups=[g], columns=self.columns
            ):
                a, z = np.searchsorted(want, [offset, offset + rb.num_rows])
                if z > a:
                    table = pa.Table.from_batches([rb]).take(pa.array(want[a:z] - offset))
                    enc = self.pre.encode(
                        table, file=self.source, targets=True, row_offset=file_row + offset
                    )
                    for k, v in enc.unknown_counts.items():
                        self.unknown_counts[k] = self.unknown_counts.get(k, 0) + v
                    pieces.append(enc)
                offset += rb.num_rows
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
            raise DataError(f"cannot read: {str(e).splitlines()[0]}", file=self.source) from None
        return ColumnarDataset.concat(pieces, consume=True)

    def _empty(self) -> ColumnarDataset:
        pf = pq.ParquetFile(self.path)
        table = pf.schema_arrow.empty_table().select(self.columns)
        return self.pre.encode(table, file=self.source, targets=True)


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(lo[i], hi[i])`` (vectorised)."""
    lengths = np.maximum(hi - lo, 0)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + starts


def encode_other_parts(
    pre: Preprocessor,
    path: str | os.PathLike[str],
    split: tuple[tuple[float, ...], int],
    *,
    skip: int = 0,
    read_rows: int = BATCH_ROWS,
) -> list[ColumnarDataset | None]:
    """Encode every part of a hash split but ``skip`` (the streamed training part), in
    memory; ``None`` in place of the skipped part."""
    from mtlrec.data.stream import record_batches

    schema = pre.schema
    n_parts = len(split[0])
    chunks: list[list[ColumnarDataset]] = [[] for _ in range(n_parts)]
    cols = schema.input_columns() + schema.target_columns()
    group = schema.group_column
    if group is not None and group in pq.ParquetFile(path).schema_arrow.names:
        cols.append(str(group))
    offset = 0
    for table in record_batches(path, cols, batch_rows=read_rows):
        idx = np.arange(offset, offset + table.num_rows, dtype=np.uint64)
        parts = hash_part(idx, split[0], split[1])
        keep = parts != skip
        if keep.any():
            sub = table.filter(pa.array(keep))
            for k, ds in enumerate(
                pre.encode_parts(
                    sub, parts=parts[keep], num_parts=n_parts, file=str(path), targets=True
                )
            ):
                if k != skip:
                    chunks[k].append(ds)
        offset += table.num_rows
    return [
        None if k == skip or not c else ColumnarDataset.concat(c, consume=True)
        for k, c in enumerate(chunks)
    ]


def sharded(data: StreamingDataset, rank: int, world_size: int) -> StreamingDataset:
    """The same stream, as seen by process ``rank`` of ``world_size``."""
    import copy

    out = copy.copy(data)
    out.rank, out.world_size = rank, world_size
    out.unknown_counts = {}
    return out


def load_streaming(cfg: ExperimentConfig, pre: Preprocessor | None = None) -> Datasets:
    """The data of a ``data.streaming: true`` config: the training rows as a
    :class:`StreamingDataset`, validation and test rows encoded in memory."""
    from mtlrec.data.sources import DEFAULT_SPLIT, SPLITS, Datasets, config_schema
    from mtlrec.data.stream import encode_file, fit_file

    d = cfg.data
    if d.train is None:
        raise ConfigError("data.streaming needs data.train (a Parquet file), not a built-in set")
    schema = config_schema(cfg)
    train_path = cfg.resolve_path(d.train)
    if file_format(Path(train_path)) != "parquet":
        raise ConfigError(f"data.streaming reads Parquet files; data.train {d.train} is not one")
    if d.valid:
        if pre is None:
            pre = fit_file(schema, train_path)
        train = StreamingDataset(pre, train_path, shuffle_buffer=d.shuffle_buffer)
        valid = encode_file(pre, cfg.resolve_path(d.valid), delimiter=d.delimiter)[0]
        test = (
            encode_file(pre, cfg.resolve_path(d.test), delimiter=d.delimiter)[0] if d.test else None
        )
        names = {"train": d.train, "valid": d.valid, "test": d.test or ""}
        return Datasets(pre, train, valid, test, names)  # type: ignore[arg-type]
    split = d.split or DEFAULT_SPLIT
    fractions: tuple[float, ...] = split.fractions
    if d.test:
        total = fractions[0] + fractions[1]
        fractions = (fractions[0] / total, fractions[1] / total)
    spec = (fractions, split.seed)
    if pre is None:
        pre = fit_file(schema, train_path, split=spec)
    train = StreamingDataset(pre, train_path, split=spec, shuffle_buffer=d.shuffle_buffer)
    parts = encode_other_parts(pre, train_path, spec)
    names = {k: f"{d.train}[{k} split]" for k in SPLITS}
    if d.test:
        names["test"] = d.test
        test = encode_file(pre, cfg.resolve_path(d.test), delimiter=d.delimiter)[0]
    else:
        test = parts[2]
    return Datasets(pre, train, parts[1], test, names)  # type: ignore[arg-type]
