"""The daily log with drift: a day column, new items every day taking the traffic, shifting
popularity, learnable labels, a schema that reads it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.synthetic.daily import daily_ctr_schema, make_daily_ctr
from mtlrec.errors import ConfigError


@pytest.fixture(scope="module")
def log() -> pa.Table:
    return make_daily_ctr(5, 4000, initial_items=300, new_items_per_day=60, users=800)


def test_days_and_columns(log: pa.Table) -> None:
    assert log.num_rows == 5 * 4000
    assert log.column_names == [
        *("day", "user", "item", "category", "segment", "hour", "device", "price", "age"),
        *("click", "conversion"),
    ]
    days = log.column("day").to_numpy()
    assert np.array_equal(np.unique(days), np.arange(1, 6)) and (np.diff(days) >= 0).all()


def test_new_items_every_day_take_traffic_and_old_ones_fade(log: pa.Table) -> None:
    day = log.column("day").to_numpy()
    item = log.column("item").to_numpy()
    seen: set[int] = set()
    shares = []
    for d in range(1, 6):
        today = item[day == d]
        new = ~np.isin(today, list(seen))
        shares.append(new.mean())
        # the items born today exist only from today on: their ids are the day's newest
        born_today = (today >= 300 + 60 * (d - 1)) & (today < 300 + 60 * d)
        assert born_today.any() and (today < 300 + 60 * d).all()
        seen.update(today.tolist())
    assert all(s > 0.05 for s in shares[1:])  # every later day brings unseen items
    old = [np.mean(item[day == d] < 300) for d in range(1, 6)]
    assert old[0] > old[-1] + 0.2  # the initial catalogue fades


def test_labels_and_reproducibility(log: pa.Table) -> None:
    click = pc.mean(log.column("click")).as_py()
    conv = pc.mean(log.column("conversion")).as_py()
    assert 0.1 < click < 0.4 and 0 < conv < click
    assert (log.column("conversion").to_numpy() <= log.column("click").to_numpy()).all()
    again = make_daily_ctr(5, 4000, initial_items=300, new_items_per_day=60, users=800)
    assert again.equals(log)
    other = make_daily_ctr(5, 4000, initial_items=300, new_items_per_day=60, users=800, seed=1)
    assert not other.equals(log)


def test_the_schema_reads_it(log: pa.Table) -> None:
    pre = Preprocessor.fit(daily_ctr_schema(), log)
    ds = pre.encode(log)
    assert len(ds) == log.num_rows and ds.sparse.shape[1] == 6


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        make_daily_ctr(0, 10)
    with pytest.raises(ConfigError):
        make_daily_ctr(2, 10, lifetime=0)
