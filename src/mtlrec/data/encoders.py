"""Encoders fitted on the training split only and saved with the model.

* :class:`CategoricalEncoder` — one per embedding table (features sharing a table share one
  vocabulary). Id 0 is padding, id 1 the out-of-vocabulary id (unknown, rare or missing values),
  real values start at 2, most frequent first. With ``hash_buckets`` the vocabulary is replaced
  by a stable hash (blake2b) of the value; with ``vocab_size`` (pre-indexed ids) an integer
  ``v`` in ``[0, vocab_size)`` is used as it is (id ``v + 2``) and nothing is fitted.
* :class:`DenseEncoder` — fill value, optional ``log1p``, optional standardisation with the
  training mean and standard deviation.

Encoding is vectorised: a vocabulary lookup is one binary search per column over a sorted copy
of the vocabulary built once (:class:`SortedKeys`; ``pyarrow.compute.index_in`` for small
vocabularies); hashing hashes each distinct value once and maps rows with one ``numpy.take``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtlrec.batch import FIRST_ID, OOV_ID, PAD_ID
from mtlrec.data.columns import (
    DEFAULT_NULL_VALUES,
    combine,
    first_row,
    sequence_values,
    to_category_ints,
    to_category_strings,
    to_float,
    to_list,
)
from mtlrec.data.lookup import SortedKeys
from mtlrec.errors import ConfigError, DataError
from mtlrec.schema import MAX_TABLE_VALUES, DenseFeature, SequenceFeature


def _merge_counts(chunks: list[pa.Table]) -> pa.Table:
    if not chunks:
        return pa.table({"v": pa.array([], pa.string()), "c": pa.array([], pa.int64())})
    merged = pa.concat_tables(chunks).group_by("v").aggregate([("c", "sum")])
    return merged.rename_columns(["v", "c"]).combine_chunks()


class CategoricalEncoder:
    """Value -> id for one embedding table.

    The vocabulary is a pyarrow string array (most frequent first); encoding is one vectorised
    lookup over the column (:class:`SortedKeys`, or ``index_in`` for small vocabularies), with
    no Python per row or per value.

    Args:
        min_count: values seen fewer times in training map to the OOV id.
        max_size: keep at most this many values (the most frequent).
        hash_buckets: hash values into this many ids instead of learning a vocabulary.
        vocab_size: the values are integer ids already, in ``[0, vocab_size)``: used as they
            are (out-of-range ids and nulls map to the OOV id; no vocabulary).
        vocab: a fitted vocabulary (most frequent first), when loading.
    """

    def __init__(
        self,
        *,
        min_count: int = 1,
        max_size: int | None = None,
        hash_buckets: int | None = None,
        vocab_size: int | None = None,
        vocab: list[str] | pa.Array | None = None,
    ) -> None:
        for name, n in (("hash_buckets", hash_buckets), ("vocab_size", vocab_size)):
            if n is not None and not 1 <= n <= MAX_TABLE_VALUES:
                raise ConfigError(
                    f"{name} must be in [1, {MAX_TABLE_VALUES}] (ids are int32), got {n}"
                )
        self.min_count = min_count
        self.max_size = max_size
        self.hash_buckets = hash_buckets
        self.vocab_size = vocab_size
        self.vocab: pa.Array = (
            vocab if isinstance(vocab, pa.Array) else pa.array(list(vocab or []), pa.string())
        )
        if self.vocab.null_count:  # a null would take the ids of null rows, which are OOV
            at = int(np.flatnonzero(self.vocab.is_null().to_numpy(zero_copy_only=False))[0])
            raise ConfigError(f"the vocabulary holds a null (entry {at}); values are strings")
        self._counts: list[pa.Table] = []
        self.counts: pa.Table | None = None
        """After :meth:`finalize`: every value counted in training and its count (columns
        ``v``, ``c``; before ``min_count`` and ``max_size``), kept for vocabulary growth
        (:mod:`mtlrec.data.vocab_growth`); None when loaded from JSON."""

    @property
    def size(self) -> int:
        """Rows of the embedding table: padding, OOV and the values."""
        if self.hash_buckets is not None:
            return self.hash_buckets + FIRST_ID
        if self.vocab_size is not None:
            return self.vocab_size + FIRST_ID
        return len(self.vocab) + FIRST_ID

    @property
    def fitted(self) -> bool:
        """Whether the encoder learns a vocabulary (not hashed, not pre-indexed)."""
        return self.hash_buckets is None and self.vocab_size is None

    def partial_fit(self, arrays: list[pa.Array]) -> CategoricalEncoder:
        """Count training values (call for every chunk, then :meth:`finalize`)."""
        if not self.fitted:
            return self
        parts = [pc.drop_null(combine(a)) for a in arrays]
        if not parts:
            return self
        vc = pc.value_counts(pa.concat_arrays(parts))
        self._counts.append(pa.table({"v": vc.field("values"), "c": vc.field("counts")}))
        if len(self._counts) > 16:  # keep the running counts compact
            self._counts = [_merge_counts(self._counts)]
        return self

    def finalize(self) -> CategoricalEncoder:
        """Build the vocabulary from the counts: count descending, then value ascending."""
        if not self.fitted:
            return self
        stats = _merge_counts(self._counts)
        self._counts = []
        self.counts = stats
        stats = stats.filter(pc.greater_equal(stats.column("c"), self.min_count))
        order = pc.sort_indices(stats, sort_keys=[("c", "descending"), ("v", "ascending")])
        if self.max_size is not None:
            order = order[: self.max_size]
        self.vocab = pc.take(stats.column("v"), order).combine_chunks()
        return self

    def fit(self, arrays: list[pa.Array]) -> CategoricalEncoder:
        """Learn the vocabulary from training values (all features of the table together)."""
        return self.partial_fit(arrays).finalize()

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

    def _indexed_ids(
        self, array: pa.Array, *, file: str | None, column: str | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pre-indexed ids: ``v + FIRST_ID`` for an integer ``v`` in ``[0, vocab_size)``, the
        OOV id for nulls and out-of-range ids (flagged as unknown).

        Raises:
            DataError: a value is not an integer.
        """
        ints = to_category_ints(array)
        if ints is None:
            text = pc.utf8_trim_whitespace(to_category_strings(array))
            text = pc.replace_substring_regex(text, r"^\+", "")  # "+3" is 3
            try:
                ints = pc.cast(text, pa.int64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                ok = pc.match_substring_regex(text, r"^-?[0-9]{1,18}$")
                bad = pc.invert(ok.fill_null(True)).to_numpy(zero_copy_only=False)
                at = first_row(bad) if bad.any() else None
                found = "" if at is None else f", found {text[at - 1].as_py()!r}"
                raise DataError(
                    f"expected an integer id in [0, {self.vocab_size}) (the feature is "
                    f"pre-indexed: vocab_size){found}",
                    file=file,
                    column=column,
                    row=at,
                ) from None
        v = ints.fill_null(-1).to_numpy(zero_copy_only=False)
        inside = (v >= 0) & (v < (self.vocab_size or 0))
        ids = np.where(inside, v + FIRST_ID, OOV_ID).astype(np.int32)
        unknown = ~inside
        if ints.null_count:
            unknown &= ints.is_valid().to_numpy(zero_copy_only=False)
        return ids, unknown

    def lookup(self, strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Ids for string values (nulls -> OOV) and a bool mask of the rows whose (non-null)
        value is not in the vocabulary."""
        strings = combine(strings)
        if self.vocab_size is not None:
            return self._indexed_ids(strings, file=None, column=None)
        if self.hash_buckets is not None:
            return self._hash_ids(strings), np.zeros(len(strings), dtype=bool)
        keys = self._sorted_keys()
        if keys is not None:
            at = keys.positions(strings)
            ids = np.where(at >= 0, at + FIRST_ID, OOV_ID).astype(np.int32)
            unknown = at < 0
            if strings.null_count:
                unknown &= strings.is_valid().to_numpy(zero_copy_only=False)
            return ids, unknown
        pos = pc.index_in(strings, value_set=self.vocab)  # null where absent or null
        ids = pos.fill_null(OOV_ID - FIRST_ID).to_numpy(zero_copy_only=False).astype(np.int32)
        ids += FIRST_ID
        unknown = pc.and_(pc.is_null(pos), pc.is_valid(strings))
        return ids, unknown.to_numpy(zero_copy_only=False)

    def prepare(self) -> CategoricalEncoder:
        """Build the lookup structures now (they are otherwise built by the first lookup,
        ~0.2 s for 500,000 values): a service calls this before its first request."""
        if self.fitted:
            self._sorted_keys()
            self._int_vocab()
        return self

    def _sorted_keys(self) -> SortedKeys | None:
        """The vocabulary's :class:`SortedKeys` (built on first use, per vocabulary), or
        ``None`` where ``index_in`` is as fast (small) or the copy too large."""
        cached = getattr(self, "_sorted", None)
        if cached is not None and cached[0] is self.vocab:
            return cached[1]
        keys = SortedKeys(self.vocab) if SortedKeys.affordable(self.vocab) else None
        self._sorted = (self.vocab, keys)
        return keys

    def _int_vocab(self) -> tuple[pa.Array, np.ndarray, SortedKeys | None]:
        """The vocabulary's canonical integer entries (``"12"``, ``"-3"``; not ``"012"``) as
        int64 values, their ids followed by the OOV id, and their :class:`SortedKeys` when
        worth it (cached per vocabulary)."""
        cached = getattr(self, "_ints", None)
        if cached is not None and cached[0] is self.vocab:
            return cached[1], cached[2], cached[3]
        canonical = pc.match_substring_regex(self.vocab, r"^(0|-?[1-9][0-9]{0,18})$")
        where = np.flatnonzero(canonical.fill_null(False).to_numpy(zero_copy_only=False))
        texts = pc.take(self.vocab, pa.array(where, pa.int64()))
        # 19 digits may overflow int64 (checked one by one: few values are that long)
        long = np.flatnonzero(
            pc.greater_equal(pc.utf8_length(texts), 19).to_numpy(zero_copy_only=False)
        )
        if len(long):
            drop = [i for i in long.tolist() if not -(2**63) <= int(texts[i].as_py()) < 2**63]
            if drop:
                keep = np.ones(len(where), dtype=bool)
                keep[drop] = False
                where, texts = where[keep], pc.filter(texts, pa.array(keep))
        values = pc.cast(texts, pa.int64())
        # id of each integer entry, then the OOV id for "not found"
        ids_of = np.append(where + FIRST_ID, OOV_ID).astype(np.int32)
        keys = SortedKeys(values) if SortedKeys.affordable(values) else None
        self._ints = (self.vocab, values, ids_of, keys)
        return values, ids_of, keys

    def lookup_column(
        self,
        array: pa.Array | pa.ChunkedArray,
        *,
        file: str | None = None,
        column: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`lookup` of a raw column: integer columns are matched as integers (the same
        ids as their string forms, several times faster), anything else as strings.

        Args:
            array: the values (missing values already null: see :mod:`mtlrec.data.columns`).
            file, column: named in the error of a pre-indexed feature's non-integer value.
        """
        if self.vocab_size is not None:
            return self._indexed_ids(combine(array), file=file, column=column)
        if self.hash_buckets is None:
            ints = to_category_ints(array)
            if ints is not None:
                values, ids_of, keys = self._int_vocab()
                if keys is not None:
                    at = keys.positions(ints)
                    ids = ids_of[np.where(at >= 0, at, len(values))]
                    unknown = at < 0
                    if ints.null_count:
                        unknown &= ints.is_valid().to_numpy(zero_copy_only=False)
                    return ids, unknown
                pos = pc.index_in(ints, value_set=values)  # null: absent or null
                ids = ids_of[pos.fill_null(len(values)).to_numpy(zero_copy_only=False)]
                if not pos.null_count:
                    return ids, np.zeros(len(ids), dtype=bool)
                unknown = pc.and_(pc.is_null(pos), pc.is_valid(ints))
                return ids, unknown.to_numpy(zero_copy_only=False)
        return self.lookup(to_category_strings(array))

    def encode(self, strings: pa.Array) -> tuple[np.ndarray, int]:
        """Ids for string values (nulls -> OOV).

        Returns:
            ``(ids, unknown)``: int32 ids, and how many non-null values were not in the
            vocabulary.
        """
        ids, unknown = self.lookup(strings)
        return ids, int(unknown.sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_count": self.min_count,
            "max_size": self.max_size,
            "hash_buckets": self.hash_buckets,
            "vocab_size": self.vocab_size,
            "vocab": self.vocab.to_pylist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CategoricalEncoder:
        return cls(
            min_count=d["min_count"],
            max_size=d["max_size"],
            hash_buckets=d["hash_buckets"],
            vocab_size=d.get("vocab_size"),
            vocab=d["vocab"],
        )


def encode_sequence(
    encoder: CategoricalEncoder,
    feature: SequenceFeature,
    column: pa.Array,
    null_values: Sequence[str] = DEFAULT_NULL_VALUES,
) -> tuple[np.ndarray, int]:
    """A sequence feature as a padded id matrix ``[N, max_len]`` (PAD_ID after the ids) and the
    number of unknown ids."""
    ids, unknown = sequence_ids(encoder, feature, column, null_values)
    return ids, int(unknown.sum())


def sequence_ids(
    encoder: CategoricalEncoder,
    feature: SequenceFeature,
    column: pa.Array,
    null_values: Sequence[str] = DEFAULT_NULL_VALUES,
    *,
    file: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Padded ids ``[N, max_len]`` and the number of unknown ids of every row ``[N]``.

    Missing elements (null, empty -- ``"a||b"`` --, a null token) are dropped, not OOV.
    """
    lists = to_list(column, feature.separator)
    n = len(lists)
    values, parent = sequence_values(lists, null_values)  # row order
    flat: pa.Array | None = to_category_ints(values) if encoder.fitted else None
    if flat is None:
        flat = values if encoder.vocab_size is not None else to_category_strings(values)
    parent_np = parent.to_numpy(zero_copy_only=False)
    lengths = np.bincount(parent_np, minlength=n).astype(np.int64)
    if len(flat):
        try:
            flat_ids, unknown_flat = encoder.lookup_column(flat, file=file, column=feature.source)
        except DataError as e:  # the row of the element's list, not the element's
            if e.row is None:
                raise
            row = int(parent_np[e.row - 1]) + 1
            raise DataError(e.detail, file=e.file, column=e.column, row=row) from None
    else:
        flat_ids, unknown_flat = np.zeros(0, np.int32), np.zeros(0, bool)
    unknown_rows = np.bincount(parent_np[unknown_flat], minlength=n)
    L = feature.max_len
    out = np.full((n, L), PAD_ID, dtype=np.int32)
    if not len(flat_ids):
        return out, unknown_rows
    if (lengths == L).all():  # every row exactly full: the ids are the matrix
        out[:] = flat_ids.reshape(n, L)
        return out, unknown_rows
    # each kept element's place: row * L + its position in the row (after truncation)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    within = np.arange(len(flat_ids), dtype=np.int64) - starts[parent_np]
    if feature.truncate == "last":
        within -= np.maximum(lengths - L, 0)[parent_np]
        keep_el = within >= 0
    else:
        keep_el = within < L
    dest = parent_np.astype(np.int64) * L + within
    if keep_el.all():
        out.reshape(-1)[dest] = flat_ids
    else:
        out.reshape(-1)[dest[keep_el]] = flat_ids[keep_el]
    return out, unknown_rows


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
        self._n, self._mean, self._m2 = 0, 0.0, 0.0
        self.seen: tuple[int, int, float, float] = (0, 0, math.inf, -math.inf)

    def _pre(self, column: pa.Array, file: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Filled and transformed values, and the mask of missing ones (before the fill)."""
        x = to_float(column, file=file, column=name)
        bad = np.isinf(x)
        if bad.any():
            raise DataError(
                "expected a finite number, found infinity",
                file=file,
                column=name,
                row=first_row(bad),
            )
        missing = np.isnan(x)
        x = np.where(missing, self.fill_value, x)
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
        return x, missing

    def partial_fit(
        self, column: pa.Array, *, file: str, name: str, rows: np.ndarray | None = None
    ) -> DenseEncoder:
        """Accumulate statistics of a chunk (every value is checked; only ``rows``, a bool
        mask, are counted), then call :meth:`finalize`. Moments are merged with Chan et al.'s
        pairwise update, stable for any number of chunks; :attr:`seen` keeps the rows counted,
        the values present among them and the smallest and largest value (after the fill)."""
        x, missing = self._pre(column, file, name)
        if rows is not None:
            x, missing = x[rows], missing[rows]
        n = x.size
        if n == 0:
            return self
        rows_, present, lo, hi = self.seen
        self.seen = (
            rows_ + n,
            present + int(n - np.count_nonzero(missing)),
            min(lo, float(x.min())),
            max(hi, float(x.max())),
        )
        mean = float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        tot = self._n + n
        delta = mean - self._mean
        self._mean += delta * n / tot
        self._m2 += m2 + delta * delta * self._n * n / tot
        self._n = tot
        return self

    def finalize(self) -> DenseEncoder:
        if self.transform.endswith("standardize") and self._n > 0:
            self.mean = self._mean
            sd = math.sqrt(self._m2 / self._n)
            self.std = sd if sd > 1e-12 and math.isfinite(sd) else 1.0
        self._n, self._mean, self._m2 = 0, 0.0, 0.0
        return self

    def fit(self, column: pa.Array, *, file: str, name: str) -> DenseEncoder:
        return self.partial_fit(column, file=file, name=name).finalize()

    def encode(self, column: pa.Array, *, file: str, name: str) -> np.ndarray:
        x = self._pre(column, file, name)[0]
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
