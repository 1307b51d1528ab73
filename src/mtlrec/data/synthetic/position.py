"""A click log with position bias and known true relevance (:func:`make_position_bias_table`):
for measuring how well a model trained on biased clicks ranks by relevance (the selection-bias
tower of Zhao et al., RecSys 2019, Section 4.3)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from mtlrec.data.synthetic._common import _check_n, _check_seed, _rng
from mtlrec.data.synthetic.ctr import _sigmoid
from mtlrec.errors import ConfigError
from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec

_STREAM_MODEL = 0
_STREAM_IDS = 1
_STREAM_DENSE = 2
_STREAM_LOGGING = 3
_STREAM_LABELS = 4

# hidden model (documented in make_position_bias_table)
_REL_BIAS = -1.0
_FACTOR_DIM = 4
_FACTOR_SCALE = 0.7  # per-coordinate std of user and item factors: <u, v> has std ~0.98
_CATEGORY_SCALE = 0.5
_D0_COEF = 0.5
_DEVICE_EFFECT = (0.0, -0.4, 0.3)


def make_position_bias_table(
    n: int,
    *,
    positions: int = 10,
    num_users: int = 500,
    num_items: int = 1_000,
    num_categories: int = 20,
    position_effect: float = 1.0,
    promotion: float = 1.5,
    logging_noise: float = 1.0,
    seed: int = 0,
    model_seed: int | None = None,
) -> pa.Table:
    """A click log in requests of ``positions`` impressions, clicks biased by position.

    Each request is a user and ``positions`` distinct candidate items; a logging ranker sorts
    them by ``relevance logit + promotion_i + logging_noise * N(0, 1)`` (so relevant and
    promoted items are shown higher) and shows them at positions ``0 .. positions - 1``. The
    hidden model:

    * relevance: ``r = -1 + <u_user, v_item> + c_category + 0.5 * d0`` with user and item
      factors ``~ N(0, 0.7^2 I_4)``, category effects ``~ N(0, 0.5^2)`` and ``d0 ~ N(0, 1)``;
      ``true_ctr = sigmoid(r)``, the click probability at the top position on device 0.
    * clicks: ``logit P(click) = r - position_effect * log2(1 + position) + device_effect``
      (device effects 0, -0.4, 0.3): additive in the logit, the assumption of the paper's
      shallow tower. Promotions ``promotion_i ~ N(0, promotion^2)`` only move items up the
      list: a model without the position takes their extra clicks for relevance.
    * ``relevant``: an unbiased click label, ``Bernoulli(true_ctr)`` drawn apart from
      ``click`` (what the user would do with the item at the top): the target of the
      position-free ranking quality.

    Columns: ``request``, ``user``, ``item``, ``category`` (int64 ids), ``d0`` (float32),
    ``position`` (int64, 0 = top), ``device`` (int64 in {0, 1, 2}), ``click``, ``relevant``
    (int8), ``true_ctr`` (float64). Generation parameters as JSON under the schema metadata
    key ``mtlrec.synthetic``. Rows come request by request: a call with ``n`` rows returns the
    first ``n`` rows of a larger call.

    Args:
        n: number of rows (the last request may be cut).
        positions: impressions per request (2 or more).
        num_users, num_items, num_categories: id ranges (uniform ids).
        position_effect: the click logit falls by this times ``log2(1 + position)``.
        promotion: standard deviation of the logging ranker's per-item promotion.
        logging_noise: standard deviation of the logging ranker's per-impression noise (small:
            an item lands at about the same place in its request whenever shown).
        seed: seed of the rows (ids, values, ranking noise, labels).
        model_seed: seed of the hidden model (default ``seed``).

    Returns:
        The table.

    Example:
        >>> t = make_position_bias_table(40, positions=4, num_items=20, seed=1)
        >>> t.num_rows, sorted(set(t.column("position").to_pylist()))
        (40, [0, 1, 2, 3])
    """
    n = _check_n(n)
    seed = _check_seed("seed", seed)
    mseed = seed if model_seed is None else _check_seed("model_seed", model_seed)
    if positions < 2:
        raise ConfigError(f"positions must be >= 2, got {positions}")
    if num_items < positions:
        raise ConfigError(f"num_items ({num_items}) must be >= positions ({positions})")
    if min(num_users, num_categories) < 1:
        raise ConfigError("num_users and num_categories must be >= 1")
    checked = (
        ("position_effect", position_effect),
        ("promotion", promotion),
        ("logging_noise", logging_noise),
    )
    for name, v in checked:
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"{name} must be a finite number >= 0, got {v}")

    model = _rng(mseed, _STREAM_MODEL)
    user_f = model.normal(0.0, _FACTOR_SCALE, (num_users, _FACTOR_DIM))
    item_f = model.normal(0.0, _FACTOR_SCALE, (num_items, _FACTOR_DIM))
    cat_of_item = model.integers(0, num_categories, num_items)
    cat_effect = model.normal(0.0, _CATEGORY_SCALE, num_categories)
    promo = model.normal(0.0, promotion, num_items) if promotion > 0 else np.zeros(num_items)

    reqs = -(-n // positions)  # whole requests, cut to n rows at the end
    k = positions
    # one sub-stream per column: rows are prefix-stable across n
    user = np.repeat(_rng(seed, _STREAM_IDS, 0).integers(0, num_users, reqs), k)  # [R * K]
    pick = _rng(seed, _STREAM_IDS, 1)
    item = np.empty((reqs, k), dtype=np.int64)
    for r in range(reqs):  # K distinct items per request
        item[r] = pick.choice(num_items, size=k, replace=False)
    item = item.reshape(-1)  # [R * K]
    d0 = _rng(seed, _STREAM_DENSE, 0).normal(0.0, 1.0, reqs * k)
    device = np.repeat(_rng(seed, _STREAM_DENSE, 1).integers(0, len(_DEVICE_EFFECT), reqs), k)

    rel = (
        _REL_BIAS
        + np.einsum("nd,nd->n", user_f[user], item_f[item])
        + cat_effect[cat_of_item[item]]
        + _D0_COEF * d0
    )  # [R * K]
    noise = _rng(seed, _STREAM_LOGGING).normal(0.0, 1.0, reqs * k) * logging_noise
    score = (rel + promo[item] + noise).reshape(reqs, k)
    position = np.argsort(np.argsort(-score, axis=1), axis=1).reshape(-1)  # rank: 0 = top

    click_logit = (
        rel - position_effect * np.log2(1.0 + position) + np.asarray(_DEVICE_EFFECT)[device]
    )
    u = _rng(seed, _STREAM_LABELS).random((reqs * k, 2))
    true_ctr = _sigmoid(rel)
    cols = {
        "request": np.repeat(np.arange(reqs, dtype=np.int64), k),
        "user": user,
        "item": item,
        "category": cat_of_item[item],
        "d0": d0.astype(np.float32),
        "position": position.astype(np.int64),
        "device": device,
        "click": (u[:, 0] < _sigmoid(click_logit)).astype(np.int8),
        "relevant": (u[:, 1] < true_ctr).astype(np.int8),
        "true_ctr": true_ctr,
    }
    table = pa.table({c: pa.array(v[:n]) for c, v in cols.items()})
    meta = {
        "generator": "make_position_bias_table",
        "n": n,
        "positions": positions,
        "num_users": num_users,
        "num_items": num_items,
        "num_categories": num_categories,
        "position_effect": position_effect,
        "promotion": promotion,
        "logging_noise": logging_noise,
        "device_effects": list(_DEVICE_EFFECT),
        "seed": seed,
        "model_seed": mseed,
    }
    return table.replace_schema_metadata({"mtlrec.synthetic": json.dumps(meta)})


def position_bias_schema(
    *, positions: int = 10, position_role: str = "bias", embedding_dim: int = 8
) -> Schema:
    """The schema of :func:`make_position_bias_table` tables.

    Args:
        positions: impressions per request (the position feature is pre-indexed:
            ``vocab_size = positions``).
        position_role: ``bias`` (position and device are bias features, for a bias tower)
            or ``input`` (ordinary features of the main model).
        embedding_dim: width of the user, item and category embeddings.

    Returns:
        Features ``user``, ``item``, ``category`` (sparse), ``d0`` (standardised),
        ``position`` and ``device`` (pre-indexed, ``role: position_role``); one binary task
        ``click``; ``request`` as the group column.
    """
    if position_role not in ("bias", "input"):
        raise ConfigError(f"position_role must be bias or input, got {position_role!r}")
    role = position_role
    return Schema(
        features=(
            SparseFeature(name="user", embedding_dim=embedding_dim),
            SparseFeature(name="item", embedding_dim=embedding_dim),
            SparseFeature(name="category", embedding_dim=embedding_dim),
            DenseFeature(name="d0", transform="standardize"),
            SparseFeature(name="position", embedding_dim=4, vocab_size=positions, role=role),
            SparseFeature(name="device", embedding_dim=2, vocab_size=3, role=role),
        ),
        tasks=(TaskSpec(name="click", kind="binary"),),
        group_column="request",
    )
