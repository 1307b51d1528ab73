"""Tests that kill the mutants of ``mtlrec.data.encoders`` (:class:`CategoricalEncoder`) the rest
of the suite let live, each against an independent reference: the vocabulary and its counts from
a plain ``collections.Counter`` (count descending, then value ascending, ``min_count``,
``max_size``) over many ``partial_fit`` chunks, the encoder's state before fitting and after
``from_dict``, Arrow vocabularies used as given, hashed ids from blake2b, pre-indexed ids from
Python's ``int()`` over integer, unsigned, float, text (spaces, ``+``), dictionary and chunked
columns (with the exact ``DataError`` of a non-integer value), integer lookups at the ends of
int64, the lookup structures built once per vocabulary (and only when worth it), and the
refusals of table sizes beyond int32 ids and of vocabularies holding a null."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

import mtlrec.data.encoders as encoders
from mtlrec.batch import FIRST_ID, OOV_ID
from mtlrec.data.columns import to_category_strings
from mtlrec.data.encoders import CategoricalEncoder
from mtlrec.data.lookup import SORTED_LOOKUP_MIN, SortedKeys
from mtlrec.errors import ConfigError, DataError
from mtlrec.schema import MAX_TABLE_VALUES, SparseFeature


def _reference_vocab(counts: Counter, min_count: int = 1, max_size: int | None = None) -> list:
    """The documented vocabulary: values seen at least ``min_count`` times, count descending,
    then value ascending (ASCII values: Python and Arrow order agree), the first ``max_size``."""
    kept = sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v))
    return kept if max_size is None else kept[:max_size]


def _counts_of(enc: CategoricalEncoder) -> dict[str, int]:
    assert enc.counts is not None
    v, c = enc.counts.column("v").to_pylist(), enc.counts.column("c").to_pylist()
    return dict(zip(v, c, strict=True))


def _blake_id(value: str, buckets: int) -> int:
    digest = hashlib.blake2b(value.encode(), digest_size=8).digest()
    return FIRST_ID + int.from_bytes(digest, "little") % buckets


# -- state before fitting, after fitting and after loading ----------------------------------------
def test_unfitted_and_loaded_encoders_have_an_empty_string_vocabulary_and_no_counts() -> None:
    # the vocabulary is "a pyarrow string array", also when empty; counts are None until
    # finalize and "None when loaded from JSON"
    loaded = CategoricalEncoder.from_dict(
        {"min_count": 1, "max_size": None, "hash_buckets": None, "vocab": []}
    )
    for enc in (CategoricalEncoder(), loaded):
        assert enc.vocab.type == pa.string() and len(enc.vocab) == 0
        assert enc.counts is None
        ids, unknown = enc.lookup(pa.array(["a", None], pa.string()))
        assert ids.tolist() == [OOV_ID, OOV_ID] and unknown.tolist() == [True, False]


def test_arrow_vocabulary_is_used_as_given() -> None:
    # a large_string vocabulary (as read from some Parquet files) is kept, not rebuilt
    vocab = pa.array(["b", "a", "c"], pa.large_string())
    enc = CategoricalEncoder(vocab=vocab)
    assert enc.vocab is vocab
    ids, unknown = enc.lookup(pa.array(["a", "z", None, "c"], pa.string()))
    assert ids.tolist() == [FIRST_ID + 1, OOV_ID, OOV_ID, FIRST_ID + 2]
    assert unknown.tolist() == [False, True, False, False]


def test_from_dict_round_trip_keeps_every_setting() -> None:
    enc = CategoricalEncoder(min_count=3, max_size=4).fit(
        [pa.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2, pa.string())]
    )
    d = enc.to_dict()
    loaded = CategoricalEncoder.from_dict(d)
    assert loaded.to_dict() == d
    assert loaded.min_count == 3 and loaded.max_size == 4
    assert loaded.counts is None


def _chunks(n: int) -> list[list[str | None]]:
    # deterministic chunks with repeated values, ties and nulls
    return [
        [f"v{(i * 7 + j * 3) % 11}" if (i + j) % 5 else None for j in range(i % 4 + 2)]
        for i in range(n)
    ]


@pytest.mark.parametrize("n_chunks", [1, 16, 17, 40])
def test_vocabulary_and_counts_over_many_partial_fits_match_a_counter(n_chunks: int) -> None:
    chunks = _chunks(n_chunks)
    enc = CategoricalEncoder(min_count=2, max_size=6)
    for chunk in chunks:
        enc.partial_fit([pa.array(chunk, pa.string())])
    enc.finalize()
    counts = Counter(v for chunk in chunks for v in chunk if v is not None)
    # counts: every value seen and its count, before min_count and max_size
    assert _counts_of(enc) == dict(counts)
    assert enc.vocab.to_pylist() == _reference_vocab(counts, min_count=2, max_size=6)


def test_running_counts_are_merged_once_more_than_16_chunks_are_held() -> None:
    # "keep the running counts compact": up to 16 chunk tables are kept, the 17th merges them
    enc = CategoricalEncoder()
    for i, chunk in enumerate(_chunks(17), start=1):
        enc.partial_fit([pa.array(chunk, pa.string())])
        assert len(enc._counts) == (i if i <= 16 else 1)


# -- hashed ids -----------------------------------------------------------------------------------
def test_hashed_lookup_ids_are_int32_blake2b_and_nothing_is_unknown() -> None:
    enc = CategoricalEncoder(hash_buckets=7)
    values = ["a", "b", None, "a", "x y"]
    for ids, unknown in (
        enc.lookup(pa.array(values, pa.string())),
        enc.lookup_column(pa.array(values, pa.string()).dictionary_encode()),
    ):
        assert ids.dtype == np.int32 and unknown.dtype == np.bool_
        assert ids.tolist() == [OOV_ID if v is None else _blake_id(v, 7) for v in values]
        assert not unknown.any()


# -- pre-indexed ids ------------------------------------------------------------------------------
def _indexed_reference(values: list, vocab_size: int) -> tuple[list[int], list[bool]]:
    """``v + FIRST_ID`` for an integer ``v`` in ``[0, vocab_size)``, else OOV; unknown marks the
    non-null values out of range. Text is parsed with Python's ``int()`` (spaces, ``+``)."""
    ids, unknown = [], []
    for v in values:
        n = None if v is None else int(v)
        inside = n is not None and 0 <= n < vocab_size
        ids.append(n + FIRST_ID if inside else OOV_ID)
        unknown.append(n is not None and not inside)
    return ids, unknown


INDEXED_COLUMNS = [
    *[([3, -1, 0, None, 7, 4], t) for t in (pa.int8(), pa.int16(), pa.int32(), pa.int64())],
    *[([3, 0, None, 7, 4, 200], t) for t in (pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64())],
    ([3.0, 0.0, None, 7.0, -2.0], pa.float64()),
    ([" 3", "+4", "0 ", None, "7", "-1", "003"], pa.string()),
]


@pytest.mark.parametrize(("values", "type_"), INDEXED_COLUMNS)
def test_pre_indexed_ids_follow_the_integer_value(values: list, type_: pa.DataType) -> None:
    enc = CategoricalEncoder(vocab_size=5)
    arr = pa.array(values, type_)
    want = _indexed_reference(values, 5)
    forms = {
        "array": arr,
        "dictionary": arr.dictionary_encode(),
        "chunked": pa.chunked_array([arr.slice(0, 2), arr.slice(2)]),
    }
    for form in forms.values():
        for ids, unknown in (enc.lookup_column(form), enc.lookup(to_category_strings(form))):
            assert ids.dtype == np.int32 and unknown.dtype == np.bool_
            assert (ids.tolist(), unknown.tolist()) == want


def test_pre_indexed_non_integer_names_file_column_and_first_bad_row() -> None:
    # the null (row 2) is a missing value, not a bad one: the first bad row is 3 (" x ", trimmed)
    enc = CategoricalEncoder(vocab_size=5)
    column = pa.array(["1", None, " x ", "2.5"], pa.string())
    with pytest.raises(DataError) as err:
        enc.lookup_column(column, file="train.csv", column="item")
    e = err.value
    assert (e.file, e.column, e.row) == ("train.csv", "item", 3)
    assert "expected an integer id in [0, 5)" in str(e) and "found 'x'" in str(e)
    assert "data row 3" in str(e)
    with pytest.raises(DataError, match=r"row 3") as err:
        enc.lookup(column)
    assert err.value.row == 3 and err.value.file is None and err.value.column is None


# -- integer lookups of a string vocabulary -------------------------------------------------------
def test_integer_lookup_keeps_int64_extremes_and_drops_overflowing_entries() -> None:
    # canonical integer entries that fit int64 are found by value ("012" is not canonical);
    # -2^63 - 1 and 2^63 have 19 digits and pass the pattern but do not fit: skipped
    vocab = [
        "-9223372036854775809",
        "9223372036854775808",
        "-9223372036854775808",
        "12",
        "012",
        "9223372036854775807",
    ]
    enc = CategoricalEncoder(vocab=vocab)
    ref = {int(s): i + FIRST_ID for i, s in enumerate(vocab) if str(int(s)) == s}
    ref = {k: v for k, v in ref.items() if -(2**63) <= k < 2**63}
    query = [12, -(2**63), 2**63 - 1, 0, None]
    ids, unknown = enc.lookup_column(pa.array(query, pa.int64()))
    assert ids.tolist() == [OOV_ID if q is None else ref.get(q, OOV_ID) for q in query]
    assert unknown.tolist() == [q is not None and q not in ref for q in query]
    # the same ids as the string forms
    s_ids, s_unknown = enc.lookup(to_category_strings(pa.array(query, pa.int64())))
    assert s_ids.tolist() == ids.tolist() and s_unknown.tolist() == unknown.tolist()


def test_a_vocabulary_with_a_null_entry_is_refused() -> None:
    # nulls map to OOV ("missing values"); a null entry in a (hand-edited) vocabulary took the
    # ids of null rows on the string path (``index_in`` matches null to null) while the
    # integer path gave them OOV. A fitted vocabulary never holds one (counts drop nulls).
    msg = "the vocabulary holds a null (entry 1); values are strings"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        CategoricalEncoder.from_dict(
            {"min_count": 1, "max_size": None, "hash_buckets": None, "vocab": ["5", None, "7"]}
        )
    with pytest.raises(ConfigError, match=re.escape("(entry 0)")):
        CategoricalEncoder(vocab=pa.array([None, "a"], pa.large_string()))


@pytest.mark.parametrize("name", ["hash_buckets", "vocab_size"])
@pytest.mark.parametrize("n", [0, -1, MAX_TABLE_VALUES + 1, 2**40])
def test_table_sizes_outside_the_int32_ids_are_refused(name: str, n: int) -> None:
    # ids are int32 after the padding and OOV rows: 2**40 buckets gave negative ids silently,
    # and 0 buckets sent every value to id 2 of a 2-row table
    msg = f"{name} must be in [1, {MAX_TABLE_VALUES}] (ids are int32), got {n}"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        CategoricalEncoder(**{name: n})
    with pytest.raises(ValidationError):  # the schema says the same before any encoder exists
        SparseFeature(name="f", **{name: n})


@pytest.mark.parametrize("name", ["hash_buckets", "vocab_size"])
def test_the_largest_table_keeps_its_ids_in_int32(name: str) -> None:
    enc = CategoricalEncoder(**{name: MAX_TABLE_VALUES})
    assert enc.size == 2**31 - 1  # ids 0 .. 2**31 - 2
    if name == "vocab_size":
        ids, _ = enc.lookup_column(pa.array([MAX_TABLE_VALUES - 1, MAX_TABLE_VALUES], pa.int64()))
        assert ids.tolist() == [2**31 - 2, OOV_ID]
    else:
        ids, _ = enc.lookup(pa.array([str(i) for i in range(2000)]))
        assert ids.min() >= FIRST_ID and ids.max() <= 2**31 - 2


# -- lookup structures: built once per vocabulary, only when worth it -----------------------------
@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the :class:`SortedKeys` the encoder builds."""
    made: list[int] = []

    class Counting(SortedKeys):
        def __init__(self, values: pa.Array) -> None:
            made.append(len(values))
            super().__init__(values)

    monkeypatch.setattr(encoders, "SortedKeys", Counting)
    return made


def _check_lookups(enc: CategoricalEncoder, vocab: list[str], query: list) -> None:
    ref = {v: i + FIRST_ID for i, v in enumerate(vocab)}
    want_ids = [OOV_ID if q is None else ref.get(str(q), OOV_ID) for q in query]
    want_unknown = [q is not None and str(q) not in ref for q in query]
    strings = pa.array([None if q is None else str(q) for q in query], pa.string())
    ints = pa.array(query, pa.int64())
    for ids, unknown in (enc.lookup(strings), enc.lookup_column(ints)):
        assert ids.dtype == np.int32 and unknown.dtype == np.bool_
        assert ids.tolist() == want_ids and unknown.tolist() == want_unknown


def test_large_vocabulary_builds_its_sorted_copies_once_per_vocabulary(builds: list[int]) -> None:
    n = SORTED_LOOKUP_MIN + 76
    # value i seen (i % 3 + 1) times: ties broken by the string order
    train = [str(i) for i in range(n) for _ in range(i % 3 + 1)]
    enc = CategoricalEncoder().fit([pa.array(train, pa.string())])
    vocab = _reference_vocab(Counter(train))
    assert enc.vocab.to_pylist() == vocab
    enc.prepare()
    assert builds == [n, n]  # the string keys and the integer keys
    query = [5, n - 1, None, n + 3, 0, -1]
    for _ in range(3):
        _check_lookups(enc, vocab, query)
    assert builds == [n, n]  # cached: no rebuild per lookup
    # a new vocabulary (refit) is looked up in its own sorted copies, not the old ones
    train2 = [str(i + 7) for i in range(n) for _ in range((i + 1) % 3 + 1)]
    enc.fit([pa.array(train2, pa.string())])
    vocab2 = _reference_vocab(Counter(train2))
    for _ in range(2):
        _check_lookups(enc, vocab2, query)
    assert builds == [n, n, n, n]


def test_small_vocabulary_builds_no_sorted_copy(builds: list[int]) -> None:
    # below SORTED_LOOKUP_MIN values, index_in is as fast: no sorted copy of strings or ints
    vocab = [str(i) for i in range(SORTED_LOOKUP_MIN - 1)]
    enc = CategoricalEncoder(vocab=vocab)
    enc.prepare()
    _check_lookups(enc, vocab, [3, None, 5000, 0])
    assert builds == []


@pytest.mark.parametrize("name", ["hash_buckets", "vocab_size"])
def test_a_one_value_table_is_accepted(name: str) -> None:
    # the smallest table the schema allows (ge=1): one value after the padding and OOV rows
    enc = CategoricalEncoder(**{name: 1})
    assert enc.size == FIRST_ID + 1
    ids, _ = enc.lookup(pa.array(["0", "7"]))
    assert ids.min() >= OOV_ID and ids.max() <= FIRST_ID
