"""Exact lookup of values in a fixed set (a vocabulary): a binary search over a sorted copy built
once, ``O(n log V)`` per lookup of ``n`` values, where ``pyarrow.compute.index_in`` rebuilds a
hash table of all ``V`` values on every call (~100 ms for 500,000 strings: the cost of a whole
scoring request)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtlrec.data.columns import combine

SORTED_LOOKUP_MIN = 1024
"""Vocabularies at least this large are looked up by binary search over a sorted copy (built
once); smaller ones with ``pyarrow.compute.index_in``, which hashes the whole vocabulary on
every call (~0.7 ms for 10,000 strings, ~100 ms for 500,000: the cost of a whole request)."""
SORTED_LOOKUP_MAX_BYTES = 256 << 20
"""Largest fixed-width copy of a string vocabulary (values x longest value); above it the
lookup stays with ``index_in``."""


def fixed_width(strings: pa.Array, width: int) -> np.ndarray:
    """Strings as numpy fixed-width byte keys ``S{width + 4}``: the UTF-8 bytes cut or padded
    with NUL to ``width``, then the byte length (4 bytes, big-endian), read straight from the
    Arrow buffers (no Python per value). Equal keys mean equal strings when no string is
    longer than ``width`` (the length tells ``"a"`` from ``"a\\0"``), and a longer string
    equals no such string; key order is not string order."""
    arr = combine(strings)
    if not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset : arr.offset + n + 1]
    offsets = offsets.astype(np.int64)
    lengths = np.diff(offsets)
    if arr.null_count:
        lengths[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0
    out = np.zeros((n, width + 4), dtype=np.uint8)
    if n and width and bufs[2] is not None:
        data = np.frombuffer(bufs[2], dtype=np.uint8)
        cols = np.arange(width)
        step = max(1, (1 << 20) // width)  # rows per block: index temporaries stay ~20 MB
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            inside = cols[None, :] < np.minimum(lengths[lo:hi], width)[:, None]
            at = (offsets[lo:hi, None] + cols[None, :])[inside]
            out[lo:hi, :width][inside] = data[at]
    out[:, width:] = lengths.astype(">u4").view(np.uint8).reshape(n, 4)
    return out.view(f"S{width + 4}").reshape(n)


class SortedKeys:
    """Exact lookup of values in a fixed set (a vocabulary) by binary search over a sorted
    copy built once: ``O(n log V)`` per lookup of ``n`` values, where ``pyarrow.compute.
    index_in`` rebuilds a hash table of all ``V`` values on every call.

    Strings are compared as :func:`fixed_width` keys, integers as int64.

    Args:
        values: the set, distinct values (position ``i`` is answered as ``i``).
    """

    def __init__(self, values: pa.Array) -> None:
        values = combine(values)
        self.size = len(values)
        self.is_string = pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
        if self.is_string:
            self.width = int(pc.max(pc.binary_length(values)).as_py() or 0)
            keys = fixed_width(values, self.width)
        else:
            keys = values.to_numpy(zero_copy_only=False).astype(np.int64)
        self.order = np.argsort(keys, kind="stable")
        self.keys = keys[self.order]

    @staticmethod
    def affordable(values: pa.Array) -> bool:
        """Whether a sorted copy of ``values`` is worth building and small enough."""
        if len(values) < SORTED_LOOKUP_MIN:
            return False
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            return True
        longest = pc.max(pc.binary_length(values)).as_py() or 0
        return len(values) * (longest + 4) <= SORTED_LOOKUP_MAX_BYTES

    def positions(self, query: pa.Array) -> np.ndarray:
        """Position of each query value in the set, ``-1`` where absent or null."""
        query = combine(query)
        n = len(query)
        if n == 0 or self.size == 0:
            return np.full(n, -1, dtype=np.int64)
        if self.is_string:
            keys = fixed_width(query, self.width)
        else:
            keys = query.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys), self.size - 1)
        hit = self.keys[at] == keys
        if query.null_count:
            hit &= query.is_valid().to_numpy(zero_copy_only=False)
        return np.where(hit, self.order[at], -1)
