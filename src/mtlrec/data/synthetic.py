"""Synthetic data sets: the MMoE paper's two regression tasks and a CTR-style table.

Two generators live here.

:func:`make_mmoe_synthetic` follows Section 3.2 of Ma et al., "Modeling Task Relationships in
Multi-task Learning with Multi-gate Mixture-of-Experts" (KDD 2018). The paper builds two regression
tasks whose relatedness is set by one number, the cosine similarity ``p`` of two weight vectors:

1. Given the input dimension ``d``, take two orthogonal unit vectors ``u1, u2`` in ``R^d``.
2. Given a scale constant ``c`` and a correlation score ``-1 <= p <= 1``, set
   ``w1 = c * u1`` and ``w2 = c * (p * u1 + sqrt(1 - p**2) * u2)``; then ``cos(w1, w2) = p``.
3. Draw an input ``x`` in ``R^d`` with every element from ``N(0, 1)``.
4. Set ``y_k = w_k^T x + sum_{i=1..m} sin(alpha_i * w_k^T x + beta_i) + eps_k`` for ``k = 1, 2``,
   with the same ``alpha_i, beta_i`` for both tasks and ``eps_1, eps_2`` i.i.d. ``N(0, 0.01)``.
5. Repeat steps 3 and 4 until there are enough rows.

The paper calls ``p`` the "task correlation" and reports the resulting label Pearson correlation
in its Figure 2 (10k rows per point, mean of 100 trials). What the paper does *not* give, and this
module therefore fixes explicitly in :class:`MMoESyntheticConfig` presets:

* ``c``, ``m``, ``alpha_i`` and ``beta_i`` (the paper only says they are "given parameters");
* ``d`` for Figure 2 (Section 5 uses input dimension 100 for its experiments, so we use 100);
* how ``u1, u2`` are drawn (here: QR decomposition of a seeded ``d x 2`` Gaussian matrix, with
  the signs fixed so that ``R`` has a positive diagonal);
* whether 0.01 is the variance or the standard deviation of the noise (we read ``N(0, 0.01)`` in
  the usual way, as variance 0.01, i.e. standard deviation 0.1).

The label distribution depends on ``u1, u2`` only through ``p`` (``x`` is isotropic), so every
weights seed gives the same label correlation; :func:`mmoe_label_correlation` computes it in closed
form. With the ``"mmoe-fig2"`` preset (``d=100, c=1, m=10``, ``alpha`` evenly spaced from 2 to 8,
``beta_i = 2*pi*(i-1)/10``) it is about 0.074 at ``p=0.5``, 0.272 at ``p=0.9`` and 0.9992 at
``p=1``, matching the values read off the paper's Figure 2 (about 0.07, 0.27 and 1.0).

:func:`make_ctr_table` builds a click-log-like table for speed benchmarks: Zipf-distributed
categorical ids, skewed non-negative numeric columns, and ``click`` / ``conversion`` labels drawn
from a hidden logistic model so that a model has something to learn.

Seeding: every generator takes ``seed`` and draws from independent streams
``numpy.random.default_rng(numpy.random.SeedSequence(seed, spawn_key=(k,)))`` (the ``k``-th child
of ``SeedSequence(seed).spawn``), one stream per ingredient. Rows are drawn sequentially, so a
call with ``n`` rows returns the first ``n`` rows of any larger call with the same arguments.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from mtlrec.errors import ConfigError
from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec

__all__ = [
    "MMOE_PRESETS",
    "MMoESyntheticConfig",
    "ctr_dense_is_nonnegative",
    "ctr_schema",
    "ctr_vocab_sizes",
    "make_ctr_table",
    "make_mmoe_synthetic",
    "mmoe_label_correlation",
    "mmoe_synthetic_schema",
    "mmoe_weight_vectors",
]

# Stream numbers under one seed (see the module docstring).
_STREAM_WEIGHTS = 0
_STREAM_INPUTS = 1
_STREAM_NOISE = 2
_STREAM_CTR_MODEL = 0
_STREAM_CTR_SPARSE = 1
_STREAM_CTR_DENSE = 2
_STREAM_CTR_LABELS = 3


def _rng(seed: int, stream: int, *sub: int) -> np.random.Generator:
    """Independent generator number ``stream`` (optionally sub-stream ``sub``) under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, *sub)))


def _check_seed(name: str, seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ConfigError(f"n must be a non-negative integer, got {n!r}")
    return int(n)


# ---------------------------------------------------------------------------------------------
# MMoE synthetic regression tasks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMoESyntheticConfig:
    """Every constant of the MMoE synthetic-data recipe (Ma et al., KDD 2018, Section 3.2).

    Args:
        name: a label recorded in the metadata (the preset name for presets).
        d: input dimension (at least 2, so that two orthogonal unit vectors exist).
        c: scale constant of the weight vectors, ``w1 = c*u1``.
        m: number of sinusoids added to each label.
        alphas: the ``m`` frequencies ``alpha_i`` (shared by both tasks).
        betas: the ``m`` phases ``beta_i`` (shared by both tasks).
        noise_var: variance of the label noise ``eps_k`` (the paper's ``N(0, 0.01)``).
        basis: how ``u1, u2`` are drawn. Only ``"qr"``: the Q factor of a ``d x 2`` standard
            Gaussian matrix drawn from the weights stream, with column signs chosen so that the
            R factor has a positive diagonal (so the result does not depend on the LAPACK build).
    """

    name: str
    d: int
    c: float
    m: int
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    noise_var: float
    basis: Literal["qr"] = "qr"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.d < 2:
            raise ConfigError(f"MMoE synthetic config {self.name!r}: d must be >= 2, got {self.d}")
        if self.m < 0:
            raise ConfigError(f"MMoE synthetic config {self.name!r}: m must be >= 0, got {self.m}")
        if len(self.alphas) != self.m or len(self.betas) != self.m:
            raise ConfigError(
                f"MMoE synthetic config {self.name!r}: expected m={self.m} alphas and betas, "
                f"got {len(self.alphas)} and {len(self.betas)}"
            )
        if not math.isfinite(self.c) or self.c <= 0:
            raise ConfigError(f"MMoE synthetic config {self.name!r}: c must be > 0, got {self.c}")
        if not math.isfinite(self.noise_var) or self.noise_var < 0:
            raise ConfigError(
                f"MMoE synthetic config {self.name!r}: noise_var must be >= 0, got {self.noise_var}"
            )
        if not all(math.isfinite(v) for v in (*self.alphas, *self.betas)):
            raise ConfigError(f"MMoE synthetic config {self.name!r}: alphas/betas must be finite")
        if self.basis != "qr":
            raise ConfigError(
                f"MMoE synthetic config {self.name!r}: unknown basis {self.basis!r} (expected 'qr')"
            )

    def to_dict(self) -> dict[str, Any]:
        """The constants as a JSON-ready dict."""
        return {
            "preset": self.name,
            "d": self.d,
            "c": self.c,
            "m": self.m,
            "alphas": list(self.alphas),
            "betas": list(self.betas),
            "noise_var": self.noise_var,
            "basis": self.basis,
        }


# ``np.linspace(2, 8, 10)`` and ``2*pi*(i-1)/10`` for i = 1..10, written out.
_FIG2_ALPHAS = tuple(float(a) for a in np.linspace(2.0, 8.0, 10))
_FIG2_BETAS = tuple(2.0 * math.pi * i / 10.0 for i in range(10))

# Drawn once with ``rng = np.random.default_rng(2020); rng.standard_normal(10)`` (alphas), then
# ``rng.standard_normal(10)`` again (betas), and frozen here as literals so that the preset does
# not depend on NumPy's generator staying bit-stable.
_PLE2020_SEED = 2020
_PLE2020_ALPHAS = (
    1.2602066112249388,
    0.22317849046722027,
    1.3325486909879762,
    -1.4182046378124729,
    -0.27279702142236956,
    0.06677797755482734,
    0.25101714838199357,
    0.2726848347212902,
    -1.7605048751602634,
    1.0879701068968077,
)
_PLE2020_BETAS = (
    -0.5625310158178212,
    0.5841280976026738,
    0.3847837988854877,
    0.44901487453050803,
    0.08542177575227196,
    1.3326659891742394,
    -0.8976709950123606,
    -0.48062446011680615,
    -0.8170049416572752,
    2.9790426798271477,
)

MMOE_PRESETS: dict[str, MMoESyntheticConfig] = {
    # Reproduces the paper's Figure 2 (label correlation ~0.07 / 0.27 / 1.0 at p = 0.5 / 0.9 / 1).
    # d=100 is the input dimension of the paper's Section 5; c, m, alphas, betas are our choice.
    "mmoe-fig2": MMoESyntheticConfig(
        name="mmoe-fig2",
        d=100,
        c=1.0,
        m=10,
        alphas=_FIG2_ALPHAS,
        betas=_FIG2_BETAS,
        noise_var=0.01,
    ),
    # The setting used by later work on the same recipe (e.g. the PLE paper, Tang et al.,
    # RecSys 2020): d=512, m=10, alphas and betas from N(0, 1) -- here one fixed draw (seed 2020).
    # These small frequencies keep the labels closer to linear in w_k^T x, so the label
    # correlation stays nearer p (about 0.42 / 0.85 / 0.99 at p = 0.5 / 0.9 / 1).
    "ple2020": MMoESyntheticConfig(
        name="ple2020",
        d=512,
        c=1.0,
        m=10,
        alphas=_PLE2020_ALPHAS,
        betas=_PLE2020_BETAS,
        noise_var=0.01,
    ),
}


def _resolve_preset(preset: str | MMoESyntheticConfig) -> MMoESyntheticConfig:
    if isinstance(preset, MMoESyntheticConfig):
        return preset
    try:
        return MMOE_PRESETS[preset]
    except KeyError:
        raise ConfigError(
            f"unknown MMoE synthetic preset {preset!r}; presets are {sorted(MMOE_PRESETS)}"
        ) from None


def _check_correlation(correlation: float) -> float:
    p = float(correlation)
    if not (-1.0 <= p <= 1.0):
        raise ConfigError(f"correlation must lie in [-1, 1], got {correlation!r}")
    return p


def mmoe_weight_vectors(
    correlation: float,
    *,
    preset: str | MMoESyntheticConfig = "mmoe-fig2",
    weights_seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The unit vectors and weight vectors of steps 1-2 of the recipe.

    Args:
        correlation: the correlation score ``p`` in ``[-1, 1]``; ``cos(w1, w2) = p``.
        preset: a preset name from :data:`MMOE_PRESETS` or a config.
        weights_seed: seed of the weights stream (stream 0); the same seed always gives the same
            ``u1, u2``.

    Returns:
        ``(u1, u2, w1, w2)``, float64 arrays of length ``d``: ``u1, u2`` orthonormal,
        ``w1 = c*u1`` and ``w2 = c*(p*u1 + sqrt(1-p^2)*u2)``.
    """
    cfg = _resolve_preset(preset)
    p = _check_correlation(correlation)
    rng = _rng(_check_seed("weights_seed", weights_seed), _STREAM_WEIGHTS)
    g = rng.standard_normal((cfg.d, 2))
    q, r = np.linalg.qr(g)
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    q = q * signs
    u1 = np.ascontiguousarray(q[:, 0])
    u2 = np.ascontiguousarray(q[:, 1])
    w1 = cfg.c * u1
    w2 = cfg.c * (p * u1 + math.sqrt(max(0.0, 1.0 - p * p)) * u2)
    return u1, u2, w1, w2


def mmoe_label_correlation(
    correlation: float, preset: str | MMoESyntheticConfig = "mmoe-fig2"
) -> float:
    """Population Pearson correlation of ``y1, y2`` for a given ``p``, in closed form.

    With ``s = w1^T x`` and ``t = w2^T x`` jointly Gaussian (variance ``c^2``, covariance
    ``c^2 p``), the moments of ``sin(alpha*s + beta)`` follow from the Gaussian characteristic
    function and Stein's lemma:

    * ``E sin(a s + b) = sin(b) exp(-a^2 c^2 / 2)``;
    * ``E sin(a s + b) sin(a' t + b') = (cos(b-b') exp(-c^2 (a^2 + a'^2 - 2 a a' p) / 2)
      - cos(b+b') exp(-c^2 (a^2 + a'^2 + 2 a a' p) / 2)) / 2``;
    * ``Cov(s, sin(a' t + b')) = c^2 p a' cos(b') exp(-a'^2 c^2 / 2)``.

    The label variance is the same expression at ``p = 1`` plus ``noise_var``. The result does not
    depend on ``u1, u2`` or on ``d``. It is not odd in ``p`` (the phases ``beta_i`` break the
    symmetry): with ``"mmoe-fig2"`` it is about -0.13 at ``p = -0.9`` and -0.02 at ``p = -1``.

    Args:
        correlation: the correlation score ``p`` (cosine of the weight vectors) in ``[-1, 1]``.
        preset: a preset name from :data:`MMOE_PRESETS` or a config.

    Returns:
        The expected Pearson correlation of the two labels (what the sample correlation converges
        to as ``n`` grows).
    """
    cfg = _resolve_preset(preset)
    p = _check_correlation(correlation)
    a = np.asarray(cfg.alphas, dtype=np.float64)
    b = np.asarray(cfg.betas, dtype=np.float64)
    c2 = cfg.c * cfg.c

    def cov(rho: float) -> float:
        mean = np.sin(b) * np.exp(-0.5 * c2 * a * a)
        ai, aj = a[:, None], a[None, :]
        bi, bj = b[:, None], b[None, :]
        prod = 0.5 * (
            np.cos(bi - bj) * np.exp(-0.5 * c2 * (ai * ai + aj * aj - 2.0 * rho * ai * aj))
            - np.cos(bi + bj) * np.exp(-0.5 * c2 * (ai * ai + aj * aj + 2.0 * rho * ai * aj))
        )
        sin_sin = float(np.sum(prod - mean[:, None] * mean[None, :]))
        lin_sin = float(np.sum(c2 * rho * a * np.cos(b) * np.exp(-0.5 * c2 * a * a)))
        return c2 * rho + 2.0 * lin_sin + sin_sin

    var = cov(1.0) + cfg.noise_var
    return cov(p) / var if var > 0 else float("nan")


def make_mmoe_synthetic(
    correlation: float,
    n: int,
    *,
    preset: str | MMoESyntheticConfig = "mmoe-fig2",
    seed: int = 0,
    weights_seed: int | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Two regression tasks with controlled relatedness (Ma et al., KDD 2018, Section 3.2).

    One ``seed`` is one data set: the weight vectors come from ``weights_seed`` (by default equal
    to ``seed``), the inputs and the noise from ``seed``. For train / valid / test splits of one
    experiment the weight vectors must be shared; either generate all rows in one call and split
    the table, or call once per split with the same ``weights_seed`` and different ``seed`` values.

    Args:
        correlation: the correlation score ``p`` in ``[-1, 1]``, the cosine similarity of the two
            weight vectors (the paper's "task correlation"; not the label correlation, which is
            smaller for the nonlinear labels, see :func:`mmoe_label_correlation`).
        n: number of rows.
        preset: a preset name from :data:`MMOE_PRESETS` or an explicit config.
        seed: seed of the inputs (stream 1) and the noise (stream 2).
        weights_seed: seed of ``u1, u2`` (stream 0); ``None`` uses ``seed``.

    Returns:
        ``(table, metadata)``. The table has float32 columns ``x0 .. x{d-1}`` and float64 labels
        ``y1, y2``; the labels are computed from the float32 inputs as stored. The metadata holds
        every constant used (``preset``, ``d``, ``c``, ``m``, ``alphas``, ``betas``,
        ``noise_var``, ``basis``, ``correlation``, ``seed``, ``weights_seed``, ``n``) plus
        ``weight_cosine`` (the realised ``cos(w1, w2)``), ``label_correlation`` (the sample
        Pearson correlation of ``y1, y2``; ``None`` below two rows or for constant labels) and
        ``expected_label_correlation`` (its population value).
    """
    cfg = _resolve_preset(preset)
    p = _check_correlation(correlation)
    n = _check_n(n)
    seed = _check_seed("seed", seed)
    wseed = seed if weights_seed is None else _check_seed("weights_seed", weights_seed)

    _, _, w1, w2 = mmoe_weight_vectors(p, preset=cfg, weights_seed=wseed)
    w = np.stack([w1, w2], axis=1).astype(np.float32)  # (d, 2)

    x = _rng(seed, _STREAM_INPUTS).standard_normal((n, cfg.d), dtype=np.float32)
    z = (x @ w).astype(np.float64)  # (n, 2): w_k^T x
    y = z.copy()
    if cfg.m:
        alphas = np.asarray(cfg.alphas, dtype=np.float64)
        betas = np.asarray(cfg.betas, dtype=np.float64)
        y += np.sin(z[:, :, None] * alphas + betas).sum(axis=2)
    if cfg.noise_var > 0:
        y += _rng(seed, _STREAM_NOISE).normal(0.0, math.sqrt(cfg.noise_var), size=(n, 2))

    xt = np.ascontiguousarray(x.T)
    columns: dict[str, pa.Array] = {f"x{i}": pa.array(xt[i]) for i in range(cfg.d)}
    columns["y1"] = pa.array(np.ascontiguousarray(y[:, 0]))
    columns["y2"] = pa.array(np.ascontiguousarray(y[:, 1]))
    table = pa.table(columns)

    label_corr: float | None = None
    if n >= 2 and float(np.std(y[:, 0])) > 0 and float(np.std(y[:, 1])) > 0:
        label_corr = float(np.corrcoef(y[:, 0], y[:, 1])[0, 1])
    meta: dict[str, Any] = cfg.to_dict()
    meta.update(
        correlation=p,
        seed=seed,
        weights_seed=wseed,
        n=n,
        weight_cosine=float(w1 @ w2 / (np.linalg.norm(w1) * np.linalg.norm(w2))),
        label_correlation=label_corr,
        expected_label_correlation=mmoe_label_correlation(p, cfg),
    )
    return table, meta


def mmoe_synthetic_schema(d: int) -> Schema:
    """The schema of :func:`make_mmoe_synthetic` tables.

    Args:
        d: input dimension (the preset's ``d``).

    Returns:
        ``d`` dense features ``x0 .. x{d-1}`` (no transform; the inputs are already standard
        normal) and two regression tasks ``y1``, ``y2``.
    """
    if d < 1:
        raise ConfigError(f"d must be >= 1, got {d}")
    return Schema(
        features=tuple(DenseFeature(name=f"x{i}", transform="none") for i in range(d)),
        tasks=(TaskSpec(name="y1", kind="regression"), TaskSpec(name="y2", kind="regression")),
    )


# ---------------------------------------------------------------------------------------------
# CTR-style table
# ---------------------------------------------------------------------------------------------

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
