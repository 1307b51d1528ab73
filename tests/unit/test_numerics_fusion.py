"""Rank-fusion bucket edges (issue 12.7) and lambdarank grades of the business label (12.3)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from mtlrec.errors import ConfigError
from mtlrec.fusion import RankFusion, RankParams, fit_lgbm
from mtlrec.fusion.ltr import lambdarank_grades
from mtlrec.fusion.rank import group_buckets
from mtlrec.metrics import auc


# -- rank buckets -------------------------------------------------------------------------------
@pytest.mark.parametrize("buckets", [2, 3, 7, 10, 100, 1000])
def test_every_bucket_edge_lands_in_the_bucket_it_starts(buckets: int) -> None:
    """A row whose share of lower rows is exactly k / buckets is in bucket k: checked against
    exact rational arithmetic, for every rank of lists of many sizes."""
    rng = np.random.default_rng(buckets)
    sizes = [1, 2, 3, 7, 10, 29, 57, 100, 101, 300, 1000, 2 * buckets, 3 * buckets]
    scores = np.concatenate([rng.permutation(n).astype(np.float64) for n in sizes])
    groups = np.repeat(np.arange(len(sizes)), sizes)
    got = group_buckets(scores, groups, buckets)
    edges = 0
    for i in range(len(scores)):
        n = sizes[groups[i]]
        share = Fraction(int(scores[i]), n)  # scores are the ranks 0..n-1 of their group
        k = int(share * buckets)  # floor of a non-negative rational
        assert got[i] == k / buckets, (n, int(scores[i]), buckets, got[i], k)
        edges += share * buckets == k
    assert edges >= len(sizes)  # every list has its rank 0 on an edge, most many more


def test_a_hundred_rows_fill_a_hundred_buckets_one_each() -> None:
    """100 distinct scores and 100 buckets: row r is in bucket r (the float form
    ``floor(r / 100 * 100)`` puts 3 of them, e.g. r = 29, one bucket low)."""
    f = RankFusion(RankParams(weights={"a": 1.0}, buckets=100))
    scores = np.random.default_rng(0).permutation(100) / 100.0
    fused = f({"a": scores})
    np.testing.assert_array_equal(fused, np.round(scores * 100) / 100)
    assert len(np.unique(fused)) == 100


# -- lambdarank grades --------------------------------------------------------------------------
def test_lambdarank_grades_keep_the_order_of_label_values() -> None:
    target = np.array([0.0, 0.5, 1.5, 0.5, 0.0, 1.0, 7.25])
    grades, gains = lambdarank_grades(target)
    assert gains == [0.0, 0.5, 1.0, 1.5, 7.25]
    np.testing.assert_array_equal(grades, [0, 1, 3, 1, 0, 2, 4])
    for i in range(len(target)):
        for j in range(len(target)):
            assert (target[i] < target[j]) == (grades[i] < grades[j])
            assert gains[grades[i]] == target[i]  # gain = the business value
    with pytest.raises(ConfigError, match="5 distinct values"):
        lambdarank_grades(target, max_grades=4)


def test_lambdarank_fusion_ranks_clicks_above_non_clicks() -> None:
    """Business label ``0.5 * click + conv``: click-only rows (0.5) must rank above
    non-clicks (0), which rounding the label to integers would merge with them."""
    pytest.importorskip("lightgbm")
    rng = np.random.default_rng(0)
    n = 6000
    click = rng.random(n) < 0.4
    conv = click & (rng.random(n) < 0.3)
    p = np.stack(
        [
            np.where(click, 0.7, 0.2) + rng.uniform(-0.05, 0.05, n),  # click score
            np.where(conv, 0.7, 0.2) + rng.uniform(-0.05, 0.05, n),  # conversion score
        ],
        axis=1,
    )
    target = 0.5 * click + 1.0 * conv  # values 0, 0.5, 1.5
    groups = np.repeat(np.arange(n // 20), 20)
    fusion = fit_lgbm(p, target, ["click", "conv"], groups=groups, num_threads=1)
    s = fusion({"click": p[:, 0], "conv": p[:, 1]}, groups)
    no_conv = ~conv
    # among rows without a conversion, clicks come first
    assert auc(s[no_conv], click[no_conv].astype(float)) > 0.95
    # and conversions still come first overall
    assert auc(s, conv.astype(float)) > 0.95
