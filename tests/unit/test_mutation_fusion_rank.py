"""Tests that kill the mutants of ``mtlrec.fusion.rank`` and ``mtlrec.fusion.formulas`` the rest
of the suite let live (``python benchmarks/mutation.py fusion``), each against an independent
computation: per-group ranks, percentiles and buckets against a plain loop over the rows (ties
sharing the smallest rank, one-row groups, unsorted group ids, ties at the bottom of the first
group), their dtypes and shapes (empty and column inputs), the bucket-count check, and every
fusion formula against numpy written from its docstring (the transforms of the weighted sum, the
clipped base of the weighted product, the default factor of the extended product, the bucket
count of rank fusion, the saturation of the product scores at ``exp(+-700)``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from mtlrec.fusion.formulas import (
    ExtendedParams,
    ExtendedProduct,
    ProductParams,
    RankFusion,
    RankParams,
    SumParams,
    WeightedProduct,
    WeightedSum,
)
from mtlrec.fusion.rank import group_buckets, group_percentiles, group_ranks

EPS = 1e-7  # the documented floor of a product's base and of the log / logit transforms


# -- per-group ranks: a plain loop over the rows ------------------------------------------------
def _ref_ranks(scores: list[float], groups: list | None) -> tuple[list[int], list[int]]:
    """For each row: how many rows of its group score strictly lower (ties share the smallest
    rank, scipy's ``rankdata(method="min") - 1``), and the group's size."""
    n = len(scores)
    g = [0] * n if groups is None else list(groups)
    below = [sum(1 for j in range(n) if g[j] == g[i] and scores[j] < scores[i]) for i in range(n)]
    size = [sum(1 for j in range(n) if g[j] == g[i]) for i in range(n)]
    return below, size


_rng = np.random.default_rng(7)
RANK_CASES: dict[str, tuple[list[float], list | None]] = {
    # a tie block at the very bottom of the first (only) group
    "bottom_tie": ([0.2, 0.2, 0.5, 0.2], None),
    "all_equal": ([1.0, 1.0, 1.0], None),
    # unsorted group ids, one-row groups (7 and 2), ties inside and across groups
    "unsorted_groups": (
        [0.5, 0.1, 0.5, 0.9, 0.1, 0.2, 0.4, 0.1],
        [3, 1, 3, 7, 1, 3, 2, 1],
    ),
    "string_groups": ([0.3, 0.3, 0.8, 0.1, 0.3], ["b", "a", "b", "b", "a"]),
    "random_ties": (
        [float(v) for v in _rng.integers(0, 4, 40)],
        [int(v) for v in _rng.integers(0, 6, 40)],
    ),
}


@pytest.mark.parametrize("case", sorted(RANK_CASES))
def test_group_ranks_match_a_loop_over_the_rows(case: str) -> None:
    scores, groups = RANK_CASES[case]
    below, size = group_ranks(np.array(scores), None if groups is None else np.array(groups))
    ref_below, ref_size = _ref_ranks(scores, groups)
    assert below.dtype == np.int64 and size.dtype == np.int64  # documented: both int64
    assert below.shape == size.shape == (len(scores),)
    assert below.tolist() == ref_below
    assert size.tolist() == ref_size


@pytest.mark.parametrize("case", sorted(RANK_CASES))
@pytest.mark.parametrize("buckets", [None, 1, 3, 4])
def test_percentiles_and_buckets_match_a_loop_over_the_rows(case: str, buckets: int | None) -> None:
    """Percentile = below / size; bucket = floor(below * buckets / size) / buckets (exact integer
    floor, Python ``//``); None buckets = the raw percentile; one bucket = everything in 0."""
    scores, groups = RANK_CASES[case]
    g = None if groups is None else np.array(groups)
    ref_below, ref_size = _ref_ranks(scores, groups)
    pct = [b / s for b, s in zip(ref_below, ref_size, strict=True)]
    np.testing.assert_allclose(group_percentiles(np.array(scores), g), pct, rtol=0, atol=1e-15)
    got = group_buckets(np.array(scores), g, buckets)
    if buckets is None:
        ref = pct
    else:
        ref = [(b * buckets // s) / buckets for b, s in zip(ref_below, ref_size, strict=True)]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-15)
    assert ((got >= 0) & (got < 1)).all()


def test_column_inputs_rank_like_flat_ones() -> None:
    """``[N, 1]`` scores and groups (a column of a frame) are flattened to ``[N]``."""
    scores, groups = RANK_CASES["unsorted_groups"]
    ref_below, ref_size = _ref_ranks(scores, groups)
    below, size = group_ranks(np.array(scores)[:, None], np.array(groups)[:, None])
    assert below.tolist() == ref_below and size.tolist() == ref_size
    below, size = group_ranks(np.array(scores)[:, None])
    assert below.tolist() == _ref_ranks(scores, None)[0]


def test_numeric_text_scores_are_ranked_by_value() -> None:
    """Scores are read as float64: "10" ranks above "9" (as text it would sort below)."""
    below, size = group_ranks(np.array(["10", "9", "100", "9.5"]))
    assert below.tolist() == [2, 0, 3, 1]
    assert size.tolist() == [4, 4, 4, 4]


def test_empty_input_gives_empty_int64_ranks() -> None:
    below, size = group_ranks(np.zeros(0), np.zeros(0, dtype=np.int64))
    for a in (below, size):
        assert a.shape == (0,) and a.dtype == np.int64
    assert group_buckets(np.zeros(0), None, 10).shape == (0,)


def test_bucket_count_below_one_is_rejected_one_is_accepted() -> None:
    scores = np.array([0.4, 0.1, 0.9])
    np.testing.assert_array_equal(group_buckets(scores, None, 1), [0.0, 0.0, 0.0])
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"buckets must be >= 1, got {bad}"):
            group_buckets(scores, None, bad)


# -- formulas: numpy from each docstring ---------------------------------------------------------
def test_a_formula_without_tasks_is_rejected_with_its_message() -> None:
    with pytest.raises(ValidationError, match="weights must name at least one task"):
        SumParams(weights={})
    with pytest.raises(ValidationError, match="exponents must name at least one task"):
        ProductParams(exponents={})


P_A = np.array([0.0, 0.03, 0.5, 0.97, 1.0])
P_B = np.array([0.2, 0.6, 1e-9, 0.45, 0.999])


@pytest.mark.parametrize("transform", ["identity", "log", "logit"])
def test_weighted_sum_applies_its_transform(transform: str) -> None:
    """``sum_i w_i * f(p_i)``: log of p clipped at 1e-7, logit of p clipped to [1e-7, 1 - 1e-7]."""

    def f(p: np.ndarray) -> np.ndarray:
        if transform == "log":
            return np.log(np.maximum(p, EPS))
        if transform == "logit":
            q = np.minimum(np.maximum(p, EPS), 1 - EPS)
            return np.log(q / (1 - q))
        return p

    fusion = WeightedSum(SumParams(weights={"a": 1.5, "b": 0.25}, transform=transform))
    ref = 1.5 * f(P_A) + 0.25 * f(P_B)
    np.testing.assert_allclose(fusion({"a": P_A, "b": P_B}), ref, rtol=1e-9, atol=1e-9)


def test_weighted_product_matches_its_formula_with_the_base_clipped() -> None:
    """``prod_i max(a_i + p_i, 1e-7) ** b_i``: a zero score with no offset has base 1e-7."""
    fusion = WeightedProduct(
        ProductParams(exponents={"a": 1.0, "b": 2.0}, offsets={"b": 0.5}),
    )
    ref = np.maximum(P_A, EPS) ** 1.0 * np.maximum(0.5 + P_B, EPS) ** 2.0
    got = fusion({"a": P_A, "b": P_B})
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    assert got[0] == pytest.approx(EPS * 0.7**2, rel=1e-9)


def _ext_ref(p: dict[str, np.ndarray], b: dict, d: dict, c: dict, f: dict) -> np.ndarray:
    """``prod_i (1 + c_i * max(p_i, f_i)) ** (b_i + d_i * p_i)``; c defaults to 1, f to 0."""
    out = np.ones(len(next(iter(p.values()))))
    for t, pt in p.items():
        base = 1.0 + c.get(t, 1.0) * np.maximum(pt, f.get(t, 0.0))
        out = out * base ** (b[t] + d.get(t, 0.0) * pt)
    return out


@pytest.mark.parametrize(
    ("factors", "floors"),
    [({}, {}), ({"a": 3.0}, {"b": 0.3})],
)
def test_extended_product_matches_its_formula(factors: dict, floors: dict) -> None:
    b, d = {"a": 1.0, "b": 2.0}, {"a": 0.5, "b": 1.5}
    fusion = ExtendedProduct(ExtendedParams(exponents=b, slopes=d, factors=factors, floors=floors))
    p = {"a": P_A, "b": P_B}
    np.testing.assert_allclose(fusion(p), _ext_ref(p, b, d, factors, floors), rtol=1e-9)


# Rows whose log-score is far below -700, in range, and far above +700.
def _saturating_cases() -> list[tuple[str, object, dict, np.ndarray]]:
    pw = {"a": np.array([1e-3, 0.5, 0.5])}
    wp = WeightedProduct(ProductParams(exponents={"a": 200.0}, offsets={"a": 0.0}))
    wp_ref = 200.0 * np.log(pw["a"])  # -1381.6, -138.6, -138.6
    wp_hi = WeightedProduct(ProductParams(exponents={"a": 100.0}, offsets={"a": 1e6}))
    wp_hi_ref = 100.0 * np.log(1e6 + pw["a"])  # about +1381.6
    pe = {"a": np.array([0.9, 0.2, 0.9])}
    ext_lo = ExtendedProduct(ExtendedParams(exponents={"a": -2000.0}))
    ext_hi = ExtendedProduct(ExtendedParams(exponents={"a": 2000.0}))
    ext_ref = 2000.0 * np.log1p(pe["a"])  # 1283.7, 364.6, 1283.7
    return [
        ("product_low", wp, pw, wp_ref),
        ("product_high", wp_hi, pw, wp_hi_ref),
        ("extended_low", ext_lo, pe, -ext_ref),
        ("extended_high", ext_hi, pe, ext_ref),
    ]


@pytest.mark.parametrize("case", _saturating_cases(), ids=lambda c: c[0])
def test_product_scores_saturate_at_exp_700(case: tuple) -> None:
    """The log-score is clipped to [-700, 700] before ``exp`` so every score is a positive
    finite float64 (exp underflows to 0 below about -745 and overflows to inf above 709.8):
    a row past the clip gets exactly ``exp(+-700)``, rows inside it their formula's value."""
    _, fusion, probs, log_ref = case
    assert (np.abs(log_ref) > 701).any()  # the case does reach past the clip
    got = fusion(probs)
    assert np.isfinite(got).all() and (got > 0).all()
    ref = np.exp(np.clip(log_ref, -700.0, 700.0))
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    edge = got[np.abs(log_ref) > 700]
    assert set(edge.tolist()) <= {math.exp(-700.0), math.exp(700.0)}


def test_rank_fusion_cuts_percentiles_into_its_bucket_count() -> None:
    """``sum_i w_i * bucket_i`` with ``buckets=4``: in a list of 10 rows the row with k lower
    rows is in bucket floor(4k / 10) (not at its raw percentile k / 10)."""
    fusion = RankFusion(RankParams(weights={"a": 1.0, "b": 2.0}, buckets=4))
    a = np.array([5.0, 1, 9, 3, 7, 0, 2, 8, 4, 6, 0.5, 0.1])
    b = -a
    groups = np.array([0] * 10 + [1, 1])
    below_a, _ = _ref_ranks(a.tolist(), groups.tolist())
    below_b, size = _ref_ranks(b.tolist(), groups.tolist())
    ref = [
        (ka * 4 // n) / 4 + 2.0 * ((kb * 4 // n) / 4)
        for ka, kb, n in zip(below_a, below_b, size, strict=True)
    ]
    np.testing.assert_allclose(fusion({"a": a, "b": b}, groups=groups), ref, rtol=0, atol=1e-12)
