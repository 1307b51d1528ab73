"""Tests that kill the mutants of ``mtlrec.data.split`` the rest of the suite let live
(``python benchmarks/mutation.py data/split``): the default seed, rows exactly on a part's
edge (parts are half-open intervals of u), overflow warnings of scalar inputs, and the keys of
a split by group."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mtlrec.data.split import hash_part, hash_split, split_keys, splitmix64

MASK = (1 << 64) - 1
GOLD, M1, M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _unxorshift(y: int, s: int) -> int:
    """Inverse of ``x ^ (x >> s)`` on 64 bits."""
    x = y
    for _ in range(64 // s + 1):
        x = y ^ (x >> s)
    return x


def _inverse_splitmix64(h: int) -> int:
    """The input whose SplitMix64 finaliser output is ``h`` (each step is a bijection)."""
    z = _unxorshift(h, 31)
    z = (z * pow(M2, -1, 1 << 64)) & MASK
    z = _unxorshift(z, 27)
    z = (z * pow(M1, -1, 1 << 64)) & MASK
    z = _unxorshift(z, 30)
    return (z - GOLD) & MASK


def _row_with_u(u_times_2_53: int, seed: int) -> int:
    """A row number whose ``u`` in :func:`hash_part` is exactly ``u_times_2_53 / 2^53``."""
    key = _inverse_splitmix64(u_times_2_53 << 11)
    return key ^ ((seed * M2) & MASK)


def test_the_inverse_is_an_inverse() -> None:
    for h in (0, 1, 12345, MASK, 0xDEADBEEF << 20):
        x = _inverse_splitmix64(h)
        assert int(splitmix64(np.array([x], dtype=np.uint64))[0]) == h


@pytest.mark.parametrize("seed", [0, 3])
def test_a_row_exactly_on_an_edge_belongs_to_the_upper_part(seed: int) -> None:
    """Part k holds ``u`` in ``[edge_k, edge_k+1)``: a row whose u equals an edge exactly
    starts the next part; one unit of 2^-53 below, it ends the previous one."""
    fractions = (0.6, 0.2, 0.2)
    for k, edge in enumerate(np.cumsum(fractions)[:-1], start=1):
        scaled = int(float(edge) * 2**53)
        assert scaled / 2**53 == float(edge)  # the edge is a multiple of 2^-53
        on = _row_with_u(scaled, seed)
        below = _row_with_u(scaled - 1, seed)
        rows = np.array([on, below], dtype=np.uint64)
        assert hash_part(rows, fractions, seed=seed).tolist() == [k, k - 1]


def test_defaults_are_seed_0_and_60_20_20() -> None:
    rows = np.arange(40, dtype=np.uint64)
    pinned = "2000001011000100000100121110011220002122"  # seed 0, (0.6, 0.2, 0.2)
    assert "".join(map(str, hash_part(rows).tolist())) == pinned
    parts = hash_split(40)
    got = np.empty(40, dtype=int)
    for k, idx in enumerate(parts):
        got[idx] = k
    assert "".join(map(str, got.tolist())) == pinned


def test_scalar_inputs_do_not_warn_of_overflow() -> None:
    """SplitMix64 overflows by design: no RuntimeWarning, also for numpy scalars (where numpy
    checks overflow) and under warnings-as-errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert int(splitmix64(np.uint64(0))) == 0xE220A8397B1DCDAF
        assert int(splitmix64(np.uint64(MASK))) == int(
            splitmix64(np.array([MASK], dtype=np.uint64))[0]
        )


# Computed once from the implementation: which part each group's rows fall in. A change moves
# every user's requests to other splits; it must be deliberate.
GROUPS = np.array([3, 3, 17, -1, 17, 1_000_000_007, -1, 42], dtype=np.int64)


def test_split_by_group_pinned() -> None:
    part = hash_part(split_keys(np.arange(8), GROUPS), (0.5, 0.5), seed=2)
    assert part.tolist() == [0, 0, 0, 1, 0, 1, 1, 0]
    many = hash_part(split_keys(np.zeros(40, dtype=np.int64), np.arange(40)), seed=0)
    assert "".join(map(str, many.tolist())) == "1020102012100000102000000020100100010000"


def test_group_keys_are_the_row_number_for_null_groups_and_distinct_for_groups() -> None:
    keys = split_keys(np.arange(8), GROUPS)
    assert keys.dtype == np.uint64
    assert keys[3] == 3 and keys[6] == 6  # null group: the row is its own group
    assert keys[0] == keys[1] and keys[2] == keys[4]
    ids = np.arange(-1, 5000, dtype=np.int64)
    assert len(set(split_keys(np.zeros(len(ids), dtype=np.int64), ids)[1:].tolist())) == 5000
