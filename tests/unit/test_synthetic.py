"""Tests of mtlrec.data.synthetic: the MMoE paper's synthetic tasks and the CTR benchmark table."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from mtlrec.data.synthetic import (
    MMOE_PRESETS,
    MMoESyntheticConfig,
    ctr_dense_is_nonnegative,
    ctr_schema,
    ctr_vocab_sizes,
    make_ctr_table,
    make_mmoe_synthetic,
    mmoe_label_correlation,
    mmoe_synthetic_schema,
    mmoe_weight_vectors,
)
from mtlrec.errors import ConfigError
from mtlrec.schema import DenseFeature, SparseFeature

# Label Pearson correlation read off Figure 2 of Ma et al. (KDD 2018) at weight cosine p.
FIG2 = [(0.5, 0.07), (0.9, 0.27), (1.0, 1.0)]


def _xy(table: pa.Table, d: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.column_stack([table[f"x{i}"].to_numpy() for i in range(d)])
    y = np.column_stack([table["y1"].to_numpy(), table["y2"].to_numpy()])
    return x, y


# -- MMoE: Figure 2 --------------------------------------------------------------------------


@pytest.mark.parametrize(("p", "target"), FIG2)
def test_fig2_label_correlation_realised(p: float, target: float) -> None:
    _, meta = make_mmoe_synthetic(p, 200_000, preset="mmoe-fig2", seed=0)
    assert meta["label_correlation"] == pytest.approx(target, abs=0.03)


@pytest.mark.parametrize(("p", "target"), FIG2)
def test_fig2_label_correlation_closed_form(p: float, target: float) -> None:
    assert mmoe_label_correlation(p, "mmoe-fig2") == pytest.approx(target, abs=0.03)


def test_fig2_correlation_increases_with_p() -> None:
    values = [mmoe_label_correlation(p) for p in np.linspace(0.0, 1.0, 11)]
    assert np.all(np.diff(values) > 0)
    assert values[0] == pytest.approx(0.0, abs=1e-12)  # independent projections
    # Not odd in p: sin(-a*s + b) != -sin(a*s + b) when b != 0, so p = -1 is nearly uncorrelated.
    assert mmoe_label_correlation(-1.0) == pytest.approx(-0.022, abs=0.005)


@pytest.mark.parametrize(
    ("preset", "p", "n"),
    [("mmoe-fig2", -0.5, 100_000), ("mmoe-fig2", 0.0, 100_000), ("ple2020", 0.5, 40_000)],
)
def test_sample_correlation_matches_closed_form(preset: str, p: float, n: int) -> None:
    _, meta = make_mmoe_synthetic(p, n, preset=preset, seed=3)
    assert meta["expected_label_correlation"] == mmoe_label_correlation(p, preset)
    assert meta["label_correlation"] == pytest.approx(meta["expected_label_correlation"], abs=0.02)


def test_linear_case_gives_label_correlation_p() -> None:
    """Without sinusoids the paper notes the label correlation is exactly p (up to noise)."""
    cfg = MMoESyntheticConfig(name="linear", d=8, c=1.0, m=0, alphas=(), betas=(), noise_var=0.0)
    assert mmoe_label_correlation(0.3, cfg) == pytest.approx(0.3)
    _, meta = make_mmoe_synthetic(0.3, 100_000, preset=cfg, seed=1)
    assert meta["label_correlation"] == pytest.approx(0.3, abs=0.01)


# -- MMoE: the recipe itself ------------------------------------------------------------------


@pytest.mark.parametrize("p", [-1.0, -0.3, 0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("weights_seed", [0, 7])
def test_weight_vectors_orthonormal_and_cosine(p: float, weights_seed: int) -> None:
    u1, u2, w1, w2 = mmoe_weight_vectors(p, preset="mmoe-fig2", weights_seed=weights_seed)
    assert u1.shape == u2.shape == (100,)
    assert float(u1 @ u2) == pytest.approx(0.0, abs=1e-12)
    assert float(np.linalg.norm(u1)) == pytest.approx(1.0)
    assert float(np.linalg.norm(u2)) == pytest.approx(1.0)
    np.testing.assert_allclose(w1, u1)
    cos = float(w1 @ w2 / (np.linalg.norm(w1) * np.linalg.norm(w2)))
    assert cos == pytest.approx(p, abs=1e-12)


def test_weight_vectors_scale_c() -> None:
    cfg = MMoESyntheticConfig(
        name="c2", d=5, c=2.0, m=1, alphas=(1.0,), betas=(0.0,), noise_var=0.01
    )
    _, _, w1, w2 = mmoe_weight_vectors(0.4, preset=cfg, weights_seed=1)
    assert float(np.linalg.norm(w1)) == pytest.approx(2.0)
    assert float(np.linalg.norm(w2)) == pytest.approx(2.0)
    assert float(w1 @ w2) == pytest.approx(4.0 * 0.4)


def test_weight_vectors_depend_on_seed_only() -> None:
    a = mmoe_weight_vectors(0.5, weights_seed=1)
    b = mmoe_weight_vectors(0.5, weights_seed=1)
    c = mmoe_weight_vectors(0.5, weights_seed=2)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.allclose(a[0], c[0])


def test_labels_follow_the_paper_formula() -> None:
    """Recompute y from the stored x: the residual is the N(0, 0.01) noise."""
    cfg = MMOE_PRESETS["mmoe-fig2"]
    table, meta = make_mmoe_synthetic(0.7, 50_000, seed=5)
    _, _, w1, w2 = mmoe_weight_vectors(0.7, weights_seed=meta["weights_seed"])
    x, y = _xy(table, cfg.d)
    a = np.asarray(cfg.alphas)
    b = np.asarray(cfg.betas)
    for k, w in enumerate((w1, w2)):
        z = x.astype(np.float64) @ w
        clean = z + np.sin(z[:, None] * a + b).sum(axis=1)
        eps = y[:, k] - clean
        assert abs(float(eps.mean())) < 0.003
        assert float(eps.var()) == pytest.approx(0.01, rel=0.05)
    assert float(np.corrcoef(y[:, 0], y[:, 1])[0, 1]) == pytest.approx(meta["label_correlation"])


def test_inputs_standard_normal() -> None:
    table, _ = make_mmoe_synthetic(0.5, 20_000, seed=2)
    x, _ = _xy(table, 100)
    assert abs(float(x.mean())) < 0.01
    assert float(x.std()) == pytest.approx(1.0, abs=0.01)


# -- MMoE: table, metadata, determinism -------------------------------------------------------


def test_table_columns_and_dtypes() -> None:
    table, meta = make_mmoe_synthetic(0.5, 1_000, seed=0)
    d = MMOE_PRESETS["mmoe-fig2"].d
    assert table.num_rows == 1_000
    assert table.column_names == [f"x{i}" for i in range(d)] + ["y1", "y2"]
    for i in range(d):
        assert table.schema.field(f"x{i}").type == pa.float32()
    assert table.schema.field("y1").type == pa.float64()
    assert table.schema.field("y2").type == pa.float64()
    json.dumps(meta)  # every entry is JSON-ready
    for key in (
        "preset", "d", "c", "m", "alphas", "betas", "noise_var", "basis",
        "correlation", "seed", "weights_seed", "n", "label_correlation",
        "expected_label_correlation", "weight_cosine",
    ):  # fmt: skip
        assert key in meta
    assert meta["preset"] == "mmoe-fig2"
    assert meta["n"] == 1_000 and meta["d"] == 100 and meta["m"] == 10
    assert meta["correlation"] == 0.5 and meta["weight_cosine"] == pytest.approx(0.5)


def test_ple2020_preset_shape() -> None:
    table, meta = make_mmoe_synthetic(0.2, 10, preset="ple2020", seed=0)
    assert table.num_columns == 512 + 2
    assert meta["preset"] == "ple2020" and meta["d"] == 512


def test_same_seed_same_table_other_seed_differs() -> None:
    a, ma = make_mmoe_synthetic(0.5, 2_000, seed=11)
    b, mb = make_mmoe_synthetic(0.5, 2_000, seed=11)
    c, _ = make_mmoe_synthetic(0.5, 2_000, seed=12)
    assert a.equals(b) and ma == mb
    assert not a.equals(c)


def test_weights_seed_shared_across_splits() -> None:
    """Train and test from different sample seeds but one weights seed share w1, w2."""
    train, mtrain = make_mmoe_synthetic(0.9, 3_000, seed=1, weights_seed=99)
    test, mtest = make_mmoe_synthetic(0.9, 3_000, seed=2, weights_seed=99)
    assert mtrain["weights_seed"] == mtest["weights_seed"] == 99
    assert not train.equals(test)
    _, _, w1, _ = mmoe_weight_vectors(0.9, weights_seed=99)
    cfg = MMOE_PRESETS["mmoe-fig2"]
    for table in (train, test):
        x, y = _xy(table, cfg.d)
        z = x.astype(np.float64) @ w1
        clean = z + np.sin(z[:, None] * np.asarray(cfg.alphas) + np.asarray(cfg.betas)).sum(1)
        assert float(np.abs(y[:, 0] - clean).max()) < 0.6  # noise sd 0.1: 6 sigma


def test_rows_are_prefix_stable() -> None:
    small, _ = make_mmoe_synthetic(0.5, 500, seed=4)
    large, _ = make_mmoe_synthetic(0.5, 1_500, seed=4)
    assert large.slice(0, 500).equals(small)


def test_small_n() -> None:
    empty, meta0 = make_mmoe_synthetic(0.5, 0)
    assert empty.num_rows == 0 and meta0["label_correlation"] is None
    one, meta1 = make_mmoe_synthetic(0.5, 1)
    assert one.num_rows == 1 and meta1["label_correlation"] is None


def test_preset_constants() -> None:
    fig2 = MMOE_PRESETS["mmoe-fig2"]
    assert (fig2.d, fig2.c, fig2.m, fig2.noise_var) == (100, 1.0, 10, 0.01)
    np.testing.assert_allclose(fig2.alphas, np.linspace(2.0, 8.0, 10))
    np.testing.assert_allclose(fig2.betas, [2 * math.pi * (i - 1) / 10 for i in range(1, 11)])
    ple = MMOE_PRESETS["ple2020"]
    assert (ple.d, ple.c, ple.m, ple.noise_var) == (512, 1.0, 10, 0.01)
    rng = np.random.default_rng(2020)  # the documented draw behind the frozen literals
    np.testing.assert_array_equal(ple.alphas, rng.standard_normal(10))
    np.testing.assert_array_equal(ple.betas, rng.standard_normal(10))


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError, match="preset"):
        make_mmoe_synthetic(0.5, 10, preset="nope")
    with pytest.raises(ConfigError, match="correlation"):
        make_mmoe_synthetic(1.5, 10)
    with pytest.raises(ConfigError, match="n must"):
        make_mmoe_synthetic(0.5, -1)
    with pytest.raises(ConfigError, match="seed"):
        make_mmoe_synthetic(0.5, 10, seed=-3)
    with pytest.raises(ConfigError, match="alphas"):
        MMoESyntheticConfig(
            name="bad", d=4, c=1.0, m=2, alphas=(1.0,), betas=(0.0, 1.0), noise_var=0.01
        )
    with pytest.raises(ConfigError, match="d must"):
        MMoESyntheticConfig(name="bad", d=1, c=1.0, m=0, alphas=(), betas=(), noise_var=0.0)


def test_mmoe_schema_matches_table() -> None:
    schema = mmoe_synthetic_schema(100)
    table, _ = make_mmoe_synthetic(0.5, 10)
    assert schema.input_columns() == [f"x{i}" for i in range(100)]
    assert schema.target_columns() == ["y1", "y2"]
    assert set(schema.input_columns() + schema.target_columns()) == set(table.column_names)
    assert all(isinstance(f, DenseFeature) and f.transform == "none" for f in schema.features)
    assert [t.kind for t in schema.tasks] == ["regression", "regression"]


# -- CTR table -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctr() -> pa.Table:
    return make_ctr_table(200_000, seed=0)


def test_ctr_columns_and_dtypes(ctr: pa.Table) -> None:
    assert ctr.num_rows == 200_000
    assert ctr.column_names == (
        [f"c{j}" for j in range(26)] + [f"d{i}" for i in range(13)] + ["click", "conversion"]
    )
    for j in range(26):
        assert ctr.schema.field(f"c{j}").type == pa.int64()
    for i in range(13):
        assert ctr.schema.field(f"d{i}").type == pa.float32()
    assert ctr.schema.field("click").type == pa.int8()
    assert ctr.schema.field("conversion").type == pa.int8()
    meta = json.loads(ctr.schema.metadata[b"mtlrec.synthetic"])
    assert meta["n"] == 200_000 and meta["vocab_sizes"] == ctr_vocab_sizes(26)


def test_ctr_vocab_sizes_geometric() -> None:
    sizes = ctr_vocab_sizes(26, vocab_min=10, vocab_max=100_000)
    assert len(sizes) == 26 and sizes[0] == 10 and sizes[-1] == 100_000
    ratios = np.asarray(sizes[1:]) / np.asarray(sizes[:-1])
    np.testing.assert_allclose(ratios, 10 ** (4 / 25), rtol=0.05)


def test_ctr_ids_within_vocab(ctr: pa.Table) -> None:
    for j, v in enumerate(ctr_vocab_sizes(26)):
        ids = ctr[f"c{j}"].to_numpy()
        assert ids.min() >= 0 and ids.max() < v


def test_ctr_zipf_skew(ctr: pa.Table) -> None:
    for j, v in enumerate(ctr_vocab_sizes(26)):
        counts = np.bincount(ctr[f"c{j}"].to_numpy(), minlength=v)
        head = counts[:5]
        assert np.all(np.diff(head) < 0), (j, head)
        # Truncated Zipf: P(0) / P(1) = 2 ** 1.2
        assert counts[0] / counts[1] == pytest.approx(2**1.2, rel=0.05)
    # The smallest vocabulary is nearly covered; the largest is dominated by its head.
    big = ctr["c25"].to_numpy()
    assert float(np.mean(big < 100)) > 0.4


def test_ctr_dense_values(ctr: pa.Table) -> None:
    for i in range(13):
        v = ctr[f"d{i}"].to_numpy()
        assert np.isfinite(v).all()
        if ctr_dense_is_nonnegative(i):
            assert v.min() >= 0
        else:
            assert v.min() < 0
    heavy = ctr["d2"].to_numpy()
    assert float(heavy.max()) > 50 * float(np.median(heavy))  # heavy right tail


def test_ctr_labels(ctr: pa.Table) -> None:
    click = ctr["click"].to_numpy()
    conv = ctr["conversion"].to_numpy()
    assert set(np.unique(click)) <= {0, 1} and set(np.unique(conv)) <= {0, 1}
    assert 0.15 < click.mean() < 0.25
    assert 0.01 < conv.mean() < 0.05
    assert np.all(conv <= click)  # a conversion follows a click
    assert np.corrcoef(click, conv)[0, 1] > 0.2


def test_ctr_labels_are_learnable(ctr: pa.Table) -> None:
    click = ctr["click"].to_numpy().astype(np.float64)
    d0 = ctr["d0"].to_numpy()
    lo, hi = np.quantile(d0, [0.25, 0.75])
    assert click[d0 > hi].mean() > click[d0 < lo].mean() + 0.05  # positive d0 coefficient
    d1 = ctr["d1"].to_numpy()
    lo, hi = np.quantile(d1, [0.25, 0.75])
    assert click[d1 > hi].mean() < click[d1 < lo].mean() - 0.03  # negative d1 coefficient
    c0 = ctr["c0"].to_numpy()
    rates = np.array([click[c0 == k].mean() for k in range(5)])
    assert rates.max() - rates.min() > 0.05  # per-id effects on c0
    # A column outside the hidden model carries no signal.
    c1 = ctr["c1"].to_numpy()
    rates1 = np.array([click[c1 == k].mean() for k in range(3)])
    assert rates1.max() - rates1.min() < 0.02


def test_ctr_determinism() -> None:
    a = make_ctr_table(5_000, seed=3)
    b = make_ctr_table(5_000, seed=3)
    c = make_ctr_table(5_000, seed=4)
    assert a.equals(b) and a.schema.metadata == b.schema.metadata
    assert not a.equals(c)
    assert make_ctr_table(8_000, seed=3).slice(0, 5_000).equals(a)


def test_ctr_model_seed_fixes_hidden_model() -> None:
    """Same model seed, different sample seeds: the same click-rate profile over c0 ids."""
    a = make_ctr_table(100_000, seed=1, model_seed=5)
    b = make_ctr_table(100_000, seed=2, model_seed=5)
    c = make_ctr_table(100_000, seed=2, model_seed=6)

    def profile(t: pa.Table) -> np.ndarray:
        click = t["click"].to_numpy().astype(np.float64)
        ids = t["c0"].to_numpy()
        return np.array([click[ids == k].mean() for k in range(3)])

    assert np.abs(profile(a) - profile(b)).max() < 0.02
    assert np.abs(profile(b) - profile(c)).max() > 0.02


def test_ctr_custom_shape() -> None:
    t = make_ctr_table(1_000, num_sparse=3, num_dense=2, vocab_min=5, vocab_max=50, seed=1)
    assert t.column_names == ["c0", "c1", "c2", "d0", "d1", "click", "conversion"]
    assert t["c2"].to_numpy().max() < 50
    only_dense = make_ctr_table(100, num_sparse=0, num_dense=1)
    assert only_dense.column_names == ["d0", "click", "conversion"]
    with pytest.raises(ConfigError):
        make_ctr_table(10, num_sparse=0, num_dense=0)
    with pytest.raises(ConfigError):
        make_ctr_table(10, zipf_a=0.0)
    with pytest.raises(ConfigError):
        make_ctr_table(10, vocab_min=100, vocab_max=10)


def test_ctr_schema_matches_table(ctr: pa.Table) -> None:
    schema = ctr_schema(embedding_dim=16)
    assert schema.input_columns() + schema.target_columns() == ctr.column_names
    for f in schema.features:
        if isinstance(f, SparseFeature):
            assert f.embedding_dim == 16
        else:
            assert isinstance(f, DenseFeature)
            i = int(f.name[1:])
            nonneg = float(ctr[f.name].to_numpy().min()) >= 0
            assert nonneg == ctr_dense_is_nonnegative(i)
            expected = "log1p_standardize" if nonneg else "standardize"
            assert f.transform == expected
    assert [(t.name, t.kind) for t in schema.tasks] == [
        ("click", "binary"),
        ("conversion", "binary"),
    ]
    assert ctr_schema(4, 2, embedding_dim=8).sparse[0].embedding_dim == 8
