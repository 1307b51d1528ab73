"""Tests that kill the mutants of ``mtlrec.nn.gates`` and ``mtlrec.nn.mixture`` the rest of the
suite let live, each against an independent computation or a documented contract: the defaults
of :class:`Gate` and :class:`GateBank` (temperature 1, DSelect-k with ``k = 2`` and
``gamma = 1``, stacked parameters) against a float64 loop implementation of the gates written
here from the papers, the activation of the hidden layers against a hand-written forward pass,
temperature scaling of softmax logits and of DSelect-k's selector weights, expert dropout (no
random draw when it is off, the keep rule ``u >= p`` and renormalisation along the expert axis
of a bank), the non-persistent code buffers, and the exact messages of the config checks."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor

from mtlrec.nn.gates import Gate, GateBank
from mtlrec.nn.mixture import mix

F64 = torch.float64


def _exact(msg: str) -> str:
    """A ``pytest.raises`` pattern matching ``msg`` and nothing longer."""
    return "^" + re.escape(msg) + "$"


# -- independent references ----------------------------------------------------------------------
def _softmax_list(z: list[float], temperature: float) -> list[float]:
    e = [math.exp(v / temperature) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _smooth_step(t: float, gamma: float) -> float:
    """Hazimeh et al. (NeurIPS 2021), eq. 3."""
    if t <= -gamma / 2:
        return 0.0
    if t >= gamma / 2:
        return 1.0
    return -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5


def _dselect_reference(
    z: Tensor, num_experts: int, k: int, gamma: float, temperature: float
) -> Tensor:
    """DSelect-k weights from raw logits ``[B, k*m + k]``, one row and one code at a time:
    selector i reads bits ``z[i*m : (i+1)*m]``, code l has probability
    ``prod_j (s_j if bit j of l else 1 - s_j)`` and names expert ``l mod n``; the selectors are
    mixed by a softmax (with temperature) of the last k logits."""
    m = max(1, math.ceil(math.log2(num_experts)))
    assert z.shape[-1] == k * m + k
    rows = []
    for row in z.to(F64).tolist():
        alpha = _softmax_list(row[k * m :], temperature)
        w = [0.0] * num_experts
        for i in range(k):
            s = [_smooth_step(row[i * m + j], gamma) for j in range(m)]
            for code in range(2**m):
                r = 1.0
                for j in range(m):
                    r *= s[j] if (code >> j) & 1 else 1.0 - s[j]
                w[code % num_experts] += alpha[i] * r
        rows.append(w)
    return torch.tensor(rows, dtype=F64)


def _softmax_reference(z: Tensor, temperature: float) -> Tensor:
    return torch.tensor([_softmax_list(r, temperature) for r in z.to(F64).tolist()], dtype=F64)


# -- defaults ------------------------------------------------------------------------------------
def test_gate_dselect_defaults_are_two_selectors_and_unit_gamma() -> None:
    # documented defaults k=2, gamma=1: 5 experts -> m = 3 bits, width 2*3 + 2 = 8
    torch.manual_seed(0)
    gate = Gate(4, 5, kind="dselect")
    x = torch.randn(6, 4)
    z = gate.logits(x).detach()
    assert z.shape == (6, 8)
    # bits inside (-1/2, 1/2), where the smooth-steps of gamma = 1 and gamma = 2 differ
    assert (z[:, :6].abs() < 0.5).float().mean() > 0.5
    ref = _dselect_reference(z, 5, k=2, gamma=1.0, temperature=1.0)
    torch.testing.assert_close(gate(x).detach().to(F64), ref, rtol=1e-5, atol=1e-6)


def test_gate_bank_dselect_defaults_are_two_selectors_and_unit_gamma() -> None:
    torch.manual_seed(1)
    bank = GateBank(2, 4, 5, kind="dselect")
    x = torch.randn(6, 4)
    z = bank.net(x).detach()  # [2, 6, width]
    assert z.shape == (2, 6, 8)
    assert (z[..., :6].abs() < 0.5).float().mean() > 0.5
    w = bank(x).detach()
    for g in range(2):
        ref = _dselect_reference(z[g], 5, k=2, gamma=1.0, temperature=1.0)
        torch.testing.assert_close(w[g].to(F64), ref, rtol=1e-5, atol=1e-6)


def test_gate_bank_default_temperature_is_one() -> None:
    torch.manual_seed(2)
    bank = GateBank(3, 4, 5)
    x = torch.randn(7, 4)
    z = bank.net(x).detach()
    w = bank(x).detach()
    for g in range(3):
        torch.testing.assert_close(w[g].to(F64), _softmax_reference(z[g], 1.0))


def test_gate_bank_default_stacks_the_gates_parameters() -> None:
    # separate=False by default: one stacked tensor per layer, no per-gate parameters
    bank = GateBank(2, 4, 3)
    assert not bank.net.grouped
    with pytest.raises(ValueError, match="share stacked tensors"):
        bank.gate_parameters(0)
    assert len(GateBank(2, 4, 3, separate=True).gate_parameters(1)) == 2  # weight and bias


def test_gates_keep_the_temperature_they_were_given() -> None:
    assert Gate(4, 3, temperature=2.5).temperature == 2.5
    assert GateBank(2, 4, 3, temperature=0.5).temperature == 0.5


# -- temperature and activation -----------------------------------------------------------------
@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_softmax_gate_divides_logits_by_temperature(temperature: float) -> None:
    torch.manual_seed(3)
    gate = Gate(4, 5, temperature=temperature)
    x = torch.randn(6, 4)
    z = gate.logits(x).detach()
    torch.testing.assert_close(gate(x).detach().to(F64), _softmax_reference(z, temperature))


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_dselect_temperature_divides_the_selector_logits(temperature: float) -> None:
    torch.manual_seed(4)
    gate = Gate(4, 3, kind="dselect", k=3, temperature=temperature)
    x = torch.randn(6, 4)
    z = gate.logits(x).detach()  # m = 2 bits, width 3*2 + 3
    ref = _dselect_reference(z, 3, k=3, gamma=1.0, temperature=temperature)
    torch.testing.assert_close(gate(x).detach().to(F64), ref, rtol=1e-5, atol=1e-6)


def test_gate_hidden_layers_use_the_chosen_activation() -> None:
    # reference: tanh(x W0^T + b0) W1^T + b1 from the linear layers' own parameters
    torch.manual_seed(5)
    gate = Gate(4, 3, hidden=(5,), activation="tanh")
    x = torch.randn(6, 4)
    l0, l1 = gate.net.layers
    h = torch.tanh(x @ l0.weight.T + l0.bias)
    z = (h @ l1.weight.T + l1.bias).detach()
    torch.testing.assert_close(gate.logits(x).detach(), z)
    torch.testing.assert_close(gate(x).detach().to(F64), _softmax_reference(z, 1.0))


def test_gate_bank_hidden_layers_use_the_chosen_activation() -> None:
    torch.manual_seed(6)
    bank = GateBank(3, 4, 2, hidden=(5,), activation="tanh")
    x = torch.randn(6, 4)
    _, biases = bank.net.layer_tensors()
    w = bank(x).detach()
    for g in range(3):
        w0, w1 = bank.net.member_weight(0, g), bank.net.member_weight(1, g)
        b0, b1 = biases[0][g * 5 : (g + 1) * 5], biases[1][g, 0]  # fused first-layer columns
        z = (torch.tanh(x @ w0 + b0) @ w1 + b1).detach()
        torch.testing.assert_close(w[g].to(F64), _softmax_reference(z, 1.0))


# -- expert dropout ------------------------------------------------------------------------------
def test_gate_without_dropout_draws_no_random_numbers_in_training() -> None:
    # dropout=0: training forward is the eval forward, and the global RNG stream is untouched
    # (a dropout-free gate must not shift the random draws of the rest of the model)
    torch.manual_seed(7)
    gate = Gate(4, 7)
    x = torch.randn(8, 4)
    gate.eval()
    expected = gate(x).detach()
    gate.train()
    state = torch.get_rng_state()
    got = gate(x).detach()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(got, expected)


def test_expert_dropout_keeps_an_expert_when_its_draw_equals_the_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # keep iff u >= p, u ~ U[0, 1): P(keep) = 1 - p exactly, u == p included
    torch.manual_seed(8)
    gate = Gate(4, 3, dropout=0.5)
    x = torch.randn(1, 4)
    gate.eval()
    w = gate(x).detach()[0]
    u = torch.tensor([[0.5, 0.9, 0.1]])
    monkeypatch.setattr(torch, "rand_like", lambda t: u.to(t))
    gate.train()
    got = gate(x).detach()[0]
    s = w[0] + w[1]
    torch.testing.assert_close(got, torch.stack([w[0] / s, w[1] / s, torch.zeros(())]))


def test_gate_bank_dropout_renormalises_over_the_experts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # bank weights are [num, B, n]: every row renormalised over its own kept experts
    torch.manual_seed(9)
    bank = GateBank(2, 4, 3, dropout=0.5)
    x = torch.randn(4, 4)
    bank.eval()
    w = bank(x).detach().to(F64)
    u = torch.tensor(
        [
            [[0.9, 0.1, 0.7], [0.2, 0.6, 0.1], [0.6, 0.8, 0.9], [0.1, 0.2, 0.3]],
            [[0.1, 0.1, 0.5], [0.5, 0.5, 0.1], [0.9, 0.1, 0.1], [0.7, 0.1, 0.8]],
        ]
    )
    monkeypatch.setattr(torch, "rand_like", lambda t: u.to(t))
    bank.train()
    got = bank(x).detach().to(F64)
    ref = torch.empty_like(w)
    for g in range(2):
        for b in range(4):
            kept = [w[g, b, e].item() if u[g, b, e] >= 0.5 else 0.0 for e in range(3)]
            total = sum(kept)
            # a row with every expert dropped (gate 0, row 3) keeps its weights
            ref[g, b] = torch.tensor([v / total for v in kept]) if total > 0 else w[g, b]
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 4, dtype=F64))


# -- buffers -------------------------------------------------------------------------------------
def test_dselect_code_buffers_stay_out_of_the_state_dict() -> None:
    # the code matrices are constants of num_experts, rebuilt at construction: not checkpointed
    gate = Gate(4, 5, kind="dselect")
    names = {n for n, _ in gate.named_buffers()}
    assert {"head.bits", "head.fold"} <= names
    keys = set(gate.state_dict())
    assert "head.bits" not in keys and "head.fold" not in keys
    bank = GateBank(2, 4, 5, kind="dselect")
    assert not any(k.startswith("head.") for k in bank.state_dict())


# -- config checks -------------------------------------------------------------------------------
def test_gate_temperature_check_message() -> None:
    with pytest.raises(ValueError, match=_exact("gate temperature must be > 0")):
        Gate(4, 3, temperature=0.0)


@pytest.mark.parametrize("dropout", [1.0, 1.5, -0.1])
def test_gate_dropout_must_be_below_one(dropout: float) -> None:
    with pytest.raises(ValueError, match=_exact("gate dropout must be in [0, 1)")):
        Gate(4, 3, dropout=dropout)


def test_dselect_needs_at_least_one_selector() -> None:
    with pytest.raises(ValueError, match=_exact("DSelect-k needs k >= 1")):
        Gate(4, 3, kind="dselect", k=0)
    # k means nothing to a softmax gate: k=0 is accepted there
    assert Gate(4, 3, k=0)(torch.randn(2, 4)).shape == (2, 3)


@pytest.mark.parametrize("gamma", [0.0, -1.0])
def test_dselect_gamma_must_be_positive(gamma: float) -> None:
    with pytest.raises(ValueError, match=_exact("DSelect-k gamma must be > 0")):
        Gate(4, 3, kind="dselect", gamma=gamma)


# -- mix -----------------------------------------------------------------------------------------
def test_mix_error_names_the_expert_counts() -> None:
    # every axis a different size, so the message can only come from gates[-1] and experts[0]
    gates = torch.ones(2, 3, 4) / 4
    experts = torch.zeros(5, 7, 6)
    with pytest.raises(ValueError, match=_exact("gates weigh 4 experts but 5 given")):
        mix(gates, experts)
