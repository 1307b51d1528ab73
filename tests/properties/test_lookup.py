"""Vocabulary lookups: the sorted binary search (:class:`SortedKeys`, used for vocabularies of
1,024 values or more) answers exactly as ``pyarrow.compute.index_in`` for any strings
(empty, unicode, NUL bytes, prefixes of each other, nulls, sliced arrays) and integers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtlrec.batch import FIRST_ID, OOV_ID
from mtlrec.data import lookup
from mtlrec.data.encoders import CategoricalEncoder, SortedKeys

TEXT = st.text(alphabet=st.sampled_from(["a", "b", "\x00", "é", "日", " "]), max_size=6)


def _index_in(query: pa.Array, values: pa.Array) -> np.ndarray:
    pos = pc.index_in(query, value_set=values)
    return pos.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


@settings(max_examples=150, deadline=None)
@given(
    vocab=st.lists(TEXT, unique=True, max_size=30),
    query=st.lists(st.none() | TEXT, max_size=40),
    start=st.integers(0, 3),
)
def test_sorted_strings_match_index_in(vocab: list[str], query: list, start: int) -> None:
    values = pa.array(vocab, pa.string())
    q = pa.array(["pad"] * start + query, pa.string()).slice(start)  # a sliced array
    np.testing.assert_array_equal(SortedKeys(values).positions(q), _index_in(q, values))


@settings(max_examples=100, deadline=None)
@given(
    vocab=st.lists(st.integers(-(2**63), 2**63 - 1), unique=True, max_size=30),
    query=st.lists(st.none() | st.integers(-(2**63), 2**63 - 1), max_size=40),
)
def test_sorted_integers_match_index_in(vocab: list[int], query: list) -> None:
    values = pa.array(vocab, pa.int64())
    q = pa.array(query + vocab[:3], pa.int64())
    np.testing.assert_array_equal(SortedKeys(values).positions(q), _index_in(q, values))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    train=st.lists(st.integers(0, 60).map(str) | TEXT, min_size=1, max_size=80),
    query=st.lists(st.none() | st.integers(-5, 70).map(str) | TEXT, max_size=50),
)
def test_encoder_ids_do_not_depend_on_the_lookup(
    monkeypatch: pytest.MonkeyPatch, train: list[str], query: list
) -> None:
    enc = CategoricalEncoder().fit([pa.array(train, pa.string())])
    q = pa.array(query, pa.string())
    qi = pa.array([None if v is None or not v.isdigit() else int(v) for v in query], pa.int64())
    want = enc.lookup(q), enc.lookup_column(qi)
    with monkeypatch.context() as m:  # the same patch for every example
        m.setattr(lookup, "SORTED_LOOKUP_MIN", 0)
        fresh = CategoricalEncoder(vocab=enc.vocab.to_pylist())
        got = fresh.lookup(q), fresh.lookup_column(qi)
    assert fresh._sorted[1] is not None and fresh._ints[3] is not None  # the sorted path ran
    for (w_ids, w_unk), (g_ids, g_unk) in zip(want, got, strict=True):
        np.testing.assert_array_equal(g_ids, w_ids)
        np.testing.assert_array_equal(g_unk, w_unk)


def test_large_vocabulary_uses_the_sorted_copy() -> None:
    vocab = [f"item{i}" for i in range(5000)]
    enc = CategoricalEncoder(vocab=vocab)
    q = pa.array(["item4999", "item0", None, "nope", "item25"])
    ids, unknown = enc.lookup(q)
    assert enc._sorted[1] is not None
    assert ids.tolist() == [FIRST_ID + 4999, FIRST_ID, OOV_ID, OOV_ID, FIRST_ID + 25]
    assert unknown.tolist() == [False, False, False, True, False]


def test_long_values_are_copied_in_blocks() -> None:
    """Values of ~3,000 bytes: the fixed-width copy is made a few hundred rows at a time."""
    rng = np.random.default_rng(0)
    vals = ["x" * int(n) + str(i) for i, n in enumerate(rng.integers(0, 3000, 3000))]
    values = pa.array(vals)
    q = pa.array([*vals[::7], "nope", None, vals[5] + "a", vals[5][:-1]])
    np.testing.assert_array_equal(SortedKeys(values).positions(q), _index_in(q, values))
