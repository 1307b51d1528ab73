"""The MMoE paper's synthetic regression tasks (Ma et al., KDD 2018, Section 3.2).

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

"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from mtlrec.data.synthetic._common import _check_n, _check_seed, _rng
from mtlrec.errors import ConfigError
from mtlrec.schema import DenseFeature, Schema, TaskSpec

# Stream numbers under one seed (see the module docstring).
_STREAM_WEIGHTS = 0
_STREAM_INPUTS = 1
_STREAM_NOISE = 2


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
