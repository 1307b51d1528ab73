"""What the trainer's loop needs of its training data: a resumable source of batches.

:class:`~mtlrec.data.dataset.ColumnarDataset` (encoded rows in memory) is one;
:class:`~mtlrec.data.stream_dataset.StreamingDataset` (a Parquet file encoded on the fly) and
:class:`~mtlrec.train.distributed.RankShard` (one process's share of every global batch) are
others. A source must give the same batches for the same ``(seed, epoch)`` every time and start
at any batch index, so a run resumed from a checkpoint's ``(epoch, batch)`` position continues
exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from mtlrec.batch import Batch


@runtime_checkable
class BatchSource(Protocol):
    """A resumable, deterministic source of training batches."""

    @property
    def has_targets(self) -> bool:
        """Whether batches carry labels, masks and weights."""
        ...

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch at this (global) batch size."""
        ...

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
    ) -> Iterator[Batch]:
        """The batches of one epoch from batch index ``start`` (deterministic in
        ``seed`` and ``epoch``)."""
        ...
