"""Tests that kill the mutants of ``mtlrec.data.encoders`` the rest of the suite let live
(``python benchmarks/mutation.py data-encoders``), part two: the empty count table of an encoder
finalised without data, behaviour sequences against a plain Python reference (custom null
tokens, the row named by an element's error, empty columns, unknown ids per row), and
:class:`DenseEncoder` against numpy over the concatenated data (streaming moments over chunks of
different sizes, the ``rows`` mask, :attr:`DenseEncoder.seen`, a refit, ``finalize`` without
data or with one value, the strict ``1e-12`` floor) and its exact error messages."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from mtlrec.batch import FIRST_ID, OOV_ID, PAD_ID
from mtlrec.data.encoders import CategoricalEncoder, DenseEncoder, encode_sequence, sequence_ids
from mtlrec.errors import DataError
from mtlrec.schema import SequenceFeature

ITEMS = ["a", "b", "c", "d", "e"]  # a loaded vocabulary: ids FIRST_ID.. in this order
# float64 streaming moments agree with numpy's one-shot ones far below this; compared with
# math.isclose (relative only: values of scale 1e-9 must not pass on an absolute floor)
REL = 1e-12


# -- _merge_counts of no chunks: finalize without training data -------------------------------
@pytest.mark.parametrize("how", ["finalize", "fit_no_arrays"])
def test_finalize_without_data_gives_empty_typed_counts_and_vocab(how: str) -> None:
    enc = CategoricalEncoder()
    enc = enc.finalize() if how == "finalize" else enc.fit([])
    # the same table layout as counts of real data: values as strings, counts as int64
    reference = CategoricalEncoder().fit([pa.array(["x", "y", "x"])]).counts
    assert reference is not None and enc.counts is not None
    assert enc.counts.schema == reference.schema
    assert enc.counts.schema.names == ["v", "c"]
    assert enc.counts.num_rows == 0
    assert len(enc.vocab) == 0 and enc.vocab.type == pa.string()
    ids, unknown = enc.lookup(pa.array(["x", None]))
    assert ids.tolist() == [OOV_ID, OOV_ID]
    assert unknown.tolist() == [True, False]  # a null is missing, not unknown


# -- sequences: a plain Python reference --------------------------------------------------------
def _reference(
    rows: list[str | None],
    max_len: int,
    truncate: str,
    null_values: tuple[str, ...],
    sep: str = "|",
) -> tuple[list[list[int]], list[int]]:
    """Padded ids and unknown ids per row, by a loop: split, drop empty elements and null
    tokens, look up (OOV for values not in ``ITEMS``), keep the last or first ``max_len``."""
    vocab = {v: FIRST_ID + i for i, v in enumerate(ITEMS)}
    out, unknown = [], []
    for text in rows:
        elems = [] if not text else [e for e in text.split(sep) if e and e not in null_values]
        ids = [vocab.get(e, OOV_ID) for e in elems]
        unknown.append(sum(e not in vocab for e in elems))
        ids = ids[-max_len:] if truncate == "last" else ids[:max_len]
        out.append(ids + [PAD_ID] * (max_len - len(ids)))
    return out, unknown


SEQ_CASES = [
    # custom null tokens: "-" is missing, "NA" (a default token) is a value (unknown)
    (["a|-|b", "-", "NA|c", "e|zz|-|d|NA"], 3, "last", ("-",)),
    (["a|-|b", "-", "NA|c", "e|zz|-|d|NA"], 2, "first", ("-",)),
    # unknown ids only in the first row: the per-row counts still cover every row
    (["zz|a|yy", "b", "c|d", ""], 2, "last", ("NA",)),
    (["zz|a|yy", "b", "c|d", ""], 4, "first", ("NA",)),
]


@pytest.mark.parametrize(("rows", "max_len", "truncate", "null_values"), SEQ_CASES)
def test_sequence_ids_match_plain_loop(
    rows: list[str | None], max_len: int, truncate: str, null_values: tuple[str, ...]
) -> None:
    enc = CategoricalEncoder(vocab=ITEMS)
    f = SequenceFeature(name="h", max_len=max_len, truncate=truncate)
    want, want_unknown = _reference(rows, max_len, truncate, null_values)
    ids, unknown = sequence_ids(enc, f, pa.array(rows), null_values)
    assert ids.dtype == np.int32 and ids.tolist() == want
    assert unknown.shape == (len(rows),) and unknown.tolist() == want_unknown
    ids2, total = encode_sequence(enc, f, pa.array(rows), null_values)
    assert ids2.tolist() == want and total == sum(want_unknown)


@pytest.mark.parametrize(
    "column",
    [pa.array([], pa.string()), pa.array([], pa.list_(pa.string())), pa.array([], pa.int64())],
)
def test_sequence_of_empty_column_is_zero_rows(column: pa.Array) -> None:
    f = SequenceFeature(name="h", max_len=3)
    ids, unknown = sequence_ids(CategoricalEncoder(vocab=ITEMS), f, column)
    assert ids.shape == (0, 3) and ids.dtype == np.int32
    assert unknown.shape == (0,)
    assert encode_sequence(CategoricalEncoder(vocab=ITEMS), f, column)[1] == 0


@pytest.mark.parametrize(
    "rows", [["1", "x"], ["x|1", "2"], ["1|2", "", "3|4|y"], ["5", "6|7", "8|z|9"]]
)
def test_sequence_error_names_the_row_of_the_bad_element(rows: list[str]) -> None:
    # a pre-indexed feature's non-integer element: the error names its row (1-based), found
    # here by a loop over the rows, not the element's place in the flattened list
    row, bad = next(
        (i + 1, e) for i, text in enumerate(rows) for e in text.split("|") if e and not e.isdigit()
    )
    enc = CategoricalEncoder(vocab_size=10)
    f = SequenceFeature(name="h", max_len=2)
    with pytest.raises(DataError) as info:
        sequence_ids(enc, f, pa.array(rows), file="s.csv")
    assert info.value.row == row
    assert str(info.value) == (
        f"file s.csv, column 'h', data row {row}: expected an integer id in [0, 10) "
        f"(the feature is pre-indexed: vocab_size), found {bad!r}"
    )


# -- DenseEncoder: defaults, seen, streaming moments ---------------------------------------------
def _col(values: list[float | None] | np.ndarray) -> pa.Array:
    return pa.array(values, pa.float64())


def test_dense_defaults_are_the_identity() -> None:
    # documented defaults: no transform, standardisation constants mean 0 and std 1
    assert DenseEncoder().to_dict() == {
        "fill_value": 0.0,
        "transform": "none",
        "mean": 0.0,
        "std": 1.0,
    }
    x = [1.5, -2.0, None]
    for transform in ("none", "standardize"):  # unfitted: (x - 0) / 1 is x
        out = DenseEncoder(transform=transform).encode(_col(x), file="f", name="x")
        assert out.tolist() == [1.5, -2.0, 0.0]


def test_dense_seen_counts_rows_present_values_and_range() -> None:
    enc = DenseEncoder(fill_value=-7.0)
    assert enc.seen == (0, 0, math.inf, -math.inf)
    chunks = [[-3.0, None, -1.0], [None], [-2.5, -4.0, None, -0.5]]
    masks = [None, None, np.array([True, False, True, True])]
    kept: list[float | None] = []
    for c, m in zip(chunks, masks, strict=True):
        enc.partial_fit(_col(c), file="f", name="x", rows=m)
        kept += c if m is None else [v for v, k in zip(c, m, strict=True) if k]
    filled = np.array([-7.0 if v is None else v for v in kept])
    present = sum(v is not None for v in kept)
    assert enc.seen == (len(kept), present, float(filled.min()), float(filled.max()))
    assert enc.seen == (7, 4, -7.0, -0.5)


@pytest.mark.parametrize("transform", ["standardize", "log1p_standardize"])
@pytest.mark.parametrize("scale", [1.0, 1e-9])
def test_streaming_moments_equal_one_shot_numpy(transform: str, scale: float) -> None:
    # chunks of sizes 3, 1, 0 (all rows masked out), 5 and 2 with different means; the
    # reference is numpy's mean and population std of all counted values at once
    rng = np.random.default_rng(3)
    sizes, offsets = [3, 1, 4, 5, 2], [2.0, 9.0, 0.0, 0.5, 5.0]
    chunks = [scale * (o + rng.random(s)) for s, o in zip(sizes, offsets, strict=True)]
    masks: list[np.ndarray | None] = [None, None, np.zeros(4, bool), None, None]
    enc = DenseEncoder(transform=transform)
    for c, m in zip(chunks, masks, strict=True):
        enc.partial_fit(_col(c), file="f", name="x", rows=m)
    enc.finalize()
    counted = np.concatenate([c for c, m in zip(chunks, masks, strict=True) if m is None])
    if transform.startswith("log1p"):
        counted = np.log1p(counted)
    assert math.isclose(enc.mean, float(np.mean(counted)), rel_tol=REL)
    assert math.isclose(enc.std, float(np.std(counted)), rel_tol=REL)


def test_rows_mask_counts_only_the_selected_rows() -> None:
    x = np.array([1.0, 10.0, 2.0, 30.0, 4.0])
    mask = np.array([True, False, True, False, True])
    enc = DenseEncoder(transform="standardize")
    enc.partial_fit(_col(x), file="f", name="x", rows=mask).finalize()
    assert math.isclose(enc.mean, float(np.mean(x[mask])), rel_tol=REL)
    assert math.isclose(enc.std, float(np.std(x[mask])), rel_tol=REL)
    assert enc.seen == (3, 3, 1.0, 4.0)


def test_refit_starts_from_fresh_moments() -> None:
    a = np.array([100.0, 300.0, 250.0])
    b = 1e-9 * np.array([1.0, 2.0, 4.0, 7.0])
    enc = DenseEncoder(transform="standardize")
    enc.fit(_col(a), file="f", name="x")
    enc.fit(_col(b), file="f", name="x")  # finalize reset the running moments
    assert math.isclose(enc.mean, float(np.mean(b)), rel_tol=REL)
    assert math.isclose(enc.std, float(np.std(b)), rel_tol=REL)


# -- DenseEncoder.finalize -------------------------------------------------------------------------
@pytest.mark.parametrize("transform", ["none", "log1p"])
def test_finalize_without_standardize_keeps_constants(transform: str) -> None:
    enc = DenseEncoder(transform=transform).fit(_col([1.0, 5.0, 9.0]), file="f", name="x")
    assert (enc.mean, enc.std) == (0.0, 1.0)


def test_finalize_standardize_without_data_keeps_constants() -> None:
    enc = DenseEncoder(transform="standardize", mean=2.0, std=3.0).finalize()
    assert (enc.mean, enc.std) == (2.0, 3.0)


def test_finalize_standardize_of_one_value() -> None:
    # one training value: its mean is the value, its std 0 -> the fallback 1
    enc = DenseEncoder(transform="standardize").fit(_col([5.0]), file="f", name="x")
    assert (enc.mean, enc.std) == (5.0, 1.0)
    assert enc.encode(_col([5.0, 7.0]), file="f", name="x").tolist() == [0.0, 2.0]


@pytest.mark.parametrize(("half_spread", "want_std"), [(1e-12, 1.0), (2e-12, 2e-12)])
def test_std_floor_is_strict(half_spread: float, want_std: float) -> None:
    # values -h, h: mean 0, population std exactly h (sqrt of a rounded square is exact);
    # a std of at most 1e-12 counts as constant and is replaced by 1
    x = np.array([-half_spread, half_spread])
    assert float(np.std(x)) == half_spread
    enc = DenseEncoder(transform="standardize").fit(_col(x), file="f", name="x")
    assert enc.std == want_std


# -- DenseEncoder errors: exact messages ---------------------------------------------------------
@pytest.mark.parametrize(
    ("transform", "values", "row", "message"),
    [
        ("none", [1.0, math.inf], 2, "expected a finite number, found infinity"),
        ("log1p", [0.5, -1.0, 3.0], 2, "log1p needs values > -1, found -1.0"),
        ("log1p_standardize", [0.5, 2.0, -3.5], 3, "log1p needs values > -1, found -3.5"),
    ],
)
@pytest.mark.parametrize("call", ["encode", "partial_fit"])
def test_dense_errors_name_file_column_row(
    transform: str, values: list[float], row: int, message: str, call: str
) -> None:
    enc = DenseEncoder(transform=transform)
    with pytest.raises(DataError) as info:
        getattr(enc, call)(_col(values), file="d.csv", name="price")
    e = info.value
    assert (e.file, e.column, e.row, e.detail) == ("d.csv", "price", row, message)
    assert str(e) == f"file d.csv, column 'price', data row {row}: {message}"
