"""With a group column (request id), the split hashes the group: no request spans two splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mtlrec.config import SplitConfig
from mtlrec.data.file_encoding import encode_file, fit_file, split_part
from mtlrec.data.loading import split_table
from mtlrec.data.split import hash_split, split_keys
from mtlrec.data.stream_dataset import StreamingDataset, encode_other_parts
from mtlrec.testing import tiny_schema, tiny_table

SPLIT = ((0.6, 0.2, 0.2), 3)
ROWS = 900


def _table(seed: int = 0) -> pa.Table:
    """tiny_table rows with a request column: 150 requests of 2-10 candidates in file order
    (consecutive rows), and a few rows with a null request id."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 11, 200)
    req = np.repeat(np.arange(len(sizes)), sizes)[:ROWS]
    ids = pa.array([f"r{r}" for r in req], pa.string())
    nulls = np.zeros(ROWS, dtype=bool)
    nulls[::97] = True
    ids = pa.array([None if n else v for n, v in zip(nulls, ids.to_pylist(), strict=True)])
    return tiny_table(ROWS, seed=seed).append_column("request", ids)


def _schema():
    return tiny_schema().model_copy(update={"group_column": "request"})


def _requests_by_part(table: pa.Table, part: np.ndarray) -> list[set]:
    req = table.column("request").to_pylist()
    return [
        {r for r, p in zip(req, part, strict=True) if p == k and r is not None} for k in range(3)
    ]


def test_no_request_spans_two_parts_and_parts_are_balanced() -> None:
    table = _table()
    part = split_part(table, 0, SPLIT, "request")
    sets = _requests_by_part(table, part)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    counts = np.bincount(part, minlength=3) / ROWS
    assert abs(counts[0] - 0.6) < 0.12 and abs(counts[1] - 0.2) < 0.1
    # the row-number split (what the code did before) cuts requests across the parts
    by_row = split_part(table, 0, SPLIT, None)
    rows_sets = _requests_by_part(table, by_row)
    assert rows_sets[0] & rows_sets[1]


def test_null_group_rows_are_each_their_own_group() -> None:
    rows = np.arange(50, dtype=np.uint64)
    groups = np.full(50, -1, dtype=np.int64)
    assert np.array_equal(split_keys(rows, groups), rows)  # hashed by row number, as no group
    groups[10:20] = 5
    keys = split_keys(rows, groups)
    assert len(set(keys[10:20].tolist())) == 1 and set(keys[:10].tolist()) == set(range(10))


def test_without_a_group_column_the_split_is_the_row_split() -> None:
    table = tiny_table(300)
    parts = split_table(table, SplitConfig(fractions=(0.6, 0.2, 0.2), seed=1), "request")
    expected = hash_split(300, (0.6, 0.2, 0.2), 1)
    assert [p.num_rows for p in parts] == [len(e) for e in expected]


def test_file_readers_and_the_stream_agree_on_whole_requests(tmp_path: Path) -> None:
    table = _table(1)
    path = tmp_path / "log.parquet"
    pq.write_table(table, path, row_group_size=64)
    csv = tmp_path / "log.csv"
    pacsv.write_csv(table, csv)
    schema = _schema()
    expected = np.bincount(split_part(table, 0, SPLIT, "request"), minlength=3)
    for p in (path, csv):
        pre = fit_file(schema, p, split=SPLIT)
        parts = encode_file(pre, p, split=SPLIT)
        assert [len(d) for d in parts] == expected.tolist(), p
    pre = fit_file(schema, path, split=SPLIT)
    stream = StreamingDataset(pre, path, split=SPLIT, part=0, shuffle_buffer=100, read_rows=50)
    assert len(stream) == expected[0]
    others = encode_other_parts(pre, path, SPLIT, skip=0)
    assert [len(d) if d is not None else 0 for d in others] == [0, *expected[1:].tolist()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_split_depends_on_the_seed(seed: int) -> None:
    table = _table()
    a = split_part(table, 0, ((0.5, 0.5), seed), "request")
    b = split_part(table, 0, ((0.5, 0.5), seed + 10), "request")
    assert 0.3 < float((a == b).mean()) < 0.7
