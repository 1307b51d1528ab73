"""Encoders fitted on the training split only and saved with the model.

* :class:`CategoricalEncoder` — one per embedding table (features sharing a table share one
  vocabulary). Id 0 is padding, id 1 the out-of-vocabulary id (unknown, rare or missing values),
  real values start at 2, most frequent first. With ``hash_buckets`` the vocabulary is replaced
  by a stable hash (blake2b) of the value.
* :class:`DenseEncoder` — fill value, optional ``log1p``, optional standardisation with the
  training mean and standard deviation.

Encoding is vectorised: vocabulary lookups are one ``pyarrow.compute.index_in`` per column;
hashing hashes each distinct value once and maps rows with one ``numpy.take``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtlrec.batch import FIRST_ID, OOV_ID, PAD_ID
from mtlrec.data.columns import combine, first_row, to_category_strings, to_float, to_list
from mtlrec.errors import DataError
from mtlrec.schema import DenseFeature, SequenceFeature


class CategoricalEncoder:
    """Value -> id for one embedding table.

    The vocabulary is a pyarrow string array (most frequent first); encoding is one
    ``pyarrow.compute.index_in`` over the column, with no Python per row or per value.

    Args:
        min_count: values seen fewer times in training map to the OOV id.
        max_size: keep at most this many values (the most frequent).
        hash_buckets: hash values into this many ids instead of learning a vocabulary.
        vocab: a fitted vocabulary (most frequent first), when loading.
    """

    def __init__(
        self,
        *,
        min_count: int = 1,
        max_size: int | None = None,
        hash_buckets: int | None = None,
        vocab: list[str] | pa.Array | None = None,
    ) -> None:
        self.min_count = min_count
        self.max_size = max_size
        self.hash_buckets = hash_buckets
        self.vocab: pa.Array = (
            vocab if isinstance(vocab, pa.Array) else pa.array(list(vocab or []), pa.string())
        )

    @property
    def size(self) -> int:
        """Rows of the embedding table: padding, OOV and the values."""
        if self.hash_buckets is not None:
            return self.hash_buckets + FIRST_ID
        return len(self.vocab) + FIRST_ID

    def fit(self, arrays: list[pa.Array]) -> CategoricalEncoder:
        """Learn the vocabulary from training values (all features of the table together).

        Order: count descending, then value ascending (deterministic).
        """
        if self.hash_buckets is not None:
            return self
        parts = [pc.drop_null(combine(a)) for a in arrays]
        values = pa.concat_arrays(parts) if parts else pa.array([], pa.string())
        vc = pc.value_counts(values)
        vals, counts = vc.field("values"), vc.field("counts")
        keep = pc.greater_equal(counts, self.min_count)
        stats = pa.table({"v": pc.filter(vals, keep), "c": pc.filter(counts, keep)})
        order = pc.sort_indices(stats, sort_keys=[("c", "descending"), ("v", "ascending")])
        if self.max_size is not None:
            order = order[: self.max_size]
        self.vocab = pc.take(stats.column("v"), order).combine_chunks()
        return self

    def _hash_ids(self, strings: pa.Array) -> np.ndarray:
        """Stable hashed ids (blake2b of each distinct value; nulls -> OOV)."""
        b = self.hash_buckets or 1
        enc = pc.dictionary_encode(strings)
        uniques = enc.dictionary.to_pylist()
        lut = np.empty(len(uniques) + 1, dtype=np.int32)
        lut[:-1] = np.fromiter(
            (
                FIRST_ID
                + int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") % b
                for v in uniques
            ),
            dtype=np.int64,
            count=len(uniques),
        )
        lut[-1] = OOV_ID
        return lut[enc.indices.fill_null(len(uniques)).to_numpy(zero_copy_only=False)]

    def encode(self, strings: pa.Array) -> tuple[np.ndarray, int]:
        """Ids for string values (nulls -> OOV).

        Returns:
            ``(ids, unknown)``: int32 ids, and how many non-null values were not in the
            vocabulary.
        """
        strings = combine(strings)
        if self.hash_buckets is not None:
            return self._hash_ids(strings), 0
        pos = pc.index_in(strings, value_set=self.vocab)  # null where absent or null
        ids = pos.fill_null(OOV_ID - FIRST_ID).to_numpy(zero_copy_only=False).astype(np.int32)
        ids += FIRST_ID
        unknown = pos.null_count - strings.null_count
        return ids, int(unknown)

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_count": self.min_count,
            "max_size": self.max_size,
            "hash_buckets": self.hash_buckets,
            "vocab": self.vocab.to_pylist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CategoricalEncoder:
        return cls(
            min_count=d["min_count"],
            max_size=d["max_size"],
            hash_buckets=d["hash_buckets"],
            vocab=d["vocab"],
        )


def encode_sequence(
    encoder: CategoricalEncoder, feature: SequenceFeature, column: pa.Array
) -> tuple[np.ndarray, int]:
    """A sequence feature as a padded id matrix ``[N, max_len]`` (PAD_ID after the ids)."""
    lists = to_list(column, feature.separator)
    n = len(lists)
    flat = to_category_strings(pc.list_flatten(lists))  # row order
    parent = pc.list_parent_indices(lists)
    # empty and null elements ("a||b", a null inside a Parquet list) are dropped, not OOV
    keep = pc.and_kleene(pc.is_valid(flat), pc.greater(pc.utf8_length(flat), 0)).fill_null(False)
    flat, parent = pc.filter(flat, keep), pc.filter(parent, keep)
    lengths = np.bincount(parent.to_numpy(zero_copy_only=False), minlength=n).astype(np.int64)
    flat_ids, unknown = encoder.encode(flat) if len(flat) else (np.zeros(0, np.int32), 0)
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    L = feature.max_len
    keep = np.minimum(lengths, L)
    if feature.truncate == "last":
        starts = starts + (lengths - keep)
    pos = np.arange(L, dtype=np.int64)
    valid = pos[None, :] < keep[:, None]  # [N, L]
    gather = np.where(valid, starts[:, None] + pos[None, :], 0)  # [N, L]
    out = np.full((len(lengths), L), PAD_ID, dtype=np.int32)
    if len(flat_ids):
        out[valid] = flat_ids[gather[valid]]
    return out, unknown


class DenseEncoder:
    """Fill, transform and standardise one numeric feature.

    Args:
        fill_value: value of missing entries (before the transform).
        transform: ``none``, ``log1p``, ``standardize`` or ``log1p_standardize``.
        mean, std: standardisation constants (fitted on training data).
    """

    def __init__(
        self,
        *,
        fill_value: float = 0.0,
        transform: str = "none",
        mean: float = 0.0,
        std: float = 1.0,
    ) -> None:
        self.fill_value = fill_value
        self.transform = transform
        self.mean = mean
        self.std = std

    def _pre(self, column: pa.Array, file: str, name: str) -> np.ndarray:
        x = to_float(column, file=file, column=name)
        bad = np.isinf(x)
        if bad.any():
            raise DataError(
                "expected a finite number, found infinity",
                file=file,
                column=name,
                row=first_row(bad),
            )
        x = np.where(np.isnan(x), self.fill_value, x)
        if self.transform.startswith("log1p"):
            bad = x <= -1.0
            if bad.any():
                raise DataError(
                    f"log1p needs values > -1, found {float(x[bad][0])!r}",
                    file=file,
                    column=name,
                    row=first_row(bad),
                )
            x = np.log1p(x)
        return x

    def fit(self, column: pa.Array, *, file: str, name: str) -> DenseEncoder:
        x = self._pre(column, file, name)
        if self.transform.endswith("standardize"):
            self.mean = float(x.mean())
            sd = float(x.std())
            self.std = sd if sd > 1e-12 and math.isfinite(sd) else 1.0
        return self

    def encode(self, column: pa.Array, *, file: str, name: str) -> np.ndarray:
        x = self._pre(column, file, name)
        if self.transform.endswith("standardize"):
            x = (x - self.mean) / self.std
        return x.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fill_value": self.fill_value,
            "transform": self.transform,
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenseEncoder:
        return cls(**d)

    @classmethod
    def for_feature(cls, f: DenseFeature) -> DenseEncoder:
        return cls(fill_value=f.fill_value, transform=f.transform)
