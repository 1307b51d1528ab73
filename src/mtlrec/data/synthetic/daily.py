"""A daily click log with drift, for the continual-training loop (:func:`make_daily_ctr`).

Every day new items join the catalogue and take most of the traffic while older ones fade, and
the appeal of each item category wanders, so a model trained on yesterday meets ids it has no
row for and relations that moved. Labels come from a hidden logistic model, so a model has
something to learn and next-day AUC can be compared between training schemes
(``benchmarks/continual.py``).

Example:
    >>> t = make_daily_ctr(3, 1000, initial_items=100, new_items_per_day=20, users=200)
    >>> t.num_rows, sorted(set(t.column("day").to_pylist()))
    (3000, [1, 2, 3])
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from mtlrec.data.synthetic._common import _check_n, _check_seed, _rng
from mtlrec.errors import ConfigError
from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec

_MODEL, _ROWS, _LABELS = 10, 11, 12  # streams of the hidden model, the rows, the label draws
_CLICK_BIAS = -1.4
_CVR_BIAS = -1.0
_SEGMENTS = 20
_HOURS = 24
_DEVICES = 3


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * v))


def make_daily_ctr(
    days: int,
    rows_per_day: int,
    *,
    initial_items: int = 2000,
    new_items_per_day: int = 400,
    users: int = 5000,
    categories: int = 30,
    lifetime: float = 3.0,
    drift: float = 0.35,
    seed: int = 0,
) -> pa.Table:
    """A click log of ``days`` days with new items every day and drifting category appeal.

    Hidden model (fixed by ``seed``):

    * item ``i``: a birth day (0 for the ``initial_items``, day ``d`` for the
      ``new_items_per_day`` of day ``d``), a category (Zipf over ``categories``), a quality
      ``q_i ~ N(0, 0.6^2)``, a base popularity ``lognormal(0, 1)`` and a price;
    * user ``u`` (Zipf activity over ``users``): a segment (one of 20) and an effect
      ``N(0, 0.3^2)``; segment x category affinities ``N(0, 0.5^2)``;
    * category ``k``'s appeal on day ``d``: a random walk with steps ``N(0, drift^2)``;
    * hour and device effects.

    Day ``d`` draws ``rows_per_day`` impressions: users by activity, items among those born by
    day ``d`` with weight ``popularity * exp(-(d - birth) / lifetime)`` (new items take the
    traffic, old ones fade). ``logit P(click) = -1.4 + q_i + appeal_k(d) + affinity(s, k) +
    user effect + hour + device + 0.3 g(price) - 0.1 age``, ``g = log1p - log 2``;
    ``conversion`` is 1 on a click with ``logit = -1.0 + 0.5 q_i + 0.5 affinity + r_i`` (``r_i
    ~ N(0, 0.5^2)``).

    Args:
        days: number of days (``day`` 1..days).
        rows_per_day: impressions per day.
        initial_items: items already there on day 1.
        new_items_per_day: items born each day (day 1 included).
        users: users.
        categories: item categories.
        lifetime: days over which an item's traffic falls by a factor e.
        drift: standard deviation of a category's daily change of appeal.
        seed: seed of the hidden model (stream 10), the rows (11) and the labels (12).

    Returns:
        Columns ``day``, ``user``, ``item``, ``category``, ``segment``, ``hour``, ``device``
        (int64 ids; items are numbered in birth order), ``price``, ``age`` (float32, days since
        the item's birth), ``click``, ``conversion`` (int8); day by day. Generation parameters
        are under the schema metadata key ``mtlrec.synthetic``.
    """
    days, rows_per_day = _check_n(days), _check_n(rows_per_day)
    seed = _check_seed("seed", seed)
    if days < 1:
        raise ConfigError(f"days must be >= 1, got {days}")
    if min(initial_items + new_items_per_day, users, categories) < 1 or lifetime <= 0:
        raise ConfigError("need items, users and categories >= 1 and lifetime > 0")
    m = _rng(seed, _MODEL)
    n_items = initial_items + new_items_per_day * days
    birth = np.concatenate(
        [np.zeros(initial_items), np.repeat(np.arange(1, days + 1), new_items_per_day)]
    )
    cat_p = np.arange(1, categories + 1, dtype=np.float64) ** -0.8
    category = m.choice(categories, size=n_items, p=cat_p / cat_p.sum())
    quality = m.normal(0.0, 0.6, n_items)
    popularity = m.lognormal(0.0, 1.0, n_items)
    price = m.lognormal(1.0, 0.8, n_items).astype(np.float32)
    resid = m.normal(0.0, 0.5, n_items)
    segment = m.integers(0, _SEGMENTS, users)
    user_eff = m.normal(0.0, 0.3, users)
    affinity = m.normal(0.0, 0.5, (_SEGMENTS, categories))
    steps = m.normal(0.0, drift, (days, categories))
    steps[0] = m.normal(0.0, 0.5, categories)  # day 1: the starting appeal
    appeal = np.cumsum(steps, axis=0)  # [days, categories]
    hour_eff = 0.3 * np.sin(np.arange(_HOURS) / _HOURS * 2 * math.pi)
    dev_eff = np.array([0.0, -0.2, 0.15])
    user_p = np.arange(1, users + 1, dtype=np.float64) ** -0.9
    user_p /= user_p.sum()

    r = _rng(seed, _ROWS)
    parts: dict[str, list[np.ndarray]] = {}
    click_logit, cvr_logit = [], []
    for d in range(1, days + 1):
        n = rows_per_day
        alive = np.flatnonzero(birth <= d)
        w = popularity[alive] * np.exp(-(d - birth[alive]) / lifetime)
        item = alive[
            np.searchsorted(np.cumsum(w / w.sum()), r.random(n), side="right").clip(
                0, len(alive) - 1
            )
        ]
        user = np.searchsorted(np.cumsum(user_p), r.random(n), side="right").clip(0, users - 1)
        hour = r.integers(0, _HOURS, n)
        device = r.choice(_DEVICES, size=n, p=[0.6, 0.3, 0.1])
        k, s = category[item], segment[user]
        age = (d - birth[item]).astype(np.float32)
        g = np.log1p(price[item]) - math.log(2.0)
        click_logit.append(
            _CLICK_BIAS
            + quality[item]
            + appeal[d - 1, k]
            + affinity[s, k]
            + user_eff[user]
            + hour_eff[hour]
            + dev_eff[device]
            + 0.3 * g
            - 0.1 * age
        )
        cvr_logit.append(_CVR_BIAS + 0.5 * quality[item] + 0.5 * affinity[s, k] + resid[item])
        for name, v in (
            ("day", np.full(n, d)),
            ("user", user),
            ("item", item),
            ("category", k),
            ("segment", s),
            ("hour", hour),
            ("device", device),
            ("price", price[item]),
            ("age", age),
        ):
            parts.setdefault(name, []).append(v)
    cols: dict[str, np.ndarray] = {
        k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()
    }
    total = days * rows_per_day
    u = _rng(seed, _LABELS).random((total, 2))
    zc = np.concatenate(click_logit) if click_logit else np.zeros(0)
    zv = np.concatenate(cvr_logit) if cvr_logit else np.zeros(0)
    click = u[:, 0] < _sigmoid(zc)
    conversion = click & (u[:, 1] < _sigmoid(zv))
    out = {
        k: pa.array(v.astype(np.float32 if k in ("price", "age") else np.int64))
        for k, v in cols.items()
    }
    out["click"] = pa.array(click.astype(np.int8))
    out["conversion"] = pa.array(conversion.astype(np.int8))
    meta = {
        "generator": "make_daily_ctr",
        "days": days,
        "rows_per_day": rows_per_day,
        "initial_items": initial_items,
        "new_items_per_day": new_items_per_day,
        "users": users,
        "categories": categories,
        "lifetime": lifetime,
        "drift": drift,
        "seed": seed,
    }
    table = pa.table(out)
    return table.replace_schema_metadata({"mtlrec.synthetic": json.dumps(meta)})


def daily_ctr_schema(embedding_dim: int = 8) -> Schema:
    """The schema of :func:`make_daily_ctr` tables: sparse ``user``, ``item``, ``category``,
    ``segment``, ``hour``, ``device``; dense ``price`` (log1p, standardised) and ``age``
    (standardised); binary tasks ``click`` and ``conversion`` (click-and-convert, every row).
    The ``day`` column is not a feature."""
    sparse = [
        SparseFeature(name=n, embedding_dim=embedding_dim)
        for n in ("user", "item", "category", "segment", "hour", "device")
    ]
    dense = [
        DenseFeature(name="price", transform="log1p_standardize"),
        DenseFeature(name="age", transform="standardize"),
    ]
    return Schema(
        features=(*sparse, *dense),
        tasks=(TaskSpec(name="click", kind="binary"), TaskSpec(name="conversion", kind="binary")),
    )
