"""Tests that kill the mutants of ``mtlrec.nn.experts`` and ``mtlrec.nn.sequence`` the rest of
the suite let live, each against an independent computation or a documented property: the
defaults of a grouped expert bank (ReLU after every layer, no layer norm) and its layer norm
(ExpertBank's too) against per-member float64 loops, the validation of its groups and the
message it raises, and the empty output of the recurrent expert bank on sequences of length 0
(an empty ``[K, B, 0, H]`` in the input's dtype that concatenates along time with a
non-empty run, a zero final state), and the fused ATen call against ``torch.nn.LSTM``/``GRU``
with its state's shape checked (ATen does not check it). Most mutants of ``sequence.py`` are
killed by ``test_mutation_nn_experts.py``."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from mtlrec.nn.experts import ExpertBank, GroupedParallelMLP
from mtlrec.nn.sequence import SequenceExpertBank, _aten_rnn

F64 = torch.float64


# -- grouped / expert banks: per-member references --------------------------------------------
def _layer_norm(h: Tensor, eps: float = 1e-5) -> Tensor:
    """Layer norm without affine parameters over the last axis (biased variance)."""
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + eps)


def _member_reference(
    net: GroupedParallelMLP, x: Tensor, *, layer_norm: bool, last_activation: bool
) -> tuple[Tensor, bool]:
    """Each member of a shared-input bank run on its own, in float64: layer 0's member ``e``
    holds the columns ``[e*d0:(e+1)*d0]`` of the fused ``[in, num*d0]`` weight, deeper layers
    ``w[e]`` of ``[num, in, out]``; every layer is (layer norm,) ReLU, the last one only with
    ``last_activation``. Also says whether some pre-activation was negative (so that a missing
    ReLU shows)."""
    weights, biases = net.layer_tensors()
    d0 = net.dims[0]
    outs, negative = [], False
    for e in range(net.num):
        h = x.to(F64)
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            w, b = w.detach().to(F64), b.detach().to(F64)
            if i == 0:
                h = h @ w[:, e * d0 : (e + 1) * d0] + b[e * d0 : (e + 1) * d0]
            else:
                h = h @ w[e] + b[e, 0]
            if i < len(weights) - 1 or last_activation:
                if layer_norm:
                    h = _layer_norm(h)
                negative = negative or bool((h < 0).any())
                h = torch.relu(h)
        outs.append(h)
    return torch.stack(outs), negative  # [num, B, out]


@pytest.mark.parametrize("groups", [None, [2, 1]])
def test_grouped_bank_defaults_are_relu_after_every_layer_and_no_layer_norm(
    groups: Sequence[int] | None,
) -> None:
    torch.manual_seed(0)
    net = GroupedParallelMLP(3, 4, [5, 2], groups=groups)
    assert net.layer_norm is False and net.last_activation is True
    x = torch.randn(6, 4)
    want, negative = _member_reference(net, x, layer_norm=False, last_activation=True)
    assert negative  # the last ReLU has something to clip
    torch.testing.assert_close(net(x).detach().to(F64), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the unfused path too
        torch.testing.assert_close(net(x).to(F64), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [GroupedParallelMLP, ExpertBank])
@pytest.mark.parametrize("groups", [None, [1, 2]])
def test_bank_layer_norm_normalises_each_member_before_its_activation(
    cls: type[GroupedParallelMLP], groups: Sequence[int] | None
) -> None:
    torch.manual_seed(1)
    net = cls(3, 4, [5, 3], layer_norm=True, groups=groups)
    assert net.layer_norm is True
    x = 3.0 * torch.randn(6, 4) + 1.0  # far from normalised: a missing norm shows
    want, _ = _member_reference(net, x, layer_norm=True, last_activation=True)
    torch.testing.assert_close(net(x).detach().to(F64), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("groups", "shown"),
    [
        ([2, 2], "(2, 2)"),  # every group non-empty, but 4 members of 5
        ([3, 0, 2], "(3, 0, 2)"),  # sums to 5 with an empty group
        ([6, -1], "(6, -1)"),  # sums to 5 with a negative group
    ],
)
def test_grouped_bank_rejects_groups_that_are_empty_or_miscount(
    groups: list[int], shown: str
) -> None:
    msg = f"groups {shown} must be >= 1 and sum to 5"
    with pytest.raises(ValueError) as err:
        GroupedParallelMLP(5, 4, [6, 3], groups=groups)
    assert str(err.value) == msg


# -- recurrent expert bank: sequences of length 0 ---------------------------------------------
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("shared_input", [True, False])
def test_sequence_bank_of_empty_sequences_is_an_empty_run_of_zero_state(
    cell: str, shared_input: bool
) -> None:
    # L = 0 takes the step-wise recurrence (no fused RNN over no step): nothing is read, so
    # the states are an empty [K, B, 0, H] run and the final state is the initial zero state
    k, bsz, d, h = 2, 3, 4, 5
    bank = SequenceExpertBank(k, d, h, cell=cell, shared_input=shared_input).to(F64)
    lead = (bsz,) if shared_input else (k, bsz)
    empty = torch.randn(*lead, 0, d, dtype=F64)
    states, final = bank(empty, torch.zeros(bsz, 0, dtype=torch.bool))
    assert states.shape == (k, bsz, 0, h) and states.dtype == F64
    assert final.shape == (k, bsz, h) and final.dtype == F64
    assert torch.equal(final, torch.zeros(k, bsz, h, dtype=F64))
    # an empty run concatenates with a real one along time, leaving it as it is
    x = torch.randn(*lead, 2, d, dtype=F64)
    run, _ = bank(x, torch.ones(bsz, 2, dtype=torch.bool))
    assert torch.equal(torch.cat([states, run], dim=2), run)


# -- the fused ATen call: torch.nn's own modules as the reference, the state's shape checked --
def _torch_rnn(cell: str, d: int, h: int) -> tuple[torch.nn.RNNBase, list[Tensor]]:
    """A float64 ``torch.nn.LSTM``/``GRU`` (batch first) and its weights in ATen's order."""
    module: torch.nn.RNNBase = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(
        d, h, batch_first=True, dtype=F64
    )
    weights = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0]
    return module, [w.detach() for w in weights]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize(("bsz", "length"), [(5, 3), (2, 6)])  # more rows than steps, and fewer
@pytest.mark.parametrize("training", [False, True])
def test_aten_rnn_is_torch_nn_from_zeros_or_a_given_state(
    cell: str, bsz: int, length: int, training: bool
) -> None:
    # torch.nn.LSTM/GRU check the state and call the same kernels: the public reference
    torch.manual_seed(3)
    d, h = 4, 3
    module, weights = _torch_rnn(cell, d, h)
    x = torch.randn(bsz, length, d, dtype=F64)
    with torch.no_grad():
        out = _aten_rnn(cell, x, weights, training=training)
        assert out.shape == (bsz, length, h)
        torch.testing.assert_close(out, module(x)[0], rtol=0, atol=1e-12)
        state = torch.randn(1, bsz, h, dtype=F64)
        given = _aten_rnn(cell, x, weights, training=training, state=state)
        hx = (state, torch.zeros_like(state)) if cell == "lstm" else state
        torch.testing.assert_close(given, module(x, hx)[0], rtol=0, atol=1e-12)
        assert not torch.allclose(given, out)  # the state was read


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize(
    "shape",
    [(1, 3, 2), (1, 5, 3), (2, 5, 2), (5, 2)],  # time as batch, other width, two layers, 2-D
)
def test_aten_rnn_refuses_a_state_of_another_shape(cell: str, shape: tuple[int, ...]) -> None:
    # ATen would read and write outside such a state's memory (a crash or silent garbage)
    _, weights = _torch_rnn(cell, 4, 2)
    x = torch.randn(5, 3, 4, dtype=F64)
    message = f"fused {cell} over a batch of 5: the initial state must be (1, 5, 2), got {shape}"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _aten_rnn(cell, x, weights, training=False, state=torch.zeros(shape, dtype=F64))


@pytest.mark.parametrize(("cell", "other"), [("lstm", "gru"), ("gru", "lstm")])
def test_aten_rnn_refuses_weights_of_another_cell(cell: str, other: str) -> None:
    # a kernel given the other cell's weights would read past their end (a crash, not an error)
    _, weights = _torch_rnn(other, 4, 2)
    gates, got = (4, 3) if cell == "lstm" else (3, 4)
    x = torch.randn(5, 3, 4, dtype=F64)
    message = (
        f"fused {cell} with a state of width 2: its weights need {2 * gates} rows ({gates} "
        f"gates), got {[2 * got] * 4}"
    )
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _aten_rnn(cell, x, weights, training=False)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_aten_rnn_refuses_one_weight_of_another_size(cell: str, index: int) -> None:
    _, weights = _torch_rnn(cell, 4, 2)
    weights[index] = weights[index][:-1]  # one row short
    rows = [w.shape[0] for w in weights]
    with pytest.raises(RuntimeError, match=re.escape(f"got {rows}")):
        _aten_rnn(cell, torch.randn(5, 3, 4, dtype=F64), weights, training=False)
