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
buffer, or two with ``prefetch`` (the next buffer is encoded by a worker thread meanwhile). Each
buffer is allocated once, as memory maps that go back to the OS when it is used up
(:func:`~mtlrec.utils.runtime.mapped_empty`); every encoded slice is written straight to its
shuffled place in it; the last batch of a buffer is a copy, so the training loop never keeps a
used buffer alive. Write the file with row groups smaller than the shuffle buffer (e.g. pyarrow's
``row_group_size=100_000``) so that the order of row groups is itself shuffled.

Rows of a hash split (``split = (fractions, seed)``) are the rows whose
:func:`~mtlrec.data.split.hash_part` is ``part``, exactly as in
:func:`mtlrec.data.file_encoding.encode_file`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtlrec.batch import Batch
from mtlrec.data.columns import group_ids
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.file_encoding import BATCH_ROWS, record_batches, split_part
from mtlrec.data.io import check_header, file_format
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.split import hash_part, split_keys
from mtlrec.errors import ConfigError, DataError
from mtlrec.utils.runtime import mapped_empty, mmap_large_blocks

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
        pre: fitted encoders (e.g. :func:`mtlrec.data.file_encoding.fit_file`, which streams too).
        path: a Parquet file.
        split: ``(fractions, seed)`` of a hash split, with ``part`` the part to use (0: train).
        shuffle_buffer: rows permuted together (at least; whole row groups are added).
        read_rows: rows decoded from the file at a time.
        rank, world_size: this process's share of every global batch.
        prefetch: read and encode the next shuffle buffer in a worker thread while the
            current one is trained on (two buffers in memory instead of one).
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
        prefetch: bool = True,
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
        self.prefetch = prefetch
        try:
            pf = pq.ParquetFile(p)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read: {str(e).splitlines()[0]}", file=str(path)) from None
        names = pf.schema_arrow.names
        cols = self.schema.input_columns() + self.schema.target_columns()
        group = self.schema.group_column
        if group is not None and group in names:
            cols.append(str(group))
        # the split hashes the group id when the file has a group column (a request's rows
        # stay in one part): the row groups' group ids are read to count each part's rows
        self._split_group = str(group) if group is not None and group in names else None
        self._pf = pf
        self.columns = list(dict.fromkeys(cols))
        check_header(names, self.columns, file=str(path))
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
        begin = start * batch_size  # rows before it were yielded before a resume

        def job(buf: _Buffer) -> ColumnarDataset:
            # positions (in the buffer) this rank needs, in order
            end = buf.begin + buf.size
            first = int(np.searchsorted(hi_b, buf.begin, side="right"))
            last = int(np.searchsorted(lo_b, end, side="left"))
            pos = _ranges(
                np.maximum(lo_b[first:last], max(buf.begin, begin)) - buf.begin,
                np.minimum(hi_b[first:last], end) - buf.begin,
            )
            return self._encode_buffer(buf, pos, shuffle, seed, epoch)

        plan = [buf for buf in self._plan(shuffle, seed, epoch) if buf.begin + buf.size > begin]
        # rows encoded but not yet yielded: (data set, first unused row), oldest first
        pending: list[tuple[ColumnarDataset, int]] = []
        b = start
        encoded = self._encoded(plan, job)
        try:
            for buf in plan:
                # (not zip(plan, encoded): zip keeps its last result tuple, and with it the
                # previous buffer, alive while the next one is encoded)
                pending.append((next(encoded), 0))
                end = buf.begin + buf.size
                while b < nb and hi_b[b] <= end:
                    k = max(int(hi_b[b] - max(lo_b[b], begin)), 0)
                    # the buffer's last batch is a copy: the training loop still holds it
                    # while the next buffer is encoded, and a view would keep this buffer alive
                    last = b + 1 >= nb or hi_b[b + 1] > end
                    yield _take_front(pending, k, copy=last)
                    b += 1
                if b >= nb:
                    return
                # the few rows left for a batch that straddles into the next buffer: copied,
                # so that this buffer is freed before the next is encoded
                pending = [
                    (ColumnarDataset.concat([ds.rows(at, len(ds))]), 0) for ds, at in pending
                ]
        finally:
            encoded.close()

    def _encoded(
        self, plan: list[_Buffer], job: Callable[[_Buffer], ColumnarDataset]
    ) -> Iterator[ColumnarDataset]:
        """``job(buf)`` for every buffer of the plan, in order; with ``prefetch`` the next
        buffer is read and encoded by a worker thread while the current one is trained on
        (reading, decoding and most of encoding release the GIL), so at most two encoded
        buffers are alive."""
        if not self.prefetch or len(plan) < 2:
            for buf in plan:
                with mmap_large_blocks():  # a buffer's blocks must not fragment training's heap
                    out = job(buf)
                yield out
                del out
            return
        # the buffers themselves are memory maps (mapped_empty); the worker's small
        # temporaries come from its own malloc arena, apart from training's heap
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtlrec-stream")
        try:
            nxt = pool.submit(job, plan[0])
            for i in range(len(plan)):
                out = nxt.result()
                if i + 1 < len(plan):
                    nxt = pool.submit(job, plan[i + 1])
                yield out
                del out
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- internals ------------------------------------------------------------------------
    def _keep(self, g: int) -> np.ndarray:
        a, z = int(self._group_start[g]), int(self._group_start[g + 1])
        if self.split is None:
            return np.ones(z - a, dtype=bool)
        rows = np.arange(a, z, dtype=np.uint64)
        groups = None
        if self._split_group is not None:
            col = self._pf.read_row_group(g, columns=[self._split_group]).column(0)
            groups = group_ids(col)
        return hash_part(split_keys(rows, groups), self.split[0], self.split[1]) == self.part

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

    def _encode_buffer(
        self, buf: _Buffer, pos: np.ndarray, shuffle: bool, seed: int, epoch: int
    ) -> ColumnarDataset:
        """Encode the rows at buffer positions ``pos`` (in that order).

        Rows are read in file order and every encoded slice is written straight to its place
        in the output, so the buffer is held once (no concatenation, no permuting copy).
        """
        if shuffle:
            perm = _generator(seed, epoch, 2, buf.index).permutation(buf.size)
            src = perm[pos]  # source row (within the buffer's row groups, in reading order)
        else:
            src = pos
        order = np.argsort(src, kind="stable")  # the j-th row read goes to output order[j]
        wanted = src[order]
        dest = torch.from_numpy(order)
        out: ColumnarDataset | None = None
        done = 0
        pf = pq.ParquetFile(self.path)
        base = 0  # buffer source index of the current row group's first kept row
        for g in buf.groups:
            count = int(self._group_rows[g])
            a, z = np.searchsorted(wanted, [base, base + count])
            if z > a:
                for piece in self._read_rows(pf, g, wanted[a:z] - base):
                    if out is None:  # mapped: freed to the OS from whichever thread
                        out = piece.empty_like(len(pos), mapped_empty)
                    out.put(dest[done : done + len(piece)], piece)
                    done += len(piece)
            base += count
        return self._empty() if out is None else out

    def _read_rows(self, pf: pq.ParquetFile, g: int, rows: np.ndarray) -> Iterator[ColumnarDataset]:
        """Encoded slices of the given kept rows (sorted indices among the part's rows) of row
        group g, in order."""
        keep = self._keep(g)
        kept_index = np.flatnonzero(keep)  # row-group rows of the part
        want = kept_index[rows]  # row-group row numbers to encode (sorted)
        offset = 0
        file_row = int(self._group_start[g])
        try:
            for rb in pf.iter_batches(
                batch_size=self.read_rows, row_groups=[g], columns=self.columns
            ):
                a, z = np.searchsorted(want, [offset, offset + rb.num_rows])
                if z > a:
                    table = pa.Table.from_batches([rb])
                    file_rows = None  # file row of each encoded row, for messages
                    if z - a < rb.num_rows:
                        table = table.take(pa.array(want[a:z] - offset))
                        file_rows = want[a:z] + file_row
                    enc = self.pre.encode(
                        table,
                        file=self.source,
                        targets=True,
                        row_offset=file_row + offset,
                        rows=file_rows,
                    )
                    for k, v in enc.unknown_counts.items():
                        self.unknown_counts[k] = self.unknown_counts.get(k, 0) + v
                    yield enc
                offset += rb.num_rows
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
            raise DataError(f"cannot read: {str(e).splitlines()[0]}", file=self.source) from None

    def _empty(self) -> ColumnarDataset:
        pf = pq.ParquetFile(self.path)
        table = pf.schema_arrow.empty_table().select(self.columns)
        return self.pre.encode(table, file=self.source, targets=True)


def _take_front(pending: list[tuple[ColumnarDataset, int]], k: int, *, copy: bool) -> Batch:
    """The batch of the next ``k`` pending rows: views of a buffer, or (``copy``, or rows of
    two buffers) a copy. Consumed buffers leave ``pending``."""
    parts: list[ColumnarDataset] = []
    while k > 0 or not parts:
        ds, at = pending[0]
        m = min(k, len(ds) - at)
        parts.append(ds.rows(at, at + m))
        k -= m
        if at + m >= len(ds):
            pending.pop(0)
            if not pending:
                break
        else:
            pending[0] = (ds, at + m)
    one = ColumnarDataset.concat(parts) if copy or len(parts) > 1 else parts[0]
    return one.take(slice(0, len(one)))


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

    schema = pre.schema
    n_parts = len(split[0])
    chunks: list[list[ColumnarDataset]] = [[] for _ in range(n_parts)]
    cols = schema.input_columns() + schema.target_columns()
    group = schema.group_column
    if group is not None and group in pq.ParquetFile(path).schema_arrow.names:
        cols.append(str(group))
    else:
        group = None
    offset = 0
    for table in record_batches(path, list(dict.fromkeys(cols)), batch_rows=read_rows):
        parts = split_part(table, offset, split, group)
        keep = parts != skip
        if keep.any():
            sub = table.filter(pa.array(keep))
            for k, ds in enumerate(
                pre.encode_parts(
                    sub,
                    parts=parts[keep],
                    num_parts=n_parts,
                    file=str(path),
                    targets=True,
                    rows=offset + np.flatnonzero(keep),  # file rows, for messages
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
