"""What one step of training or scoring sees: features, labels, masks and weights by name.

Feature values are stored stacked (one integer matrix for all categorical fields, one float
matrix for all dense fields) so that a batch is a handful of index slices and the embedding
layer does one lookup; the names of the stacked columns travel with them (``sparse_names``,
``dense_names``), in the style of a keyed tensor. Labels, masks and weights are dicts keyed by
task name: nothing downstream addresses a task by position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

PAD_ID = 0
"""Categorical id used for padding in sequence features (never a real value)."""
OOV_ID = 1
"""Categorical id of unknown, rare and missing values."""
FIRST_ID = 2
"""First id of a real vocabulary entry."""


@dataclass(frozen=True, slots=True)
class Features:
    """Model inputs of one batch.

    Shapes:
        sparse: ``[B, F_sparse]`` int32, one column per sparse feature (schema order), ids local
            to each feature's table (``F_sparse`` may be 0; the batch size is still ``B``).
        dense: ``[B, F_dense]`` float32, already filled and transformed.
        sequences: name -> ``[B, L]`` int32, padded with :data:`PAD_ID`.
    """

    sparse: Tensor
    dense: Tensor
    sequences: dict[str, Tensor] = field(default_factory=dict)
    sparse_names: tuple[str, ...] = ()
    dense_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.batch_size

    @property
    def batch_size(self) -> int:
        return int(self.sparse.shape[0])

    def sparse_column(self, name: str) -> Tensor:
        """One sparse feature's ids, ``[B]``."""
        return self.sparse[:, self.sparse_names.index(name)]

    def dense_column(self, name: str) -> Tensor:
        """One dense feature's values, ``[B]``."""
        return self.dense[:, self.dense_names.index(name)]

    def slice(self, lo: int, hi: int) -> Features:
        """Rows ``lo:hi`` (views, no copy)."""
        return Features(
            self.sparse[lo:hi],
            self.dense[lo:hi],
            {k: v[lo:hi] for k, v in self.sequences.items()},
            self.sparse_names,
            self.dense_names,
        )

    def to(self, device: torch.device | str) -> Features:
        return Features(
            self.sparse.to(device),
            self.dense.to(device),
            {k: v.to(device) for k, v in self.sequences.items()},
            self.sparse_names,
            self.dense_names,
        )


@dataclass(frozen=True, slots=True)
class Batch:
    """Features plus per-task targets.

    Shapes:
        labels[task]: ``[B]`` float32 (class index stored as float for multiclass); 0 where the
            task's mask is false.
        masks[task]: ``[B]`` bool, the task's sample space.
        weights[task]: ``[B]`` float32 sample weights (1 where the task has no weight column),
            0 outside the task's mask.
        groups: ``[B]`` int64 ids of the schema's group column, if it has one.
    """

    features: Features
    labels: dict[str, Tensor]
    masks: dict[str, Tensor]
    weights: dict[str, Tensor]
    groups: Tensor | None = None

    def __len__(self) -> int:
        return self.features.batch_size

    def slice(self, lo: int, hi: int) -> Batch:
        """Rows ``lo:hi`` (views, no copy)."""
        return Batch(
            self.features.slice(lo, hi),
            {k: v[lo:hi] for k, v in self.labels.items()},
            {k: v[lo:hi] for k, v in self.masks.items()},
            {k: v[lo:hi] for k, v in self.weights.items()},
            None if self.groups is None else self.groups[lo:hi],
        )

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.features.to(device),
            {k: v.to(device) for k, v in self.labels.items()},
            {k: v.to(device) for k, v in self.masks.items()},
            {k: v.to(device) for k, v in self.weights.items()},
            None if self.groups is None else self.groups.to(device),
        )
