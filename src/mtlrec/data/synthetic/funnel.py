"""An impression -> click -> action -> purchase funnel whose true conversion rate is known on
every row, clicked or not (:func:`make_funnel_table`): for measuring the sample selection bias
of CVR models (ESMM, Ma et al. SIGIR 2018; ESM², Wen et al. SIGIR 2020)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from mtlrec.data.synthetic._common import _check_n, _check_seed, _rng
from mtlrec.data.synthetic.ctr import _sigmoid, _zipf_ids, _zipf_pmf
from mtlrec.errors import ConfigError
from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec

_STREAM_MODEL = 0
_STREAM_IDS = 1
_STREAM_DENSE = 2
_STREAM_LABELS = 3

# hidden model (documented in make_funnel_table)
_CLICK_BIAS, _ACTION_BIAS, _BUY_ACTION_BIAS, _BUY_OTHER_BIAS = -1.6, -1.3, -1.6, -3.9
_ID_SCALE = 0.8
_CATEGORY_SCALE = 0.4
_CLICK_D0, _ACTION_D1, _BUY_D0 = 0.8, 0.6, -0.6


def _centred_effects(
    rng: np.random.Generator, vocab: int, pmf: np.ndarray, base: np.ndarray | None, rho: float
) -> np.ndarray:
    """Per-id effects ``rho * base + sqrt(1 - rho^2) * N(0, s^2)`` (``N(0, s^2)`` without a
    base), centred under the id distribution ``pmf``."""
    noise = rng.normal(0.0, _ID_SCALE, size=vocab)
    e = noise if base is None else rho * base + math.sqrt(1.0 - rho * rho) * noise
    return e - pmf @ e


def make_funnel_table(
    n: int,
    *,
    num_users: int = 2_000,
    num_items: int = 5_000,
    num_categories: int = 50,
    zipf_a: float = 1.1,
    correlation: float = 0.5,
    click_shift: float = 0.0,
    buy_shift: float = 0.0,
    seed: int = 0,
    model_seed: int | None = None,
) -> pa.Table:
    """A conversion funnel with its true probabilities on every row.

    Columns:

    * ``user``, ``item`` (Zipf ids, ``P(k) ~ (k + 1)^-zipf_a``), ``category`` (the item's,
      fixed by the hidden model), int64; ``d0``, ``d1`` ~ N(0, 1), float32.
    * Labels, int8: ``click``; ``action`` (a deterministic post-click action such as add-to-cart,
      only on clicked rows); ``buy`` (only on clicked rows, through the action or without it).
    * Truth, float32: ``true_ctr = P(click | x)``, ``true_action = P(action | click, x)`` and
      ``true_cvr = P(buy | click, x)`` — defined on every row, so the CVR a model predicts on
      non-clicked rows can be compared with the truth there.

    Hidden model (logits; ``e``, ``a``, ``f`` per-id effects ~ N(0, 0.8^2), categories 0.4^2,
    centred under the id distribution):
    ``click: -1.6 + e_u + e_i + e_cat + 0.8 d0``;
    ``action | click: -1.3 + a_u + a_i + 0.6 d1``;
    ``buy | action: -1.6 + f_u + f_i - 0.6 d0``; ``buy | click, no action: -3.9 + f_u + f_i -
    0.6 d0``; so ``true_cvr = s(action) s(buy|action) + (1 - s(action)) s(buy|other)`` (the ESM²
    decomposition). The purchase effects are correlated with the click effects
    (``f = correlation * e + sqrt(1 - correlation^2) * noise``) and the action effects with the
    purchase ones (0.6), while ``d0`` pushes clicks up and purchases down: clicked rows are not a
    random sample of the impressions for CVR (sample selection bias). About 21-24% of rows are
    clicks, 28-31% of clicks take the action and 9-12% of clicks buy (the rates vary with
    ``model_seed``).

    Args:
        n: rows.
        num_users, num_items, num_categories: vocabulary sizes.
        zipf_a: Zipf exponent of the ids (> 0).
        correlation: correlation of the purchase with the click id effects, in ``[-1, 1]``.
        click_shift: added to the click logit (raises the click rate of a small table).
        buy_shift: added to both purchase logits.
        seed: seed of the rows (ids: stream 1, dense: 2, labels: 3).
        model_seed: seed of the hidden model (stream 0); None: ``seed``. Keep it fixed to draw a
            training and an evaluation table of the same world with different ``seed``.

    Returns:
        The table; the generation parameters as JSON under the schema metadata key
        ``mtlrec.synthetic``.

    Example:
        >>> t = make_funnel_table(1000, seed=0)
        >>> buy, click = t.column("buy").to_numpy(), t.column("click").to_numpy()
        >>> t.column_names[:5], bool((buy <= click).all())
        (['user', 'item', 'category', 'd0', 'd1'], True)
    """
    n = _check_n(n)
    seed = _check_seed("seed", seed)
    mseed = seed if model_seed is None else _check_seed("model_seed", model_seed)
    if min(num_users, num_items, num_categories) < 1:
        raise ConfigError("num_users, num_items and num_categories must be >= 1")
    if not math.isfinite(zipf_a) or zipf_a <= 0:
        raise ConfigError(f"zipf_a must be > 0, got {zipf_a}")
    if not -1.0 <= correlation <= 1.0:
        raise ConfigError(f"correlation must be in [-1, 1], got {correlation}")

    model = _rng(mseed, _STREAM_MODEL)
    pu, pi = _zipf_pmf(num_users, zipf_a), _zipf_pmf(num_items, zipf_a)
    cat_of_item = model.integers(0, num_categories, size=num_items)
    click_u = _centred_effects(model, num_users, pu, None, 0.0)
    click_i = _centred_effects(model, num_items, pi, None, 0.0)
    click_c = model.normal(0.0, _CATEGORY_SCALE, size=num_categories)
    buy_u = _centred_effects(model, num_users, pu, click_u, correlation)
    buy_i = _centred_effects(model, num_items, pi, click_i, correlation)
    act_u = _centred_effects(model, num_users, pu, buy_u, 0.6)
    act_i = _centred_effects(model, num_items, pi, buy_i, 0.6)

    user = _zipf_ids(_rng(seed, _STREAM_IDS, 0), num_users, zipf_a, n)
    item = _zipf_ids(_rng(seed, _STREAM_IDS, 1), num_items, zipf_a, n)
    cat = cat_of_item[item]
    d0 = _rng(seed, _STREAM_DENSE, 0).standard_normal(n)
    d1 = _rng(seed, _STREAM_DENSE, 1).standard_normal(n)

    p_click = _sigmoid(
        _CLICK_BIAS + click_shift + click_u[user] + click_i[item] + click_c[cat] + _CLICK_D0 * d0
    )
    p_action = _sigmoid(_ACTION_BIAS + act_u[user] + act_i[item] + _ACTION_D1 * d1)
    buy_logit = buy_shift + buy_u[user] + buy_i[item] + _BUY_D0 * d0
    p_buy_action = _sigmoid(_BUY_ACTION_BIAS + buy_logit)
    p_buy_other = _sigmoid(_BUY_OTHER_BIAS + buy_logit)
    p_cvr = p_action * p_buy_action + (1.0 - p_action) * p_buy_other

    u = _rng(seed, _STREAM_LABELS).random((n, 3))
    click = u[:, 0] < p_click
    action = click & (u[:, 1] < p_action)
    buy = click & (u[:, 2] < np.where(action, p_buy_action, p_buy_other))

    columns = {
        "user": user,
        "item": item,
        "category": cat.astype(np.int64),
        "d0": d0.astype(np.float32),
        "d1": d1.astype(np.float32),
        "click": click.astype(np.int8),
        "action": action.astype(np.int8),
        "buy": buy.astype(np.int8),
        "true_ctr": p_click.astype(np.float32),
        "true_action": p_action.astype(np.float32),
        "true_cvr": p_cvr.astype(np.float32),
    }
    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    meta = {
        "generator": "make_funnel_table",
        "n": n,
        "num_users": num_users,
        "num_items": num_items,
        "num_categories": num_categories,
        "zipf_a": float(zipf_a),
        "correlation": float(correlation),
        "click_shift": float(click_shift),
        "buy_shift": float(buy_shift),
        "seed": seed,
        "model_seed": mseed,
    }
    return table.replace_schema_metadata({"mtlrec.synthetic": json.dumps(meta)})


def funnel_schema(embedding_dim: int = 8, *, action: bool = True) -> Schema:
    """The schema of :func:`make_funnel_table` tables for funnel models.

    Args:
        embedding_dim: width of the ``user``, ``item`` and ``category`` embeddings.
        action: include the ``ctavr`` task (label ``action``, ESM²'s click & action).

    Returns:
        Features ``user``, ``item``, ``category`` (sparse), ``d0``, ``d1`` (dense); tasks
        ``ctr`` (label ``click``), ``ctavr`` (label ``action``), ``cvr`` (label ``buy``, mask
        ``click``) and ``ctcvr`` (label ``buy``). The truth columns are not features.
    """
    tasks = [TaskSpec(name="ctr", kind="binary", label="click")]
    if action:
        tasks.append(TaskSpec(name="ctavr", kind="binary", label="action"))
    tasks += [
        TaskSpec(name="cvr", kind="binary", label="buy", mask="click"),
        TaskSpec(name="ctcvr", kind="binary", label="buy"),
    ]
    return Schema(
        features=(
            SparseFeature(name="user", embedding_dim=embedding_dim),
            SparseFeature(name="item", embedding_dim=embedding_dim),
            SparseFeature(name="category", embedding_dim=embedding_dim),
            DenseFeature(name="d0", transform="standardize"),
            DenseFeature(name="d1", transform="standardize"),
        ),
        tasks=tuple(tasks),
    )
