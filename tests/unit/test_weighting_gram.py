"""The Gram matrix of the task gradients is formed in float64 (``gram64``), and the closed-form
strategies stay finite on non-finite gradients.

IMTL, MGDA, PE-LTR and CAGrad solve small systems built from the dot products of the task
gradients. A float32 product converted to float64 afterwards keeps float32's rounding, which
IMTL's differences of nearly equal dot products then amplify; these tests compare against
references computed from float64 copies of the same float32 gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlrec.weighting import build_weighting
from mtlrec.weighting._solvers import gram64

F64 = torch.float64


def _near_parallel(t: int, p: int, spread: float, seed: int) -> torch.Tensor:
    """``t`` float32 gradients that share one direction up to a relative ``spread``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(p, generator=g)
    rows = [base * (1.0 + 0.5 * k) + spread * torch.randn(p, generator=g) for k in range(t)]
    return torch.stack(rows).float()


@pytest.mark.parametrize(("p", "chunk"), [(50, 7), (64, 64), (1000, 1 << 18), (3, 1)])
def test_gram64_is_the_float64_product_over_any_chunking(p: int, chunk: int) -> None:
    j = _near_parallel(3, p, 0.1, seed=p)
    want = j.double() @ j.double().T
    got = gram64(j, chunk=chunk)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0.0)


def _imtl_reference(j: np.ndarray) -> np.ndarray:
    """IMTL-G (Liu et al. 2021, eq. 11) from the gradient vectors themselves, in float64:
    ``alpha_{2:T} = g_1 U^T (D U^T)^{-1}`` with rows ``D_t = g_1 - g_t``, ``U_t = u_1 - u_t``,
    ``alpha_1 = 1 - sum(alpha_{2:T})``; the strategy returns ``T alpha``."""
    u = j / np.linalg.norm(j, axis=1, keepdims=True)
    d, uu = j[0] - j[1:], u[0] - u[1:]
    rest = np.linalg.solve((d @ uu.T).T, (j[0] @ uu.T))
    return len(j) * np.concatenate([[1.0 - rest.sum()], rest])


@pytest.mark.parametrize("t", [2, 3, 4])
def test_imtl_weights_of_nearly_parallel_float32_gradients_match_float64(t: int) -> None:
    """Gradients 1% apart in direction: the weights equal the float64 solution to 1e-6
    (a float32 Gram matrix converted afterwards was off by up to 14% here)."""
    j = _near_parallel(t, 200_000, 0.01, seed=t)
    s = build_weighting("imtl", tuple("abcd"[:t]))
    got = s.shared_weights(torch.ones(t, dtype=F64), j).numpy()
    want = _imtl_reference(j.double().numpy())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_closed_forms_fall_back_on_non_finite_gradients(bad: float) -> None:
    """A non-finite gradient (possible when the step's non-finite check is off) gives the
    documented fallbacks instead of an exception from ``torch.linalg.lstsq``: IMTL equal
    weights; PE-LTR the bounds plus an equal share of the free mass."""
    j = torch.tensor([[1.0, 2.0, 0.5], [bad, 0.0, 1.0], [0.5, -1.0, 2.0]])
    imtl = build_weighting("imtl", ("a", "b", "c"))
    w = imtl.shared_weights(torch.ones(3, dtype=F64), j)
    torch.testing.assert_close(w, torch.ones(3, dtype=F64))
    pe = build_weighting("pe_ltr", ("a", "b", "c"), {"bounds": {"a": 0.1}})
    w = pe.shared_weights(torch.ones(3, dtype=F64), j)
    torch.testing.assert_close(w, torch.tensor([0.4, 0.3, 0.3], dtype=F64))


def test_gram64_stays_on_the_gradients_device() -> None:
    """The accumulator is made on the Jacobian's device (checked with the meta device: a CPU
    accumulator would refuse meta blocks)."""
    j = torch.empty(3, 10, device="meta")
    g = gram64(j, chunk=4)
    assert g.device == j.device and g.shape == (3, 3) and g.dtype == F64
