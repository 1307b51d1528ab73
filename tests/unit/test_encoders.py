"""Tests of mtlrec.data.encoders (and the column conversions in mtlrec.data.columns)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtlrec.batch import FIRST_ID, OOV_ID, PAD_ID
from mtlrec.data.columns import to_category_strings, to_float
from mtlrec.data.encoders import CategoricalEncoder, DenseEncoder, encode_sequence
from mtlrec.data.io import read_table
from mtlrec.errors import DataError
from mtlrec.schema import DenseFeature, SequenceFeature


def vocab_of(enc: CategoricalEncoder) -> list[str]:
    """The fitted vocabulary as a plain list, most frequent first (as saved)."""
    return list(enc.to_dict()["vocab"])


def fitted(values: list, **kw) -> CategoricalEncoder:
    return CategoricalEncoder(**kw).fit([to_category_strings(pa.array(values))])


def ids_of(enc: CategoricalEncoder, values: list, type_: pa.DataType | None = None) -> list[int]:
    ids, _ = enc.encode(to_category_strings(pa.array(values, type_)))
    return ids.tolist()


def blake_id(value: str, buckets: int) -> int:
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets + 2


# -- CategoricalEncoder: vocabulary ---------------------------------------------------------------
def test_special_ids() -> None:
    assert (PAD_ID, OOV_ID, FIRST_ID) == (0, 1, 2)


def test_vocab_order_by_count_desc_then_value() -> None:
    enc = fitted(["b", "a", "d", "b", "c", "a", "b", "c", "e"])
    # counts: b 3, a 2, c 2, d 1, e 1 -> ties broken by value
    assert vocab_of(enc) == ["b", "a", "c", "d", "e"]
    assert ids_of(enc, ["b", "a", "c", "d", "e"]) == [2, 3, 4, 5, 6]
    assert enc.size == 5 + 2


def test_fit_sums_counts_over_arrays_of_a_shared_table() -> None:
    enc = CategoricalEncoder().fit([pa.array(["x", "y"]), pa.array(["y", "z", "z", "z"])])
    assert vocab_of(enc) == ["z", "y", "x"]


def test_min_count_maps_rare_values_to_oov() -> None:
    enc = fitted(["a", "a", "a", "b", "b", "c"], min_count=2)
    assert vocab_of(enc) == ["a", "b"]
    ids, unknown = enc.encode(pa.array(["a", "b", "c", "never"]))
    assert ids.tolist() == [2, 3, OOV_ID, OOV_ID]
    assert unknown == 2


def test_max_size_keeps_most_frequent() -> None:
    enc = fitted(["a", "b", "b", "c", "c", "c", "d", "d", "d", "d"], max_size=2)
    assert vocab_of(enc) == ["d", "c"]
    assert ids_of(enc, ["d", "c", "b", "a"]) == [2, 3, OOV_ID, OOV_ID]
    assert enc.size == 4


def test_nulls_are_oov_and_not_counted_as_unknown() -> None:
    enc = fitted(["a", None, None, "b"])
    assert vocab_of(enc) == ["a", "b"]  # nulls never enter the vocabulary
    ids, unknown = enc.encode(pa.array(["a", None, "zzz", None, "yyy", "b"]))
    assert ids.dtype == np.int32
    assert ids.tolist() == [2, OOV_ID, OOV_ID, OOV_ID, OOV_ID, 3]
    assert unknown == 2


def test_all_null_column_encodes_to_oov() -> None:
    enc = fitted(["a"])
    ids, unknown = enc.encode(to_category_strings(pa.array([None, None], pa.null())))
    assert ids.tolist() == [OOV_ID, OOV_ID]
    assert unknown == 0


def test_to_dict_round_trip() -> None:
    enc = fitted(["a", "b", "b"], min_count=1, max_size=10)
    back = CategoricalEncoder.from_dict(enc.to_dict())
    assert vocab_of(back) == vocab_of(enc)
    assert (back.min_count, back.max_size, back.hash_buckets) == (1, 10, None)
    values = pa.array(["a", "b", "c", None])
    assert back.encode(values)[0].tolist() == enc.encode(values)[0].tolist()


# -- CategoricalEncoder: hashing ------------------------------------------------------------------
def test_hash_ids_match_fixed_values() -> None:
    # fixed expectations: blake2b(digest_size=8), little endian, % 1000, + 2
    enc = CategoricalEncoder(hash_buckets=1000).fit([pa.array(["ignored"])])
    assert vocab_of(enc) == []
    assert ids_of(enc, ["apple", "banana", "42", ""]) == [320, 58, 985, 758]
    assert [blake_id(v, 1000) for v in ["apple", "banana", "42", ""]] == [320, 58, 985, 758]


def test_hash_ids_stable_across_instances_and_in_range() -> None:
    values = [f"v{i}" for i in range(2000)]
    a = CategoricalEncoder(hash_buckets=37)
    b = CategoricalEncoder.from_dict(CategoricalEncoder(hash_buckets=37).to_dict())
    ids_a, unknown = a.encode(pa.array(values))
    ids_b, _ = b.encode(pa.array(values))
    assert ids_a.tolist() == ids_b.tolist() == [blake_id(v, 37) for v in values]
    assert ids_a.min() >= FIRST_ID
    assert ids_a.max() < 37 + FIRST_ID
    assert len(set(ids_a.tolist())) == 37  # 2000 values fill every bucket
    assert unknown == 0
    assert a.size == 39


def test_hash_nulls_are_oov() -> None:
    enc = CategoricalEncoder(hash_buckets=10)
    ids, unknown = enc.encode(pa.array(["a", None]))
    assert ids.tolist() == [blake_id("a", 10), OOV_ID]
    assert unknown == 0


def test_hash_int_and_string_values_agree() -> None:
    enc = CategoricalEncoder(hash_buckets=1000)
    assert ids_of(enc, [42, 7]) == ids_of(enc, ["42", "7"]) == [985, blake_id("7", 1000)]


# -- integral floats ------------------------------------------------------------------------------
def test_integral_floats_map_like_ints() -> None:
    assert to_category_strings(pa.array([1.0, 2.0, None])).to_pylist() == ["1", "2", None]
    enc = fitted([1, 2, 3, 3])
    assert ids_of(enc, [1.0, 3.0, None]) == ids_of(enc, [1, 3, None]) == [3, 2, OOV_ID]
    hashed = CategoricalEncoder(hash_buckets=50)
    assert ids_of(hashed, [1.0, 2.0]) == ids_of(hashed, [1, 2])


def test_csv_float_text_maps_like_int(tmp_path) -> None:
    """ "1.0" in a CSV numeric column is read as a float and maps like the integer 1."""
    p = tmp_path / "x.csv"
    p.write_text("c\n1.0\n2.0\n")
    t = read_table(p)
    enc = fitted([1, 2, 2])
    assert enc.encode(to_category_strings(t.column("c")))[0].tolist() == ids_of(enc, [1, 2])


def test_non_integral_floats_keep_their_text() -> None:
    assert to_category_strings(pa.array([1.5, 2.0])).to_pylist() == ["1.5", "2"]


def test_integral_float_beyond_int64_does_not_crash() -> None:
    out = to_category_strings(pa.array([1.0, 1e20])).to_pylist()
    assert len(out) == 2
    assert out[0] == "1"


# -- sequences ------------------------------------------------------------------------------------
ITEMS = ["a", "b", "c", "d", "e"]  # vocab ids 2..6 when each value is seen once


def seq_encoder() -> CategoricalEncoder:
    enc = fitted(ITEMS)
    assert ids_of(enc, ITEMS) == [2, 3, 4, 5, 6]
    return enc


def test_sequence_separator_split_and_padding() -> None:
    f = SequenceFeature(name="h", max_len=4, separator=";")
    ids, unknown = encode_sequence(seq_encoder(), f, pa.array(["a;b", "c", "e;d;zz"]))
    assert ids.dtype == np.int32
    assert ids.tolist() == [[2, 3, 0, 0], [4, 0, 0, 0], [6, 5, OOV_ID, 0]]
    assert unknown == 1


def test_sequence_multichar_separator_is_literal() -> None:
    f = SequenceFeature(name="h", max_len=3, separator="..")
    ids, _ = encode_sequence(seq_encoder(), f, pa.array(["a..b", "a.b"]))
    assert ids.tolist() == [[2, 3, 0], [OOV_ID, 0, 0]]


def test_sequence_truncate_last_keeps_most_recent() -> None:
    f = SequenceFeature(name="h", max_len=3, truncate="last")
    ids, _ = encode_sequence(seq_encoder(), f, pa.array(["a|b|c|d|e", "a|b"]))
    assert ids.tolist() == [[4, 5, 6], [2, 3, 0]]


def test_sequence_truncate_first_keeps_first() -> None:
    f = SequenceFeature(name="h", max_len=3, truncate="first")
    ids, _ = encode_sequence(seq_encoder(), f, pa.array(["a|b|c|d|e", "a|b"]))
    assert ids.tolist() == [[2, 3, 4], [2, 3, 0]]


def test_sequence_empty_and_null_rows_are_all_padding() -> None:
    f = SequenceFeature(name="h", max_len=3)
    ids, unknown = encode_sequence(seq_encoder(), f, pa.array(["", None, "b", ""]))
    assert ids.tolist() == [[0, 0, 0], [0, 0, 0], [3, 0, 0], [0, 0, 0]]
    assert unknown == 0


def test_sequence_all_empty_column() -> None:
    f = SequenceFeature(name="h", max_len=2)
    for col in (pa.array(["", ""]), pa.array([None, None], pa.null())):
        ids, unknown = encode_sequence(seq_encoder(), f, col)
        assert ids.tolist() == [[0, 0], [0, 0]]
        assert unknown == 0


def test_sequence_of_integers_in_csv_form() -> None:
    enc = fitted([10, 20, 30])
    f = SequenceFeature(name="h", max_len=3)
    ids, _ = encode_sequence(enc, f, pa.array(["10|30", "20", "40|10"]))
    assert ids.tolist() == [[2, 4, 0], [3, 0, 0], [OOV_ID, 2, 0]]
    # a column holding only single ids may be parsed as integers
    ids, _ = encode_sequence(enc, f, pa.array([30, 10]))
    assert ids.tolist() == [[4, 0, 0], [2, 0, 0]]


def test_sequence_chunked_and_sliced_columns() -> None:
    f = SequenceFeature(name="h", max_len=2, truncate="first")
    enc = seq_encoder()
    chunked = pa.chunked_array([pa.array(["a|b"]), pa.array(["c", None, "d|e|a"])])
    assert encode_sequence(enc, f, chunked)[0].tolist() == [[2, 3], [4, 0], [0, 0], [5, 6]]
    lists = pa.array([["a"], ["b", "c"], ["d"]]).slice(1)
    assert encode_sequence(enc, f, lists)[0].tolist() == [[3, 4], [5, 0]]


def test_parquet_list_column_matches_csv_string_form(tmp_path) -> None:
    rows = [["a", "b", "c", "d"], [], None, ["e"], ["zz", "a"], ["c", "c", "c"]]
    csv_text = ["a|b|c|d", "", "", "e", "zz|a", "c|c|c"]
    pq.write_table(
        pa.table({"hist": pa.array(rows, pa.list_(pa.string()))}), tmp_path / "s.parquet"
    )
    (tmp_path / "s.csv").write_text("hist,k\n" + "".join(f"{v},1\n" for v in csv_text))
    from_pq = read_table(tmp_path / "s.parquet")
    from_csv = read_table(tmp_path / "s.csv", string_columns=["hist"])
    expected = {
        "last": [[3, 4, 5], [0, 0, 0], [0, 0, 0], [6, 0, 0], [1, 2, 0], [4, 4, 4]],
        "first": [[2, 3, 4], [0, 0, 0], [0, 0, 0], [6, 0, 0], [1, 2, 0], [4, 4, 4]],
    }
    enc = seq_encoder()
    for trunc, want in expected.items():
        f = SequenceFeature(name="hist", max_len=3, truncate=trunc)
        a, unk_a = encode_sequence(enc, f, from_pq.column("hist"))
        b, unk_b = encode_sequence(enc, f, from_csv.column("hist"))
        assert a.tolist() == b.tolist() == want
        assert unk_a == unk_b == 1


# -- DenseEncoder ---------------------------------------------------------------------------------
def dense(values: list, **kw) -> list[float]:
    enc = DenseEncoder(**kw).fit(pa.array(values, pa.float64()), file="f", name="x")
    return enc.encode(pa.array(values, pa.float64()), file="f", name="x").tolist()


def test_dense_fill_value() -> None:
    assert dense([1.0, None, 3.0], fill_value=5.0) == [1.0, 5.0, 3.0]
    assert dense([None, 2.0]) == [0.0, 2.0]


def test_dense_for_feature_takes_fill_and_transform() -> None:
    enc = DenseEncoder.for_feature(DenseFeature(name="p", fill_value=2.5, transform="log1p"))
    assert (enc.fill_value, enc.transform) == (2.5, "log1p")


def test_dense_log1p_after_fill() -> None:
    out = dense([0.0, math.e - 1.0, None], fill_value=math.e**2 - 1.0, transform="log1p")
    assert out == pytest.approx([0.0, 1.0, 2.0], abs=1e-6)


def test_dense_accepts_integer_boolean_and_numeric_text() -> None:
    enc = DenseEncoder()
    assert enc.encode(pa.array([1, 2]), file="f", name="x").tolist() == [1.0, 2.0]
    assert enc.encode(pa.array([True, False]), file="f", name="x").tolist() == [1.0, 0.0]
    got = enc.encode(pa.array([" 1.5", "2 ", None]), file="f", name="x").tolist()
    assert got == [1.5, 2.0, 0.0]


def test_dense_output_is_float32() -> None:
    out = DenseEncoder().encode(pa.array([1.0]), file="f", name="x")
    assert out.dtype == np.float32


def test_standardize_uses_training_statistics_only() -> None:
    enc = DenseEncoder(transform="standardize").fit(
        pa.array([1.0, 2.0, 3.0]), file="train", name="x"
    )
    mean, std = 2.0, math.sqrt(2.0 / 3.0)
    assert enc.mean == pytest.approx(mean)
    assert enc.std == pytest.approx(std)
    other = enc.encode(pa.array([4.0, 10.0, None]), file="valid", name="x")
    assert other.tolist() == pytest.approx([(4 - mean) / std, (10 - mean) / std, (0 - mean) / std])
    # encoding does not refit
    assert (enc.mean, enc.std) == (pytest.approx(mean), pytest.approx(std))
    back = DenseEncoder.from_dict(enc.to_dict())
    assert back.encode(pa.array([4.0]), file="v", name="x").tolist() == pytest.approx(
        [(4 - mean) / std]
    )


def test_log1p_standardize_statistics_are_of_log_values() -> None:
    values = [0.0, 9.0, 99.0]
    enc = DenseEncoder(transform="log1p_standardize").fit(pa.array(values), file="f", name="x")
    logs = np.log1p(values)
    assert enc.mean == pytest.approx(logs.mean())
    assert enc.std == pytest.approx(logs.std())
    out = enc.encode(pa.array([999.0]), file="f", name="x")
    assert out.tolist() == pytest.approx([(math.log(1000.0) - logs.mean()) / logs.std()], rel=1e-6)


def test_standardize_constant_column_keeps_values_finite() -> None:
    enc = DenseEncoder(transform="standardize").fit(pa.array([3.0, 3.0]), file="f", name="x")
    assert enc.std == 1.0
    assert enc.encode(pa.array([3.0, 4.0]), file="f", name="x").tolist() == [0.0, 1.0]


def test_dense_non_numeric_string_names_column_and_row() -> None:
    with pytest.raises(DataError, match=r"expected a number, found 'abc'") as info:
        DenseEncoder().encode(pa.array(["1", None, "2", "abc", "x"]), file="d.csv", name="price")
    e = info.value
    assert (e.file, e.column, e.row) == ("d.csv", "price", 4)
    assert str(e).startswith("file d.csv, column 'price', data row 4:")


def test_dense_non_numeric_in_csv_file_reports_data_row(tmp_path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("price,k\n1.5,a\n2,b\n3,c\nn/a!,d\n")
    t = read_table(p)
    with pytest.raises(DataError) as info:
        DenseEncoder().fit(t.column("price"), file=str(p), name="price")
    assert info.value.row == 4
    assert info.value.column == "price"
    assert str(p) in str(info.value)


def test_dense_blank_text_is_missing_or_names_row() -> None:
    try:
        out = DenseEncoder(fill_value=7.0).encode(pa.array(["1", "  ", "3"]), file="f", name="x")
    except DataError as e:
        assert e.row == 2
    else:
        assert out.tolist() == [1.0, 7.0, 3.0]


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_dense_infinity_rejected_with_row(bad: float) -> None:
    with pytest.raises(DataError, match="infinity") as info:
        DenseEncoder().encode(pa.array([1.0, 2.0, bad]), file="f", name="x")
    assert (info.value.column, info.value.row) == ("x", 3)


def test_dense_infinity_rejected_in_fit() -> None:
    with pytest.raises(DataError, match="infinity") as info:
        DenseEncoder(transform="standardize").fit(pa.array([math.inf]), file="f", name="x")
    assert info.value.row == 1


@pytest.mark.parametrize(("values", "row"), [([0.0, -1.0], 2), ([-2.0], 1), ([5.0, 1.0, -1.5], 3)])
def test_log1p_of_value_at_most_minus_one_rejected(values: list[float], row: int) -> None:
    with pytest.raises(DataError, match="log1p needs values > -1") as info:
        DenseEncoder(transform="log1p").encode(pa.array(values), file="f", name="x")
    assert (info.value.column, info.value.row) == ("x", row)


def test_log1p_of_fill_value_at_most_minus_one_rejected() -> None:
    with pytest.raises(DataError, match="log1p") as info:
        DenseEncoder(transform="log1p", fill_value=-1.0).encode(
            pa.array([0.0, None]), file="f", name="x"
        )
    assert info.value.row == 2


def test_log1p_just_above_minus_one_accepted() -> None:
    out = DenseEncoder(transform="log1p").encode(pa.array([-0.5]), file="f", name="x")
    assert out.tolist() == pytest.approx([math.log(0.5)])


def test_log1p_error_message_shows_plain_value() -> None:
    with pytest.raises(DataError) as info:
        DenseEncoder(transform="log1p").encode(pa.array([-2.0]), file="f", name="x")
    assert "np.float64" not in str(info.value)
    assert "-2.0" in str(info.value)


def test_to_float_rejects_non_numeric_types() -> None:
    with pytest.raises(DataError, match="expected numbers") as info:
        to_float(pa.array([[1.0]]), file="f", column="c")
    assert info.value.column == "c"
    assert np.isnan(to_float(pa.array([None, None], pa.null()), file="f", column="c")).all()


# -- the integer fast path (lookup_column) gives exactly the ids of the string path ----------
_TRICKY_VOCAB = [
    "5",
    "007",
    "-0",
    "abc",
    "-12",
    "0",
    "3.0",
    " 7",
    "+8",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "123456789012345678",
]


@pytest.mark.parametrize(
    "column",
    [
        pa.array([5, 7, 0, -12, None, 3, 8, 2**63 - 1, -(2**63), 123456789012345678], pa.int64()),
        pa.array([5, 0, -12, None], pa.int8()),
        pa.array([5, 0, 250, 7], pa.uint8()),
        pa.array([5, 2**64 - 1, None], pa.uint64()),
        pa.array([5.0, 7.0, None, -12.0, 3.0]),
        pa.array([5.5, 0.0]),
        pa.array([5, 0, None], pa.int32()).dictionary_encode(),
        pa.chunked_array([pa.array([5, 0]), pa.array([-12, None])]),
    ],
)
def test_integer_lookup_matches_string_lookup(column) -> None:
    enc = CategoricalEncoder(vocab=_TRICKY_VOCAB)
    fast_ids, fast_unknown = enc.lookup_column(column)
    ids, unknown = enc.lookup(to_category_strings(column))
    assert fast_ids.dtype == np.int32
    assert fast_ids.tolist() == ids.tolist()
    assert fast_unknown.tolist() == unknown.tolist()


def test_integer_lookup_follows_a_refit_vocabulary() -> None:
    enc = fitted([1, 1, 2])
    assert enc.lookup_column(pa.array([2, 1]))[0].tolist() == [FIRST_ID + 1, FIRST_ID]
    enc.fit([to_category_strings(pa.array([2, 2, 1]))])  # a new vocabulary: the cache follows
    assert enc.lookup_column(pa.array([2, 1]))[0].tolist() == [FIRST_ID, FIRST_ID + 1]


def test_integer_sequences_match_their_string_form() -> None:
    enc = fitted([str(v) for v in [1, 2, 3, 3, 40]])
    f = SequenceFeature(name="h", max_len=3)
    ints = pa.array([[1, 2, 3, 40], [3, None, 99], [], None, [2, 1, 3]], pa.list_(pa.int64()))
    strs = pa.array(
        [
            [str(v) if v is not None else None for v in r] if r is not None else None
            for r in ints.to_pylist()
        ],
        pa.list_(pa.string()),
    )
    for truncate in ("first", "last"):
        g = SequenceFeature(name="h", max_len=3, truncate=truncate)
        a, ua = encode_sequence(enc, g, ints)
        b, ub = encode_sequence(enc, g, strs)
        assert a.tolist() == b.tolist() and ua == ub
    full = pa.array([[1, 2, 3], [40, 3, 2]], pa.list_(pa.int64()))  # the all-full fast path
    assert encode_sequence(enc, f, full)[0].tolist() == [
        [int(i) for i in enc.lookup(pa.array(["1", "2", "3"]))[0]],
        [int(i) for i in enc.lookup(pa.array(["40", "3", "2"]))[0]],
    ]
