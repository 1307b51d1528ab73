"""An encoded data set held as a few column tensors, batched by index slicing.

There is no per-row ``__getitem__``: a batch is one ``index_select`` per stacked tensor. The
order of an epoch is a permutation drawn from a generator seeded by ``(seed, epoch)``, so any
epoch can be replayed (for resuming mid-epoch) without saved state, and it does not depend on the
number of processes: with ``world_size > 1`` every global batch is cut into contiguous shares, one
per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mtlrec.batch import Batch, Features
from mtlrec.schema import Schema


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The row order of one epoch (deterministic in ``seed`` and ``epoch``)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1))
    return torch.randperm(n, generator=g)


@dataclass
class ColumnarDataset:
    """Encoded rows as column tensors.

    Shapes:
        sparse: ``[N, F_sparse]`` int32; dense: ``[N, F_dense]`` float32;
        sequences[name]: ``[N, L]`` int32; labels / weights: ``[N, T]`` float32;
        masks: ``[N, T]`` bool; groups: ``[N]`` int64 or None.
    """

    schema: Schema
    sparse: Tensor
    dense: Tensor
    sequences: dict[str, Tensor]
    labels: Tensor | None = None
    masks: Tensor | None = None
    weights: Tensor | None = None
    groups: Tensor | None = None
    source: str = "<memory>"
    unknown_counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._sparse_names = tuple(f.name for f in self.schema.sparse)
        self._dense_names = tuple(f.name for f in self.schema.dense)
        self._task_names = self.schema.task_names

    def __len__(self) -> int:
        return int(self.sparse.shape[0])

    @property
    def has_targets(self) -> bool:
        return self.labels is not None

    def features_at(self, idx: Tensor | slice) -> Features:
        """The features of the given rows."""
        return Features(
            self.sparse[idx],
            self.dense[idx],
            {k: v[idx] for k, v in self.sequences.items()},
            self._sparse_names,
            self._dense_names,
        )

    def take(self, idx: Tensor | slice) -> Batch:
        """The batch of the given rows (an index tensor or a slice)."""
        feats = self.features_at(idx)
        if self.labels is None or self.masks is None or self.weights is None:
            empty: dict[str, Tensor] = {}
            return Batch(feats, empty, empty, empty, None)
        lab, msk, wts = self.labels[idx], self.masks[idx], self.weights[idx]  # [B, T] each
        names = self._task_names
        return Batch(
            feats,
            {t: lab[:, j] for j, t in enumerate(names)},
            {t: msk[:, j] for j, t in enumerate(names)},
            {t: wts[:, j] for j, t in enumerate(names)},
            None if self.groups is None else self.groups[idx],
        )

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        """Iterate batches.

        Args:
            batch_size: global batch size (all ranks together).
            shuffle: draw the epoch's permutation; otherwise file order (slices, no copy of
                the index).
            seed, epoch: the permutation's seed.
            start: index of the first batch to yield (to resume mid-epoch).
            drop_last: skip a last, smaller batch (required for equal steps on every rank).
            rank, world_size: this process's contiguous share of every global batch.
        """
        n = len(self)
        order = epoch_permutation(n, seed, epoch) if shuffle else None
        for b in range(start, self.num_batches(batch_size, drop_last=drop_last)):
            lo, hi = b * batch_size, min((b + 1) * batch_size, n)
            if world_size > 1:
                share = -(-(hi - lo) // world_size)
                lo, hi = lo + rank * share, min(lo + (rank + 1) * share, hi)
            if order is None:
                yield self.take(slice(lo, hi))
            else:
                yield self.take(order[lo:hi])

    def subset(self, idx: Tensor | slice) -> ColumnarDataset:
        """A new data set holding the given rows (copies; views for a slice)."""

        def sel(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        return ColumnarDataset(
            self.schema,
            self.sparse[idx],
            self.dense[idx],
            {k: v[idx] for k, v in self.sequences.items()},
            sel(self.labels),
            sel(self.masks),
            sel(self.weights),
            sel(self.groups),
            self.source,
            dict(self.unknown_counts),
        )

    def rows(self, start: int, stop: int) -> ColumnarDataset:
        """Rows ``start:stop`` as a data set of views (no copy)."""
        return self.subset(slice(start, stop))

    def empty_like(
        self, n: int, allocate: Callable[[tuple[int, ...], torch.dtype], Tensor] | None = None
    ) -> ColumnarDataset:
        """An uninitialised data set of ``n`` rows with this one's columns (fill it with
        :meth:`put`); ``allocate(shape, dtype)`` makes each column (default ``torch.empty``)."""
        make = allocate or (lambda shape, dtype: torch.empty(shape, dtype=dtype))

        def new(t: Tensor | None) -> Tensor | None:
            return None if t is None else make((n, *t.shape[1:]), t.dtype)

        return ColumnarDataset(
            self.schema,
            new(self.sparse),  # type: ignore[arg-type]
            new(self.dense),  # type: ignore[arg-type]
            {k: new(v) for k, v in self.sequences.items()},  # type: ignore[misc]
            new(self.labels),
            new(self.masks),
            new(self.weights),
            new(self.groups),
            self.source,
            {},
        )

    def put(self, idx: Tensor, src: ColumnarDataset) -> None:
        """Write the rows of ``src`` at row indices ``idx`` (in place; unknown counts add)."""
        for name in ("sparse", "dense", "labels", "masks", "weights", "groups"):
            dst, val = getattr(self, name), getattr(src, name)
            if (dst is None) != (val is None):
                raise ValueError(f"column {name} is present in only one of the data sets")
            if dst is not None:
                dst[idx] = val
        for k, v in self.sequences.items():
            v[idx] = src.sequences[k]
        for k, c in src.unknown_counts.items():
            self.unknown_counts[k] = self.unknown_counts.get(k, 0) + c

    @classmethod
    def concat(cls, parts: list[ColumnarDataset], *, consume: bool = False) -> ColumnarDataset:
        """Rows of several data sets of one schema, in order.

        With ``consume=True`` the list ``parts`` is emptied and every column of the parts is
        released as soon as it is joined, so the peak memory is the result plus one column
        (not twice the data) -- as when a file is encoded in record batches.
        """
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        unknown: dict[str, int] = {}
        for p in parts:
            for k, v in p.unknown_counts.items():
                unknown[k] = unknown.get(k, 0) + v
        names = ["sparse", "dense", "labels", "masks", "weights", "groups"]
        columns: dict[str, list[Tensor | None]] = {n: [getattr(p, n) for p in parts] for n in names}
        seq_columns = {k: [p.sequences[k] for p in parts] for k in first.sequences}
        schema, source = first.schema, first.source
        if consume:
            del first
            parts.clear()

        def cat(vals: list[Tensor | None]) -> Tensor | None:
            out = None if vals[0] is None else torch.cat(vals)  # type: ignore[arg-type]
            if consume:
                vals.clear()
            return out

        sparse, dense = cat(columns["sparse"]), cat(columns["dense"])
        sequences = {k: cat(v) for k, v in seq_columns.items()}
        labels, masks = cat(columns["labels"]), cat(columns["masks"])
        weights, groups = cat(columns["weights"]), cat(columns["groups"])
        assert sparse is not None and dense is not None
        return cls(
            schema,
            sparse,
            dense,
            {k: v for k, v in sequences.items() if v is not None},
            labels,
            masks,
            weights,
            groups,
            source,
            unknown,
        )

    def label_dict(self) -> dict[str, Tensor]:
        """Full label columns by task."""
        if self.labels is None:
            return {}
        return {t: self.labels[:, j] for j, t in enumerate(self._task_names)}

    def mask_dict(self) -> dict[str, Tensor]:
        if self.masks is None:
            return {}
        return {t: self.masks[:, j] for j, t in enumerate(self._task_names)}

    def weight_dict(self) -> dict[str, Tensor]:
        if self.weights is None:
            return {}
        return {t: self.weights[:, j] for j, t in enumerate(self._task_names)}
