"""A click-log-like table for speed benchmarks: Zipf-distributed categorical ids, skewed
non-negative numeric columns, and ``click`` / ``conversion`` labels drawn from a hidden logistic
model so that a model has something to learn (:func:`make_ctr_table`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from mtlrec.data.synthetic._common import _check_n, _check_seed, _rng
from mtlrec.errors import ConfigError
from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec

_STREAM_CTR_MODEL = 0
_STREAM_CTR_SPARSE = 1
_STREAM_CTR_DENSE = 2
_STREAM_CTR_LABELS = 3

# Hidden logistic model of make_ctr_table (documented there).
_CLICK_BIAS = -1.6
_CVR_BIAS = -2.5
_CLICK_ID_SCALE = 0.6
_CVR_ID_SHARED = 0.5  # conversion id effects = 0.5 * click effects + independent N(0, 0.5^2)
_CVR_ID_SCALE = 0.5
_CLICK_DENSE_COEF = (0.6, -0.4)
_CVR_DENSE_COEF = (0.3, 0.5)


def ctr_vocab_sizes(
    num_sparse: int = 26, *, vocab_min: int = 10, vocab_max: int = 100_000
) -> list[int]:
    """Vocabulary size of each sparse column ``c0 ..``: geometric from ``vocab_min`` to
    ``vocab_max``, rounded to integers.

    Args:
        num_sparse: number of sparse columns.
        vocab_min: vocabulary size of ``c0`` (at least 1).
        vocab_max: vocabulary size of the last column (at least ``vocab_min``).

    Returns:
        ``num_sparse`` integers; column ``c{j}`` holds ids in ``[0, sizes[j])``.
    """
    if num_sparse < 0:
        raise ConfigError(f"num_sparse must be >= 0, got {num_sparse}")
    if vocab_min < 1 or vocab_max < vocab_min:
        raise ConfigError(
            f"need 1 <= vocab_min <= vocab_max, got vocab_min={vocab_min}, vocab_max={vocab_max}"
        )
    sizes = np.rint(np.geomspace(vocab_min, vocab_max, num_sparse)).astype(np.int64)
    return [int(v) for v in sizes]


def ctr_dense_is_nonnegative(i: int) -> bool:
    """Whether dense column ``d{i}`` of :func:`make_ctr_table` is non-negative.

    Columns cycle through five kinds by ``i % 5``: 0, 1, 2 lognormal (sigma 0.75, 1.25, 1.75,
    increasingly heavy-tailed), 3 integer counts ``floor(lognormal(0.5, 1.5))`` (many zeros),
    4 signed Gaussian ``N(0.5, 2^2)``. Only kind 4 can be negative.

    Args:
        i: dense column index.

    Returns:
        True unless ``i % 5 == 4``.
    """
    return i % 5 != 4


def _dense_column(rng: np.random.Generator, i: int, n: int) -> np.ndarray:
    kind = i % 5
    if kind < 3:
        return rng.lognormal(mean=0.0, sigma=0.75 + 0.5 * kind, size=n)
    if kind == 3:
        return np.floor(rng.lognormal(mean=0.5, sigma=1.5, size=n))
    return rng.normal(0.5, 2.0, size=n)


def _dense_signal(values: np.ndarray, i: int) -> np.ndarray:
    """A fixed, roughly centred transform of dense column ``i`` for the hidden label model."""
    if ctr_dense_is_nonnegative(i):
        return np.log1p(values) - math.log(2.0)  # every non-negative kind has median ~1
    return (values - 0.5) / 2.0


def _zipf_pmf(vocab: int, a: float) -> np.ndarray:
    """``P(k)`` proportional to ``(k + 1)^-a`` for ``0 <= k < vocab``."""
    weights = np.arange(1, vocab + 1, dtype=np.float64) ** (-a)
    return weights / weights.sum()


def _zipf_ids(rng: np.random.Generator, vocab: int, a: float, n: int) -> np.ndarray:
    """``n`` ids in ``[0, vocab)`` drawn from :func:`_zipf_pmf` by inverse CDF."""
    cdf = np.cumsum(_zipf_pmf(vocab, a))
    cdf /= cdf[-1]
    ids = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(ids, vocab - 1).astype(np.int64, copy=False)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * v))


def make_ctr_table(
    n: int,
    *,
    num_sparse: int = 26,
    num_dense: int = 13,
    vocab_min: int = 10,
    vocab_max: int = 100_000,
    zipf_a: float = 1.2,
    seed: int = 0,
    model_seed: int | None = None,
) -> pa.Table:
    """A click-log-like table (Criteo-shaped by default) for speed benchmarks.

    Columns:

    * ``c0 .. c{num_sparse-1}``, int64 ids. Column ``c{j}`` has vocabulary size
      ``ctr_vocab_sizes(...)[j]`` (geometric from ``vocab_min`` to ``vocab_max``) and ids drawn
      from a Zipf law truncated to the vocabulary, ``P(k) ~ (k + 1)^-zipf_a`` for
      ``0 <= k < vocab``: id 0 is the most frequent and frequencies decrease with the id.
    * ``d0 .. d{num_dense-1}``, float32, kinds as in :func:`ctr_dense_is_nonnegative`.
    * ``click`` and ``conversion``, int8 in ``{0, 1}``, from a hidden logistic model:
      ``logit(P(click)) = -1.6 + sum_j e_j[c_j] + 0.6*g(d0) - 0.4*g(d1)`` and
      ``logit(P(convert | click)) = -2.5 + sum_j f_j[c_j] + 0.3*g(d0) + 0.5*g(d1)``, where ``j``
      runs over the sparse columns ``0``, ``num_sparse // 2`` and ``num_sparse - 1``, the per-id
      effects are ``e_j ~ N(0, 0.6^2)`` and ``f_j = 0.5*e_j + N(0, 0.5^2)`` (correlated with the
      click effects), and ``g(v) = log1p(v) - log 2`` for non-negative columns
      (``(v - 0.5) / 2`` for signed ones). ``conversion`` is 1 only on clicked rows (a click
      followed by a conversion), so it is rarer than ``click`` and positively correlated with it.
      With the defaults about 20% of rows are clicks and 2.5% conversions (the per-id effects
      are centred under the id distribution, which keeps these rates stable across seeds).

    The hidden model comes from ``model_seed`` (default ``seed``); the features and labels from
    ``seed``. For separate train / test calls keep ``model_seed`` fixed, or generate once and split.
    The generation parameters are stored as JSON under the key ``mtlrec.synthetic`` of the
    table's schema metadata.

    Args:
        n: number of rows.
        num_sparse: number of sparse id columns.
        num_dense: number of dense columns.
        vocab_min: vocabulary size of ``c0``.
        vocab_max: vocabulary size of the last sparse column.
        zipf_a: Zipf exponent (> 0); larger is more skewed.
        seed: seed of the ids (stream 1, one sub-stream per column), dense values (stream 2,
            likewise) and label draws (stream 3).
        model_seed: seed of the hidden label model (stream 0); ``None`` uses ``seed``.

    Returns:
        The table, columns in the order sparse, dense, ``click``, ``conversion``.
    """
    n = _check_n(n)
    seed = _check_seed("seed", seed)
    mseed = seed if model_seed is None else _check_seed("model_seed", model_seed)
    if num_dense < 0:
        raise ConfigError(f"num_dense must be >= 0, got {num_dense}")
    if num_sparse + num_dense < 1:
        raise ConfigError("need at least one sparse or dense column")
    if not math.isfinite(zipf_a) or zipf_a <= 0:
        raise ConfigError(f"zipf_a must be > 0, got {zipf_a}")
    vocab = ctr_vocab_sizes(num_sparse, vocab_min=vocab_min, vocab_max=vocab_max)

    # Hidden model: per-id effects of a few sparse columns, coefficients of d0, d1.
    model_rng = _rng(mseed, _STREAM_CTR_MODEL)
    label_sparse = sorted({0, num_sparse // 2, num_sparse - 1}) if num_sparse else []
    click_effects: dict[int, np.ndarray] = {}
    cvr_effects: dict[int, np.ndarray] = {}
    for j in label_sparse:
        pmf = _zipf_pmf(vocab[j], float(zipf_a))
        e = model_rng.normal(0.0, _CLICK_ID_SCALE, size=vocab[j])
        f = _CVR_ID_SHARED * e + model_rng.normal(0.0, _CVR_ID_SCALE, size=vocab[j])
        # Centre under the id distribution so that the head ids do not swing the label rates.
        click_effects[j] = e - pmf @ e
        cvr_effects[j] = f - pmf @ f
    label_dense = list(range(min(2, num_dense)))

    # One sub-stream per column, so that rows are prefix-stable across n.
    columns: dict[str, np.ndarray] = {}
    click_logit = np.full(n, _CLICK_BIAS)
    cvr_logit = np.full(n, _CVR_BIAS)
    for j, v in enumerate(vocab):
        ids = _zipf_ids(_rng(seed, _STREAM_CTR_SPARSE, j), v, float(zipf_a), n)
        columns[f"c{j}"] = ids
        if j in click_effects:
            click_logit += click_effects[j][ids]
            cvr_logit += cvr_effects[j][ids]

    for i in range(num_dense):
        values = _dense_column(_rng(seed, _STREAM_CTR_DENSE, i), i, n).astype(np.float32)
        columns[f"d{i}"] = values
        if i in label_dense:
            g = _dense_signal(values.astype(np.float64), i)
            click_logit += _CLICK_DENSE_COEF[i] * g
            cvr_logit += _CVR_DENSE_COEF[i] * g

    u = _rng(seed, _STREAM_CTR_LABELS).random((n, 2))
    click = u[:, 0] < _sigmoid(click_logit)
    conversion = click & (u[:, 1] < _sigmoid(cvr_logit))
    columns["click"] = click.astype(np.int8)
    columns["conversion"] = conversion.astype(np.int8)

    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    meta = {
        "generator": "make_ctr_table",
        "n": n,
        "num_sparse": num_sparse,
        "num_dense": num_dense,
        "vocab_min": vocab_min,
        "vocab_max": vocab_max,
        "vocab_sizes": vocab,
        "zipf_a": float(zipf_a),
        "seed": seed,
        "model_seed": mseed,
        "label_sparse_columns": [f"c{j}" for j in label_sparse],
        "label_dense_columns": [f"d{i}" for i in label_dense],
    }
    return table.replace_schema_metadata({"mtlrec.synthetic": json.dumps(meta)})


def ctr_schema(num_sparse: int = 26, num_dense: int = 13, *, embedding_dim: int = 16) -> Schema:
    """The schema of :func:`make_ctr_table` tables.

    Args:
        num_sparse: number of sparse columns ``c0 ..``.
        num_dense: number of dense columns ``d0 ..``.
        embedding_dim: embedding width of every sparse feature.

    Returns:
        A :class:`SparseFeature` per ``c`` column, a :class:`DenseFeature` per ``d`` column
        (``log1p_standardize`` for the non-negative columns, ``standardize`` for the signed ones)
        and two binary tasks ``click`` and ``conversion``. ``conversion`` carries no mask: it is
        the click-and-convert label over all rows; a post-click CVR task would add
        ``mask="click"``.
    """
    if num_sparse < 0 or num_dense < 0 or num_sparse + num_dense < 1:
        raise ConfigError(
            f"need num_sparse, num_dense >= 0 and at least one column, got {num_sparse}, "
            f"{num_dense}"
        )
    sparse = [SparseFeature(name=f"c{j}", embedding_dim=embedding_dim) for j in range(num_sparse)]
    dense = [
        DenseFeature(
            name=f"d{i}",
            transform="log1p_standardize" if ctr_dense_is_nonnegative(i) else "standardize",
        )
        for i in range(num_dense)
    ]
    return Schema(
        features=(*sparse, *dense),
        tasks=(TaskSpec(name="click", kind="binary"), TaskSpec(name="conversion", kind="binary")),
    )
