"""Tests that kill the mutants of ``mtlrec.nn.routing`` and ``mtlrec.nn.extraction`` the rest of
the suite let live, each against an analytic value, an independent computation or a documented
property: the clamping of the uniform noise of hard-concrete samples (noise exactly 0 or 1), the
argument checks of hard-concrete gates and extraction levels and their messages, the gates'
sampled, deterministic and open-probability values for non-default ``beta`` / ``gamma`` /
``zeta`` against the formulas of Louizos et al. (ICLR 2018) written out here, the options an
SNR unit hands to its gates, its default (SNR-Trans) and the bound of its transforms, the
dropout of an extraction level's experts, and the index buffers kept out of the state dicts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mtlrec.nn.extraction import ExtractionLevel
from mtlrec.nn.routing import HardConcrete, SubNetworkRouting, sample_hard_concrete

F64 = torch.float64


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _ref_sample(la: Tensor, u: Tensor, beta: float, gamma: float, zeta: float) -> Tensor:
    """Louizos et al., Sec. 4: ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
    stretched to ``(gamma, zeta)`` and clipped to ``[0, 1]`` (in float64)."""
    la, u = la.to(F64), u.to(F64)
    s = torch.sigmoid((torch.log(u) - torch.log(1.0 - u) + la) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def _ref_deterministic(la: Tensor, gamma: float, zeta: float) -> Tensor:
    """Louizos et al., Eq. 13: ``min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))``."""
    return (torch.sigmoid(la.to(F64)) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


# -- sample_hard_concrete: the noise is clamped into [eps, 1 - eps] ----------------------------
def test_noise_of_exactly_zero_is_clamped_to_eps() -> None:
    # u = 0 is read as u = eps: log(eps) = -15.9 in float32, so log_alpha = 20 still opens the
    # gate fully; unclamped, log(0) = -inf would close it
    eps = torch.finfo(torch.float32).eps
    la = torch.tensor([20.0, 0.0])
    z = sample_hard_concrete(la, torch.zeros(2))
    want = _ref_sample(la, torch.full((2,), eps, dtype=F64), 2.0 / 3.0, -0.1, 1.1)
    assert z[0].item() == 1.0
    torch.testing.assert_close(z.to(F64), want, atol=1e-6, rtol=0.0)


def test_noise_of_exactly_one_is_clamped_to_one_minus_eps() -> None:
    # u = 1 is read as u = 1 - eps: -log(eps) = +15.9, so log_alpha = -20 still closes the
    # gate; unclamped (or clamped above 1), -log(1 - u) = +inf would open it
    eps = torch.finfo(torch.float32).eps
    la = torch.tensor([-20.0, 0.0])
    z = sample_hard_concrete(la, torch.ones(2))
    want = _ref_sample(la, torch.full((2,), 1.0 - eps, dtype=F64), 2.0 / 3.0, -0.1, 1.1)
    assert z[0].item() == 0.0
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z.to(F64), want, atol=1e-5, rtol=0.0)


def test_noise_above_one_is_clamped_below_one() -> None:
    # noise is clamped to at most 1 - eps, so even u > 1 gives a finite gate, not NaN
    z = sample_hard_concrete(torch.tensor([-20.0, 0.0]), torch.tensor([1.5, 1.9]))
    assert torch.isfinite(z).all()
    assert z[0].item() == 0.0


# -- HardConcrete: argument checks ---------------------------------------------------------------
@pytest.mark.parametrize("init_open", [0.0, 1.0, 1.5, -0.2])
def test_hard_concrete_init_open_outside_unit_interval_message(init_open: float) -> None:
    with pytest.raises(ValueError, match=r"^init_open must be in \(0, 1\), got "):
        HardConcrete(2, 3, init_open=init_open)


@pytest.mark.parametrize(
    ("gamma", "zeta", "beta"),
    [
        (0.0, 1.1, 0.5),  # gamma must be < 0
        (0.5, 1.1, 0.5),
        (-0.1, 1.0, 0.5),  # zeta must be > 1
        (-0.1, 0.9, 0.5),
        (-0.1, 1.1, 0.0),  # beta must be > 0
        (-0.1, 1.1, -1.0),
    ],
)
def test_hard_concrete_bad_stretch_or_temperature_message(
    gamma: float, zeta: float, beta: float
) -> None:
    with pytest.raises(ValueError, match=r"^need gamma < 0, zeta > 1, beta > 0; got "):
        HardConcrete(2, 3, gamma=gamma, zeta=zeta, beta=beta)


def test_hard_concrete_fixed_shape_message() -> None:
    with pytest.raises(ValueError, match=r"^fixed has shape \(2, 2\), expected \(2, 3\)$"):
        HardConcrete(2, 3, fixed=torch.zeros(2, 2))


def test_hard_concrete_fixed_values_message() -> None:
    with pytest.raises(ValueError, match=r"^fixed gates must be NaN \(learned\), 0 \(closed\)"):
        HardConcrete(1, 2, fixed=torch.tensor([[0.5, 1.0]]))


# -- HardConcrete: values with non-default beta, gamma, zeta -----------------------------------
BETA, GAMMA, ZETA = 0.5, -0.2, 1.5


def _gates(init_open: float = 0.5) -> HardConcrete:
    fixed = torch.tensor([[math.nan, 0.0, math.nan], [1.0, math.nan, math.nan]])
    return HardConcrete(2, 3, init_open=init_open, beta=BETA, gamma=GAMMA, zeta=ZETA, fixed=fixed)


def test_hard_concrete_training_sample_uses_its_beta_gamma_zeta() -> None:
    g = _gates(init_open=0.7).train()
    la = g.log_alphas().detach()
    torch.manual_seed(2)
    u = torch.rand(2, 3)  # the draw forward() makes with the same RNG state
    torch.manual_seed(2)
    with torch.no_grad():
        z = g()
    want = _ref_sample(la, u, BETA, GAMMA, ZETA)
    # this draw leaves most learned gates strictly inside (0, 1), where the stretch shows
    assert int(((want > 0.0) & (want < 1.0)).sum()) >= 3
    want[0, 1], want[1, 0] = 0.0, 1.0  # the fixed gates
    torch.testing.assert_close(z.to(F64), want, atol=1e-6, rtol=0.0)


def test_hard_concrete_eval_gate_uses_its_gamma_zeta() -> None:
    g = _gates().eval()
    la = g.log_alphas().detach()
    # log_alpha = logit(0.5) + beta log(-gamma / zeta) = 0.5 log(0.2 / 1.5)
    torch.testing.assert_close(la, torch.full((2, 3), BETA * math.log(-GAMMA / ZETA)))
    with torch.no_grad():
        z = g()
    want = _ref_deterministic(la, GAMMA, ZETA)
    want[0, 1], want[1, 0] = 0.0, 1.0
    assert 0.0 < want[0, 0] < 1.0  # inside the clipping range: gamma / zeta matter
    torch.testing.assert_close(z.to(F64), want, atol=1e-6, rtol=0.0)


def test_hard_concrete_open_probability_is_init_open_for_any_stretch() -> None:
    # log_alpha is set so that P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)) equals
    # init_open exactly; fixed gates report 1 (open) or 0 (closed)
    g = _gates(init_open=0.3)
    want = torch.tensor([[0.3, 0.0, 0.3], [1.0, 0.3, 0.3]])
    torch.testing.assert_close(g.open_probability().detach(), want)


def test_hard_concrete_l0_penalty_counts_learned_gates_at_init_open() -> None:
    # four learned gates, each open with probability 0.3; fixed ones are left out
    g = _gates(init_open=0.3)
    torch.testing.assert_close(g.l0_penalty().detach(), torch.tensor(4 * 0.3))


def test_hard_concrete_index_buffers_are_not_in_the_state_dict() -> None:
    g = _gates()
    assert set(g.state_dict()) == {"log_alpha.0", "log_alpha.1"}
    assert set(dict(g.named_buffers())) == {"free", "value"}


# -- SubNetworkRouting ---------------------------------------------------------------------------
def test_snr_hands_beta_gamma_zeta_to_its_gates() -> None:
    r = SubNetworkRouting(3, 2, 4, 4, init_open=0.5, beta=BETA, gamma=GAMMA, zeta=ZETA).eval()
    _, z = r(torch.randn(3, 5, 4))
    # deterministic gate of log_alpha = logit(0.5) + beta log(-gamma / zeta)
    la = torch.full((2, 3), _logit(0.5) + BETA * math.log(-GAMMA / ZETA))
    want = _ref_deterministic(la, GAMMA, ZETA)
    torch.testing.assert_close(z.detach().to(F64), want, atol=1e-6, rtol=0.0)


def test_snr_default_is_snr_trans() -> None:
    # SNR-Trans by default: widths may differ and every upper unit has its transforms
    r = SubNetworkRouting(3, 2, 4, 5)
    assert r.transform
    assert [tuple(w.shape) for w in r.weights] == [(3, 4, 5)] * 2


def test_snr_transforms_are_uniform_within_one_over_sqrt_fan_in() -> None:
    # fan-in of an upper input is K * in = 3 * 12: bound 1 / 6; 2 * 3 * 12 * 8 draws of
    # U(-1/6, 1/6) all fall under half the bound with probability 2^-576
    torch.manual_seed(0)
    r = SubNetworkRouting(3, 2, 12, 8)
    w = torch.stack(list(r.weights)).detach().abs()
    bound = 1.0 / math.sqrt(3 * 12)
    assert w.max().item() <= bound
    assert w.max().item() > bound / 2


def test_snr_aver_is_the_gated_sum_of_the_lower_outputs() -> None:
    r = SubNetworkRouting(3, 2, 4, 4, transform=False, init_open=0.5).eval()
    u = torch.randn(3, 5, 4)
    with torch.no_grad():
        v, z = r(u)
    want = torch.stack([sum(z[m, k] * u[k] for k in range(3)) for m in range(2)])
    torch.testing.assert_close(v, want)


# -- ExtractionLevel -----------------------------------------------------------------------------
@pytest.mark.parametrize(("m", "s"), [(0, 1), (1, 0), (0, 0)])
def test_extraction_level_needs_task_and_shared_experts(m: int, s: int) -> None:
    with pytest.raises(
        ValueError, match=r"^an extraction level needs >= 1 task-specific and shared expert$"
    ):
        ExtractionLevel(2, m, s, 4, [6], shared_gate=True, first=True)


def test_extraction_level_has_no_dropout_by_default() -> None:
    torch.manual_seed(1)
    lvl = ExtractionLevel(2, 1, 1, 4, [8], shared_gate=True, first=True, activation="tanh")
    x = torch.randn(16, 4)
    with torch.no_grad():
        ev = lvl.eval()(x)[0]
        tr = lvl.train()(x)[0]
    torch.testing.assert_close(tr, ev)


def test_extraction_level_experts_use_its_dropout() -> None:
    # inverted dropout p = 0.5 in training: every expert output is 0 or twice its eval value
    torch.manual_seed(2)
    lvl = ExtractionLevel(
        2, 1, 1, 4, [8], shared_gate=False, first=True, activation="tanh", dropout=0.5
    )
    x = torch.randn(16, 4)
    with torch.no_grad():
        ev = lvl.experts.eval()(x)
        tr = lvl.experts.train()(x)
    dropped = tr == 0
    assert dropped.any() and not dropped.all()
    torch.testing.assert_close(tr[~dropped], 2 * ev[~dropped])


def test_extraction_level_index_buffers_are_not_in_the_state_dict() -> None:
    lvl = ExtractionLevel(2, 1, 1, 4, [6], shared_gate=True, first=True)
    buffers = set(dict(lvl.named_buffers(recurse=False)))
    assert buffers == {"expert_stream", "task_experts"}
    assert not buffers & set(lvl.state_dict())
    # a state dict of the parameters alone loads strictly
    params = {k: v.detach().clone() for k, v in lvl.named_parameters()}
    assert set(lvl.state_dict()) == set(params)
    lvl.load_state_dict(params, strict=True)
