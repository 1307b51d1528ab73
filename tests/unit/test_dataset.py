"""Tests of mtlrec.data.dataset.ColumnarDataset: batching, epoch order, resuming, sharding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlrec.batch import Batch
from mtlrec.data.dataset import ColumnarDataset, epoch_permutation
from mtlrec.schema import DenseFeature, Schema, SequenceFeature, SparseFeature, TaskSpec

SCHEMA = Schema(
    features=(
        SparseFeature(name="rid"),
        SparseFeature(name="other"),
        DenseFeature(name="x"),
        SequenceFeature(name="hist", max_len=2),
    ),
    tasks=(
        TaskSpec(name="click", kind="binary"),
        TaskSpec(name="watch", kind="regression", mask="click", weight="w"),
    ),
    group_column="g",
)


def make(n: int, *, targets: bool = True) -> ColumnarDataset:
    """Row i is recognisable everywhere: sparse id i, dense i/2, sequence (i, i+1), group i//3."""
    r = torch.arange(n)
    sparse = torch.stack([r, r + 1000], dim=1).to(torch.int32)
    dense = (r.to(torch.float32) / 2).unsqueeze(1)
    seq = torch.stack([r, r + 1], dim=1).to(torch.int32)
    labels = masks = weights = None
    if targets:
        click = (r % 2).to(torch.float32)
        labels = torch.stack([click, r.to(torch.float32) * click], dim=1)
        masks = torch.stack([torch.ones(n, dtype=torch.bool), click.bool()], dim=1)
        weights = torch.stack([torch.ones(n), 2.0 * click], dim=1)
    return ColumnarDataset(
        SCHEMA, sparse, dense, {"hist": seq}, labels, masks, weights, r.to(torch.int64) // 3
    )


def rows(batch: Batch) -> list[int]:
    return batch.features.sparse_column("rid").tolist()


def epoch_rows(ds: ColumnarDataset, batch_size: int, **kw) -> list[list[int]]:
    return [rows(b) for b in ds.batches(batch_size, **kw)]


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


# -- basics ---------------------------------------------------------------------------------------
def test_unshuffled_batches_follow_file_order() -> None:
    ds = make(10)
    assert epoch_rows(ds, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert ds.num_batches(4) == 3


def test_shuffled_batches_cover_every_row_once() -> None:
    ds = make(103)
    for epoch in range(3):
        got = epoch_rows(ds, 10, shuffle=True, seed=5, epoch=epoch)
        assert [len(b) for b in got] == [10] * 10 + [3]
        assert sorted(flat(got)) == list(range(103))
        assert flat(got) != list(range(103))


def test_epoch_order_is_deterministic_in_seed_and_epoch() -> None:
    ds = make(64)
    a = epoch_rows(ds, 8, shuffle=True, seed=1, epoch=2)
    assert a == epoch_rows(ds, 8, shuffle=True, seed=1, epoch=2)
    assert a != epoch_rows(ds, 8, shuffle=True, seed=1, epoch=3)
    assert a != epoch_rows(ds, 8, shuffle=True, seed=2, epoch=2)
    assert flat(a) == epoch_permutation(64, 1, 2).tolist()


def test_start_resumes_mid_epoch() -> None:
    ds = make(50)
    full = epoch_rows(ds, 7, shuffle=True, seed=3, epoch=1)
    for k in (0, 1, 4, 7, 8):
        assert epoch_rows(ds, 7, shuffle=True, seed=3, epoch=1, start=k) == full[k:]
    assert epoch_rows(ds, 7, start=2) == epoch_rows(ds, 7)[2:]


def test_drop_last() -> None:
    ds = make(10)
    assert ds.num_batches(3, drop_last=True) == 3
    assert ds.num_batches(3) == 4
    kept = epoch_rows(ds, 3, drop_last=True)
    assert kept == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    shuffled = epoch_rows(ds, 3, shuffle=True, drop_last=True)
    assert [len(b) for b in shuffled] == [3, 3, 3]
    assert len(set(flat(shuffled))) == 9
    assert epoch_rows(ds, 5, drop_last=True) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert epoch_rows(ds, 11, drop_last=True) == []


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("n", "batch_size"), [(30, 6), (31, 7), (10, 4), (9, 8)])
def test_rank_shares_concatenate_to_global_batch(
    world: int, shuffle: bool, n: int, batch_size: int
) -> None:
    ds = make(n)
    kw = {"shuffle": shuffle, "seed": 9, "epoch": 4}
    single = epoch_rows(ds, batch_size, **kw)
    per_rank = [epoch_rows(ds, batch_size, rank=r, world_size=world, **kw) for r in range(world)]
    assert all(len(p) == len(single) for p in per_rank)  # equal steps on every rank
    for b, want in enumerate(single):
        assert flat([per_rank[r][b] for r in range(world)]) == want
        sizes = [len(per_rank[r][b]) for r in range(world)]
        assert sizes == sorted(sizes, reverse=True)  # contiguous shares, front-loaded
        assert max(sizes) == -(-len(want) // world)


def test_rank_shares_with_start() -> None:
    ds = make(40)
    kw = {"shuffle": True, "seed": 0, "epoch": 0, "world_size": 2}
    for r in range(2):
        full = epoch_rows(ds, 8, rank=r, **kw)
        assert epoch_rows(ds, 8, rank=r, start=3, **kw) == full[3:]


# -- take / batches content -----------------------------------------------------------------------
def test_take_slice_and_index_tensor_agree() -> None:
    ds = make(12)
    a = ds.take(slice(3, 7))
    b = ds.take(torch.tensor([3, 4, 5, 6]))
    for x, y in [
        (a.features.sparse, b.features.sparse),
        (a.features.dense, b.features.dense),
        (a.features.sequences["hist"], b.features.sequences["hist"]),
        (a.groups, b.groups),
    ]:
        assert torch.equal(x, y)
    for t in ("click", "watch"):
        assert torch.equal(a.labels[t], b.labels[t])
        assert torch.equal(a.masks[t], b.masks[t])
        assert torch.equal(a.weights[t], b.weights[t])
    assert rows(a) == [3, 4, 5, 6]


def test_take_index_tensor_any_order() -> None:
    ds = make(12)
    batch = ds.take(torch.tensor([9, 2, 2, 11]))
    assert rows(batch) == [9, 2, 2, 11]
    assert batch.features.dense_column("x").tolist() == [4.5, 1.0, 1.0, 5.5]
    assert batch.features.sequences["hist"].tolist() == [[9, 10], [2, 3], [2, 3], [11, 12]]
    assert batch.groups.tolist() == [3, 0, 0, 3]


def test_batch_targets_keyed_by_task_name() -> None:
    ds = make(6)
    batch = ds.take(slice(0, 6))
    assert len(batch) == 6
    assert set(batch.labels) == set(batch.masks) == set(batch.weights) == {"click", "watch"}
    assert batch.labels["click"].tolist() == [0, 1, 0, 1, 0, 1]
    assert batch.labels["watch"].tolist() == [0, 1, 0, 3, 0, 5]
    assert batch.masks["click"].tolist() == [True] * 6
    assert batch.masks["watch"].tolist() == [False, True] * 3
    assert batch.weights["watch"].tolist() == [0, 2, 0, 2, 0, 2]
    assert batch.features.sparse_names == ("rid", "other")
    assert batch.features.dense_names == ("x",)
    assert batch.features.sparse_column("other").tolist() == list(range(1000, 1006))


def test_shuffled_batches_keep_rows_aligned() -> None:
    ds = make(40)
    for batch in ds.batches(16, shuffle=True, seed=1):
        r = torch.tensor(rows(batch))
        assert torch.equal(batch.features.dense_column("x"), r.float() / 2)
        assert torch.equal(batch.labels["click"], (r % 2).float())
        assert torch.equal(batch.groups, r // 3)
        assert torch.equal(batch.features.sequences["hist"][:, 1], (r + 1).int())


def test_dicts_and_subset() -> None:
    ds = make(9)
    assert set(ds.label_dict()) == {"click", "watch"}
    assert ds.weight_dict()["watch"].tolist() == [0, 2, 0, 2, 0, 2, 0, 2, 0]
    assert ds.mask_dict()["click"].all()
    sub = ds.subset(torch.tensor([8, 1]))
    assert len(sub) == 2
    assert rows(sub.take(slice(None))) == [8, 1]
    assert sub.label_dict()["watch"].tolist() == [0.0, 1.0]
    assert sub.groups.tolist() == [2, 0]


def test_dataset_without_targets() -> None:
    ds = make(5, targets=False)
    assert not ds.has_targets
    batch = next(ds.batches(3))
    assert batch.labels == batch.masks == batch.weights == {}
    assert ds.label_dict() == ds.mask_dict() == ds.weight_dict() == {}


# -- property -------------------------------------------------------------------------------------
@settings(deadline=None, max_examples=60)
@given(
    n=st.integers(1, 120),
    batch_size=st.integers(1, 40),
    world=st.integers(1, 4),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_property_ranks_cover_epoch(
    n: int, batch_size: int, world: int, shuffle: bool, drop_last: bool, seed: int
) -> None:
    ds = make(n, targets=False)
    kw = {"shuffle": shuffle, "seed": seed, "drop_last": drop_last, "world_size": world}
    per_rank = [epoch_rows(ds, batch_size, rank=r, **kw) for r in range(world)]
    steps = ds.num_batches(batch_size, drop_last=drop_last)
    assert all(len(p) == steps for p in per_rank)
    seen = flat([i for p in per_rank for i in p])
    assert len(seen) == len(set(seen))  # no row twice
    expected = (n // batch_size) * batch_size if drop_last else n
    assert len(seen) == expected
    assert set(seen) <= set(range(n))
    if not drop_last:
        assert sorted(seen) == list(range(n))
    single = epoch_rows(ds, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    for b in range(steps):
        assert flat([per_rank[r][b] for r in range(world)]) == single[b]
