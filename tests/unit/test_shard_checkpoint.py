"""Shard files and the sharding plan without TorchRec: pieces saved by one plan are read back
by another (other row splits, column splits, one whole table), a damaged file is a
``CheckpointError`` naming it, and the plan follows the size rule and its overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtlrec.errors import CheckpointError, ConfigError
from mtlrec.train.shard_checkpoint import (
    SHARD_FORMAT,
    Piece,
    ShardSet,
    gather_tables,
    load_into,
    write_rank_file,
)
from mtlrec.train.sharding_plan import TableShape, choose_plan, column_shards

ROWS, DIM = 37, 8


def _save(folder: Path, splits: list[list[tuple[int, int, int, int]]]) -> dict:
    """A manifest of ``splits[rank] = [(r0, nr, c0, nc)]`` pieces of one table ``t`` (values:
    ``100 * row + column``) and of a row-wise state ``m`` (value: the row)."""
    whole = torch.arange(ROWS).unsqueeze(1) * 100.0 + torch.arange(DIM)
    files = []
    for rank, parts in enumerate(splits):
        pieces = []
        for r0, nr, c0, nc in parts:
            w = Piece("emb", "t", "weight", (r0, c0), (nr, nc), (ROWS, DIM))
            pieces.append((w, whole[r0 : r0 + nr, c0 : c0 + nc].contiguous()))
            if c0 == 0:
                m = Piece("emb", "t", "momentum1", (r0,), (nr,), (ROWS,))
                pieces.append((m, torch.arange(r0, r0 + nr, dtype=torch.float32)))
        files.append(write_rank_file(folder, rank, pieces))
    return {"format": SHARD_FORMAT, "dir": folder.name, "world_size": len(splits), "files": files}


def test_pieces_of_one_plan_fill_another(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    man = _save(tmp_path / "a", [[(0, 19, 0, 8)], [(19, 18, 0, 8)]])  # row-wise over 2
    shards = ShardSet(tmp_path, man)
    whole = torch.arange(ROWS).unsqueeze(1) * 100.0 + torch.arange(DIM)
    # three row pieces and a column piece of this process
    targets = [
        (Piece("emb", "t", "weight", (0, 0), (12, 8), (ROWS, DIM)), torch.zeros(12, 8)),
        (Piece("emb", "t", "weight", (12, 0), (13, 8), (ROWS, DIM)), torch.zeros(13, 8)),
        (Piece("emb", "t", "weight", (0, 4), (ROWS, 4), (ROWS, DIM)), torch.zeros(ROWS, 4)),
        (Piece("emb", "t", "momentum1", (10,), (20,), (ROWS,)), torch.zeros(20)),
    ]
    load_into(shards, targets)
    torch.testing.assert_close(targets[0][1], whole[:12])
    torch.testing.assert_close(targets[1][1], whole[12:25])
    torch.testing.assert_close(targets[2][1], whole[:, 4:])
    torch.testing.assert_close(targets[3][1], torch.arange(10, 30, dtype=torch.float32))
    torch.testing.assert_close(gather_tables(shards)["emb"]["t"], whole)


def test_column_pieces_gather_whole(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    man = _save(tmp_path / "c", [[(0, ROWS, 0, 4)], [(0, ROWS, 4, 4)]])
    whole = torch.arange(ROWS).unsqueeze(1) * 100.0 + torch.arange(DIM)
    torch.testing.assert_close(gather_tables(ShardSet(tmp_path, man))["emb"]["t"], whole)


def test_uncovered_or_reshaped_pieces_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    man = _save(tmp_path / "a", [[(0, 19, 0, 8)]])  # rows 19.. were never saved
    shards = ShardSet(tmp_path, man)
    full = Piece("emb", "t", "weight", (0, 0), (ROWS, DIM), (ROWS, DIM))
    with pytest.raises(CheckpointError, match="cover"):
        load_into(shards, [(full, torch.zeros(ROWS, DIM))])
    other = Piece("emb", "t", "momentum1", (0,), (ROWS,), (2 * ROWS,))
    with pytest.raises(CheckpointError, match="re-split"):
        load_into(shards, [(other, torch.zeros(ROWS))])


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_damaged_shard_file_is_named(tmp_path: Path, damage: str) -> None:
    (tmp_path / "a").mkdir()
    man = _save(tmp_path / "a", [[(0, 19, 0, 8)], [(19, 18, 0, 8)]])
    f = tmp_path / "a" / "rank-00001.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x10
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[:-40]))
    else:
        f.unlink()
    with pytest.raises(CheckpointError, match=r"rank-00001\.safetensors"):
        gather_tables(ShardSet(tmp_path, man))


def test_plan_by_size_with_overrides() -> None:
    tables = [
        TableShape("e/big", 5_000_000, 16),
        TableShape("e/a", 1000, 16),
        TableShape("e/b", 800, 16),
        TableShape("e/c", 10, 16),
    ]
    plan = choose_plan(tables, 2, row_wise_min_rows=1_000_000)
    assert plan["e/big"].kind == "row_wise" and plan["e/big"].ranks == (0, 1)
    # small tables whole, largest first onto the least loaded process
    assert {plan[k].ranks[0] for k in ("e/a", "e/b")} == {0, 1}
    over = choose_plan(tables, 2, row_wise_min_rows=1_000_000, overrides={"a": "column_wise"})
    assert over["e/a"].kind == "column_wise" and over["e/a"].ranks == (0, 1)
    one = choose_plan(tables, 1, row_wise_min_rows=1_000_000)
    assert all(p.ranks == (0,) for p in one.values())
    with pytest.raises(ConfigError, match="no table 'zz'"):
        choose_plan(tables, 2, row_wise_min_rows=10, overrides={"zz": "row_wise"})
    with pytest.raises(ConfigError, match="not one of"):
        choose_plan(tables, 2, row_wise_min_rows=10, overrides={"a": "diagonal"})
    assert column_shards(4, 2) == 1  # two columns of 2 are below TorchRec's multiple of 4
