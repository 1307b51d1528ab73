"""Tests of mtlrec.data.split.hash_split: deterministic, disjoint, covering, n-independent."""

from __future__ import annotations

import numpy as np
import pytest

from mtlrec.data.split import hash_part, hash_split, splitmix64


def assignment(n: int, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> np.ndarray:
    """Part index of every row."""
    out = np.full(n, -1)
    for k, idx in enumerate(hash_split(n, fractions, seed)):
        out[idx] = k
    return out


def test_deterministic() -> None:
    a = hash_split(5000, (0.7, 0.2, 0.1), seed=4)
    b = hash_split(5000, (0.7, 0.2, 0.1), seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_disjoint_and_covering() -> None:
    parts = hash_split(10_000, (0.5, 0.3, 0.2), seed=1)
    assert len(parts) == 3
    allrows = np.concatenate(parts)
    assert len(allrows) == 10_000
    assert np.array_equal(np.sort(allrows), np.arange(10_000))
    for p in parts:
        assert np.all(np.diff(p) > 0)  # sorted row indices, no repeats


@pytest.mark.parametrize(
    "fractions", [(0.6, 0.2, 0.2), (0.8, 0.1, 0.1), (0.34, 0.33, 0.33), (0.5, 0.5)]
)
def test_fractions_close_for_100k(fractions: tuple[float, ...]) -> None:
    n = 100_000
    parts = hash_split(n, fractions, seed=0)
    assert len(parts) == len(fractions)
    for p, f in zip(parts, fractions, strict=True):
        assert abs(len(p) / n - f) <= 0.02


def test_zero_fraction_part_is_empty() -> None:
    parts = hash_split(1000, (0.9, 0.0, 0.1))
    assert len(parts[1]) == 0
    assert len(parts[0]) + len(parts[2]) == 1000


def test_different_seed_different_assignment() -> None:
    a = assignment(10_000, seed=0)
    b = assignment(10_000, seed=1)
    changed = np.mean(a != b)
    # independent draws with fractions .6/.2/.2 differ on 1 - (.36+.04+.04) = 56% of rows
    assert 0.5 < changed < 0.62


def test_row_part_independent_of_n() -> None:
    big = assignment(20_000, seed=3)
    for n in (1, 17, 999, 5_000, 19_999):
        assert np.array_equal(assignment(n, seed=3), big[:n])


def test_empty_and_tiny() -> None:
    assert [len(p) for p in hash_split(0)] == [0, 0, 0]
    assert sum(len(p) for p in hash_split(1)) == 1


def test_parts_are_not_contiguous_blocks() -> None:
    a = assignment(1000)
    # a hash split interleaves parts; a prefix split would put rows 0..599 in part 0
    assert set(a[:100].tolist()) == {0, 1, 2}


def test_splitmix64_known_values() -> None:
    # SplitMix64 finaliser of the golden-gamma step: the first outputs of the reference generator
    # seeded with 0 are 0xE220A8397B1DCDAF and 0x6E789E6AA1B965F4
    x = np.array([0, 0x9E3779B97F4A7C15], dtype=np.uint64)
    assert splitmix64(x).tolist() == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


# -- pinned outputs and independence of seeds (issue 17.4) -------------------------------------
# Computed once from the implementation (SplitMix64 of ``row ^ seed * 0x94D049BB133111EB``, top
# 53 bits as u in [0, 1)). A change here re-splits every user's data: it must be deliberate.
PINNED_60_20_20 = {
    0: "2000001011000100000100121110011220002122",
    1: "1000002000002021100001211200001000010020",
    7: "2122010210000022000000021021010100000002",
    2**40 + 3: "0002010000022210200010000010022220100000",
}
PINNED_DECILES = {
    0: "85514373660357453507207966755768",
    3: "33697833886916684526178103449527",
}


@pytest.mark.parametrize("seed", sorted(PINNED_60_20_20))
def test_hash_part_pinned_to_known_assignments(seed: int) -> None:
    rows = np.arange(40, dtype=np.uint64)
    got = "".join(map(str, hash_part(rows, (0.6, 0.2, 0.2), seed=seed).tolist()))
    assert got == PINNED_60_20_20[seed]
    assert "".join(map(str, assignment(40, seed=seed).tolist())) == PINNED_60_20_20[seed]


@pytest.mark.parametrize("seed", sorted(PINNED_DECILES))
def test_hash_part_pinned_to_known_deciles(seed: int) -> None:
    """Ten equal parts pin ``u`` to a tenth: a changed shift or scale moves most rows."""
    rows = np.arange(32, dtype=np.uint64)
    got = "".join(map(str, hash_part(rows, (0.1,) * 10, seed=seed).tolist()))
    assert got == PINNED_DECILES[seed]


def test_hash_split_pinned_rows_and_large_row_numbers() -> None:
    parts = hash_split(20, (0.3, 0.3, 0.4), seed=11)
    assert [p.tolist() for p in parts] == [
        [1, 2, 8, 13, 14, 15, 16, 19],
        [5, 6, 7, 11, 12, 17],
        [0, 3, 4, 9, 10, 18],
    ]
    rows = np.array([0, 1, 2, 3, 10**12, 2**63, 2**64 - 1], dtype=np.uint64)
    assert hash_part(rows, (0.5, 0.5), seed=5).tolist() == [1, 1, 0, 1, 0, 0, 0]


# Independent assignments with fractions .6/.2/.2 agree on .36 + .04 + .04 = 44% of rows.
AGREE = 0.44


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


@pytest.mark.parametrize(("s", "t"), [(0, 1), (1, 2), (0, 2), (5, 1000), (0, 2**31 + 1)])
def test_different_seeds_agree_as_independent_draws(s: int, t: int) -> None:
    n = 20_000  # sd of the agreement of independent draws: sqrt(.44 * .56 / n) = 0.0035
    assert abs(_agreement(assignment(n, seed=s), assignment(n, seed=t)) - AGREE) < 0.02


def test_a_seed_is_not_a_shift_of_another() -> None:
    """Seed s must not be seed 0 read from another row (e.g. the seed added to the row number):
    for every small shift, both ways, the shifted assignments agree only as independent ones."""
    n, max_shift = 6_000, 64
    base = assignment(n + max_shift, seed=0)
    worst = 0.0
    for s in range(1, 9):
        other = assignment(n + max_shift, seed=s)
        for k in range(max_shift + 1):
            worst = max(
                worst,
                abs(_agreement(other[:n], base[k : k + n]) - AGREE),
                abs(_agreement(base[:n], other[k : k + n]) - AGREE),
            )
    assert worst < 0.04  # 6.4 sd of independent draws over n rows; a shift agrees on 100%
