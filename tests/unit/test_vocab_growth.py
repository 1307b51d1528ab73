"""Vocabulary growth for warm starts: old values keep their ids (and their embedding rows bit
for bit), new values join by min_count, max_size drops new values only, deterministically."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtlrec.data.encoders import CategoricalEncoder
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.vocab_growth import (
    grow_preprocessor,
    grow_vocabulary,
    merge_counts,
    read_counts,
    write_counts,
)
from mtlrec.errors import ConfigError
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout, FieldSpec
from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec
from mtlrec.train.remap import Pair, Segment

# tiny days: a constant column or label is expected here
pytestmark = pytest.mark.filterwarnings("ignore::mtlrec.errors.DataWarning")


def _counts(values: list[str]) -> pa.Table:
    c = Counter(values)
    return pa.table({"v": pa.array(list(c), pa.string()), "c": pa.array(list(c.values()))})


def test_new_values_fill_the_free_slots_by_count_then_value() -> None:
    old = pa.array(["x", "y"])
    counts = _counts(["y"] * 9 + ["b"] * 3 + ["a"] * 3 + ["c"] * 5 + ["d"])
    g = grow_vocabulary(old, counts, min_count=2, max_size=4)
    assert g.vocab.to_pylist() == ["x", "y", "c", "a"]  # c (5), then a before b (3 each)
    assert (g.added, g.dropped_by_max_size, g.below_min_count) == (2, 1, 1)


def test_old_values_are_never_dropped_even_over_max_size() -> None:
    old = pa.array(["x", "y", "z"])
    g = grow_vocabulary(old, _counts(["a"] * 10), max_size=2)
    assert g.vocab.to_pylist() == ["x", "y", "z"]
    assert (g.added, g.dropped_by_max_size) == (0, 1)


def test_vanished_values_keep_their_ids() -> None:
    old = pa.array(["x", "y"])
    g = grow_vocabulary(old, _counts(["z", "z"]))
    assert g.vocab.to_pylist() == ["x", "y", "z"]


def _pre(values: list[str], *, min_count: int = 1, max_size: int | None = None) -> Preprocessor:
    schema = Schema(
        features=(
            SparseFeature(name="v", min_count=min_count, max_size=max_size, embedding_dim=2),
            DenseFeature(name="x", transform="standardize"),
        ),
        tasks=(TaskSpec(name="y", kind="binary"),),
    )
    n = len(values)
    table = pa.table({"v": values, "x": np.arange(n, dtype=float), "y": np.arange(n) % 2})
    return Preprocessor.fit(schema, table)


def test_cumulative_counts_admit_a_value_seen_once_a_day() -> None:
    day1 = _pre(["a", "a", "b"], min_count=2)
    assert day1.tables["v"].vocab.to_pylist() == ["a"]  # b once: too rare
    day2 = _pre(["a", "b", "c", "c"], min_count=2)
    kept = {"v": day1.tables["v"].counts}
    new, _ = grow_preprocessor(day1, day2, counts="new", parent_counts=kept)
    cum, rep = grow_preprocessor(day1, day2, counts="cumulative", parent_counts=kept)
    assert new.tables["v"].vocab.to_pylist() == ["a", "c"]  # b: once on day 2
    assert cum.tables["v"].vocab.to_pylist() == ["a", "b", "c"]  # b: 1 + 1, c: 2
    assert rep["v"]["added"] == 2
    # the counts handed on are the sum over both days, whatever the mode
    both = dict(zip(*new.tables["v"].counts.to_pydict().values(), strict=True))
    assert both == {"a": 3, "b": 2, "c": 2}


def test_cumulative_without_kept_counts_is_an_error() -> None:
    with pytest.raises(ConfigError, match="cumulative"):
        grow_preprocessor(_pre(["a"]), _pre(["b"]), counts="cumulative", parent_counts=None)


def test_dense_statistics_kept_or_refit() -> None:
    day1, day2 = _pre(["a", "b"]), _pre(["a", "b", "c", "d"])
    kept, _ = grow_preprocessor(day1, day2, dense="keep")
    refit, _ = grow_preprocessor(day1, day2, dense="refit")
    assert kept.dense["x"].mean == day1.dense["x"].mean != day2.dense["x"].mean
    assert refit.dense["x"].mean == day2.dense["x"].mean


def test_hashed_tables_are_unchanged() -> None:
    schema = Schema(
        features=(SparseFeature(name="v", hash_buckets=7),),
        tasks=(TaskSpec(name="y", kind="binary"),),
    )
    t1 = pa.table({"v": ["a", "b"], "y": [0, 1]})
    t2 = pa.table({"v": ["c", "d", "e"], "y": [0, 1, 1]})
    p1, p2 = Preprocessor.fit(schema, t1), Preprocessor.fit(schema, t2)
    grown, rep = grow_preprocessor(p1, p2)
    assert grown.tables["v"] is p1.tables["v"] and rep["v"]["kind"] == "hashed"


def test_counts_round_trip(tmp_path: Path) -> None:
    counts = {"a": _counts(["x", "x", "y"]), "b": _counts([]), "c": _counts(["é", "z"])}
    write_counts(tmp_path / "c.parquet", counts)
    back = read_counts(tmp_path / "c.parquet")
    for k in ("a", "c"):
        assert dict(zip(*back[k].to_pydict().values(), strict=True)) == dict(
            zip(*counts[k].to_pydict().values(), strict=True)
        )
    assert "b" not in back or back["b"].num_rows == 0


# -- property: a sequence of days ------------------------------------------------------------
_values = st.sampled_from([f"v{i}" for i in range(30)])
_day = st.lists(_values, min_size=1, max_size=40)


def _rows(pre: Preprocessor) -> int:
    return pre.tables["v"].size


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    days=st.lists(_day, min_size=2, max_size=5),
    min_count=st.integers(1, 3),
    max_size=st.one_of(st.none(), st.integers(1, 12)),
    cumulative=st.booleans(),
)
def test_growth_over_days_keeps_every_old_row_bit_for_bit(
    days: list[list[str]], min_count: int, max_size: int | None, cumulative: bool
) -> None:
    """Days with new, repeated and vanished values: every value known on some day keeps its
    id on every later day, and its embedding row (copied by the warm start's remap, table
    offsets included) stays bit for bit; new values join by count then value, within
    max_size, deterministically."""
    torch.manual_seed(0)
    pre = _pre(days[0], min_count=min_count, max_size=max_size)
    kept = {"v": pre.tables["v"].counts}
    # a second table after "v" in the fused weight: its offset moves as "v" grows
    other = torch.randn(5, 2)
    weight = torch.cat([torch.randn(_rows(pre), 2), other])
    seen_counts = Counter(days[0])
    for values in days[1:]:
        seen_counts.update(values)
        fitted = _pre(values, min_count=min_count, max_size=max_size)
        mode = "cumulative" if cumulative else "new"
        grown, rep = grow_preprocessor(pre, fitted, counts=mode, parent_counts=kept)
        again, _ = grow_preprocessor(pre, fitted, counts=mode, parent_counts=kept)
        assert grown.tables["v"].vocab.equals(again.tables["v"].vocab)  # deterministic
        old_vocab = pre.tables["v"].vocab.to_pylist()
        new_vocab = grown.tables["v"].vocab.to_pylist()
        assert new_vocab[: len(old_vocab)] == old_vocab
        assert len(set(new_vocab)) == len(new_vocab)
        if max_size is not None:
            assert len(new_vocab) <= max(len(old_vocab), max_size)
        basis = seen_counts if cumulative else Counter(values)
        added = new_vocab[len(old_vocab) :]
        assert all(basis[v] >= min_count for v in added)
        assert added == sorted(added, key=lambda v: (-basis[v], v))
        # every candidate left out is rarer than, or tied and after, the last one added
        left = [v for v in basis if v not in new_vocab and basis[v] >= min_count]
        assert len(left) == rep["v"]["dropped_by_max_size"]
        if added and left:
            assert (-basis[added[-1]], added[-1]) < min((-basis[v], v) for v in left)
        # ids through the real lookup
        old_ids, _ = pre.tables["v"].lookup(pa.array(old_vocab, pa.string()))
        new_ids, _ = grown.tables["v"].lookup(pa.array(old_vocab, pa.string()))
        assert np.array_equal(old_ids, new_ids)
        # rows: the remap of a fused weight [v rows, then the other table's 5 rows]
        n_old, n_new = _rows(pre), _rows(grown)
        pair = Pair(
            "w",
            "w",
            tuple(weight.shape),
            (Segment("v", 0, 0, n_old), Segment("o", n_old, n_new, 5)),
        )
        fresh = torch.randn(n_new + 5, 2)
        moved = pair.remap(weight, fresh)
        assert torch.equal(moved[old_ids], weight[old_ids])
        assert torch.equal(moved[:n_old], weight[:n_old])
        assert torch.equal(moved[n_new:], other)  # the next table's rows, at its new offset
        assert torch.equal(moved[n_old:n_new], fresh[n_old:n_new])  # new rows: initialised
        weight, pre = moved, grown
        kept = {"v": merge_counts(kept["v"], fitted.tables["v"].counts)}


def test_fused_layout_offsets_move_with_growth() -> None:
    """The remap segments come from the real EmbeddingCollection offsets."""
    from mtlrec.train.remap import _segments

    def coll(a: int, b: int) -> EmbeddingCollection:
        lay = FeatureLayout(
            (FieldSpec("a", "a", 4), FieldSpec("b", "b", 4)),
            (),
            (),
            {"a": a, "b": b},
            {"a": 4, "b": 4},
        )
        return EmbeddingCollection(lay)

    segs = _segments((coll(5, 7), "d4"), (coll(9, 7), "d4"), "w")
    assert [(s.table, s.old, s.new, s.rows) for s in segs] == [("a", 0, 0, 5), ("b", 5, 9, 7)]
    with pytest.raises(Exception, match="fewer"):
        _segments((coll(5, 7), "d4"), (coll(4, 7), "d4"), "w")


def test_encoder_keeps_its_counts_after_fitting() -> None:
    enc = CategoricalEncoder(min_count=2).fit([pa.array(["a", "a", "b"])])
    assert enc.vocab.to_pylist() == ["a"]
    assert sorted(enc.counts.to_pylist(), key=lambda r: r["v"]) == [
        {"v": "a", "c": 2},
        {"v": "b", "c": 1},
    ]
