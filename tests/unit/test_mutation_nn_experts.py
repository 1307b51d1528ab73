"""Tests that kill the mutants of ``mtlrec.nn`` (sequence, gates, extraction, routing, experts,
embedding) the rest of the suite let live, each against an analytic value, an independent
computation or a documented property: the recurrent expert bank against ``nn.LSTM`` /
``nn.GRU`` on the real elements of every row (fused and step-wise paths, padding anywhere, empty
sequences, graph capture, the default device, the initialisation bounds), DSelect-k's
smooth-step at the edges of its transition, the gate regularisers of gate banks against plain
loops, the error messages of gates and banks, the hard-concrete CDF in float64, the parameter
groups of grouped expert banks, extraction levels and routing units, the activation and dropout
of a stacked-MoE level, and sparse embedding gradients."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from torch import Tensor, nn

import mtlrec.nn.sequence as sequence
from mtlrec.batch import Features
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout, FieldSpec, SequenceSpec
from mtlrec.nn.experts import GroupedParallelMLP
from mtlrec.nn.extraction import ExtractionLevel, StackedMoELevel
from mtlrec.nn.gates import Gate, GateBank, GateOutput, gate_penalty, smooth_step
from mtlrec.nn.routing import SubNetworkRouting, hard_concrete_cdf
from mtlrec.nn.sequence import SequenceExpertBank

F64 = torch.float64


# -- recurrent expert bank ----------------------------------------------------------------------
def _reference_rnn(bank: SequenceExpertBank, e: int) -> nn.Module:
    """PyTorch's own single-layer ``nn.LSTM`` / ``nn.GRU`` holding expert ``e``'s weights."""
    cls = nn.LSTM if bank.cell == "lstm" else nn.GRU
    rnn = cls(bank.w_ih.shape[1], bank.hidden, batch_first=True)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(bank.w_ih[e].T)
        rnn.weight_hh_l0.copy_(bank.w_hh[e].T)
        rnn.bias_ih_l0.copy_(bank.b_ih[e, 0])
        rnn.bias_hh_l0.copy_(bank.b_hh[e, 0])
    return rnn


def _reference_states(bank: SequenceExpertBank, x: Tensor, mask: Tensor) -> Tensor:
    """States ``[K, B, L, H]`` by the definition: each row's real elements alone run through
    the reference RNN; a position holds the state after the last real element up to it, zeros
    before the first one."""
    k, h = bank.num, bank.hidden
    bsz, length = mask.shape
    out = torch.zeros(k, bsz, length, h)
    for e in range(k):
        rnn = _reference_rnn(bank, e)
        for b in range(bsz):
            xe = x[b] if bank.shared_input else x[e, b]  # [L, D]
            real = xe[mask[b]]
            if real.shape[0] == 0:
                continue
            seen = rnn(real.unsqueeze(0))[0][0]  # [n_real, H]
            count = mask[b].long().cumsum(0)  # real elements up to each position
            for pos in range(length):
                if count[pos] > 0:
                    out[e, b, pos] = seen[count[pos] - 1]
    return out


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_sequence_bank_reads_batch_first_input_when_batch_equals_length(cell: str) -> None:
    # B == L: a [L, B, D] reading of the [B, L, D] input would still have valid shapes
    torch.manual_seed(10)
    bank = SequenceExpertBank(2, 3, 4, cell=cell)
    x, mask = torch.randn(4, 4, 3), torch.ones(4, 4, dtype=torch.bool)
    with torch.no_grad():
        states, _ = bank(x, mask)
        ref = _reference_states(bank, x, mask)
    torch.testing.assert_close(states, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("shared", [True, False])
def test_sequence_bank_matches_torch_rnn_on_prefix_masks(cell: str, shared: bool) -> None:
    # a prefix mask (padding after the ids) takes the fused path; B=3 != L=5 so that a
    # batch/time confusion cannot go unnoticed
    torch.manual_seed(0)
    bank = SequenceExpertBank(2, 3, 4, cell=cell, shared_input=shared)
    x = torch.randn(3, 5, 3) if shared else torch.randn(2, 3, 5, 3)
    mask = torch.arange(5) < torch.tensor([5, 2, 0])[:, None]
    with torch.no_grad():
        states, final = bank(x, mask)
        ref = _reference_states(bank, x, mask)
    torch.testing.assert_close(states, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, ref[:, :, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_sequence_bank_padding_in_the_middle_is_skipped(cell: str) -> None:
    # row 0 starts with padding: it is not a prefix mask although it has as many padding
    # positions before as a mask of length 1 has after
    torch.manual_seed(1)
    bank = SequenceExpertBank(2, 3, 4, cell=cell)
    x = torch.randn(3, 4, 3)
    mask = torch.tensor(
        [[False, True, True, True], [True, False, True, False], [False, False, False, True]]
    )
    with torch.no_grad():
        states, final = bank(x, mask)
        ref = _reference_states(bank, x, mask)
    torch.testing.assert_close(states, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, ref[:, :, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared_input", [False, True])
def test_sequence_bank_empty_sequence_gives_no_states_and_zero_final(shared_input: bool) -> None:
    # inputs [K, B, L=0, D] per expert, or [B, L=0, D] shared (its input projection's view
    # once inferred a dimension from zero elements and raised)
    bank = SequenceExpertBank(3, 2, 4, shared_input=shared_input)
    x = torch.randn(5, 0, 2) if shared_input else torch.randn(3, 5, 0, 2)
    mask = torch.zeros(5, 0, dtype=torch.bool)
    states, final = bank(x, mask)
    assert states.shape == (3, 5, 0, 4)  # [K, B, L=0, H]
    assert final.shape == (3, 5, 4)
    assert torch.equal(final, torch.zeros(3, 5, 4))  # no element read: the initial state


def _spy_fused(bank: SequenceExpertBank) -> mock.MagicMock:
    return mock.patch.object(bank, "_fused", wraps=bank._fused)


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[True, True, False], [True, False, False]]),  # padded prefixes
        torch.ones(2, 3, dtype=torch.bool),  # no padding
        torch.ones(2, 1, dtype=torch.bool),  # a single step
    ],
)
def test_sequence_bank_prefix_masks_take_the_fused_recurrence(mask: Tensor) -> None:
    # the documented dispatch: ids first, padding after -> one fused ATen RNN per expert
    bank = SequenceExpertBank(2, 3, 4)
    with _spy_fused(bank) as spy:
        bank(torch.randn(2, mask.shape[1], 3), mask)
    assert spy.call_count == 1


def test_sequence_bank_other_masks_take_the_stepwise_recurrence() -> None:
    bank = SequenceExpertBank(2, 3, 4)
    mask = torch.tensor([[False, True, True], [True, True, False]])
    with _spy_fused(bank) as spy:
        bank(torch.randn(2, 3, 3), mask)
    assert spy.call_count == 0


def test_exporting_is_true_when_any_capture_flag_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = [
        (torch.jit, "is_tracing"),
        (torch.onnx, "is_in_onnx_export"),
        (torch.compiler, "is_compiling"),
    ]
    for mod, name in flags:
        monkeypatch.setattr(mod, name, lambda: False)
    assert sequence._exporting() is False
    for on in range(3):
        for i, (mod, name) in enumerate(flags):
            monkeypatch.setattr(mod, name, (lambda: True) if i == on else (lambda: False))
        assert sequence._exporting() is True, flags[on][1]


def test_sequence_bank_traced_graph_handles_any_mask() -> None:
    # traced with a full mask, the captured graph must not bake in the fused path: run on a
    # mask with holes it gives the eager result
    torch.manual_seed(2)
    bank = SequenceExpertBank(2, 3, 4).eval()
    x = torch.randn(2, 4, 3)
    full = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        traced = torch.jit.trace(bank, (x, full), check_trace=False)
        holes = torch.tensor([[True, False, True, True], [False, True, True, False]])
        got, want = traced(x, holes), bank(x, holes)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[True, True, False], [True, False, False]]),
        torch.tensor([[True, True, False], [False, False, False]]),
        torch.tensor([[False, True, True], [True, True, False]]),
    ],
)
def test_sequence_bank_creates_its_tensors_on_the_input_device(mask: Tensor) -> None:
    # a different default device (torch.set_default_device / a device context) must not move
    # the bank's index tensors away from its input: nothing is created on "meta" here
    bank = SequenceExpertBank(2, 3, 4)
    x = torch.randn(2, 3, 3)
    with torch.no_grad():
        want = bank(x, mask)
        with torch.device("meta"):
            got = bank(x, mask)
    for g, w in zip(got, want, strict=True):
        assert g.device == x.device
        torch.testing.assert_close(g, w)


def test_sequence_bank_default_cell_is_lstm() -> None:
    bank = SequenceExpertBank(2, 3, 5)
    assert bank.cell == "lstm"
    assert bank.w_ih.shape == (2, 3, 4 * 5)  # four LSTM gates per state unit
    assert bank.w_hh.shape == (2, 5, 4 * 5)


def test_sequence_bank_unknown_cell_message() -> None:
    with pytest.raises(
        ValueError, match=r"^unknown recurrent cell 'rnn'; choose from \['gru', 'lstm'\]$"
    ):
        SequenceExpertBank(2, 3, 4, cell="rnn")


def test_sequence_bank_init_is_uniform_within_one_over_sqrt_hidden() -> None:
    # PyTorch's RNN initialisation U(-1/sqrt(H), 1/sqrt(H)); H = 16: bound 0.25, and with
    # thousands of draws both ends of the range are reached
    torch.manual_seed(3)
    bank = SequenceExpertBank(4, 8, 16)
    values = torch.cat([p.detach().flatten() for p in bank.parameters()])
    assert values.abs().max() <= 0.25
    assert values.max() > 0.24 and values.min() < -0.24


# -- gates ------------------------------------------------------------------------------------
def test_smooth_step_is_exactly_0_and_1_at_the_edges_of_the_transition() -> None:
    # 0 for t <= -gamma/2 and 1 for t >= gamma/2 (the edges included), exactly: the cubic
    # rounds to about 3e-8 / 1 - 6e-8 there in float32 for these gammas
    for gamma in (0.3, 0.7, 1.3):
        t = torch.tensor([-gamma / 2, gamma / 2], requires_grad=True)
        s = smooth_step(t, gamma)
        assert s.tolist() == [0.0, 1.0], gamma
        s.sum().backward()
        assert t.grad is not None and t.grad.tolist() == [0.0, 0.0]


def test_smooth_step_is_the_cubic_inside_the_transition() -> None:
    gamma = 1.0
    t = torch.tensor([-0.45, -0.4, -0.35, 0.35, 0.4, 0.45], dtype=F64)
    want = [-2.0 / gamma**3 * v**3 + 1.5 / gamma * v + 0.5 for v in t.tolist()]
    torch.testing.assert_close(smooth_step(t, gamma), torch.tensor(want, dtype=F64))
    assert all(0.0 < v < 1.0 for v in smooth_step(t, gamma).tolist())


def _entropy_ref(p: Tensor) -> float:
    return -sum(v * math.log(max(v, 1e-12)) for v in p.tolist())


def test_entropy_penalty_of_a_gate_bank_is_the_mean_row_entropy() -> None:
    # weights [G=2, B=3, n=4]: mean over gates and rows of each row's entropy
    torch.manual_seed(4)
    w = torch.softmax(torch.randn(2, 3, 4, dtype=F64), -1)
    want = sum(_entropy_ref(w[g, b]) for g in range(2) for b in range(3)) / 6
    got = gate_penalty(GateOutput(w), "entropy")
    assert got is not None and got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("bank", [False, True])
def test_entropy_penalty_of_dselect_sums_selectors_and_averages_rows(bank: bool) -> None:
    # codes [(G,) B, k, 2^m] with B=5, k=2: per row the selectors' entropies are summed,
    # then rows (and gates) are averaged
    torch.manual_seed(5)
    if bank:
        out = GateBank(3, 4, 5, kind="dselect", k=2, gamma=8.0).route(torch.randn(5, 4))
        codes = out.codes
    else:
        out = Gate(4, 5, kind="dselect", k=2, gamma=8.0).route(torch.randn(5, 4))
        codes = out.codes.unsqueeze(0)
    assert codes is not None
    g, b, k = codes.shape[:3]
    assert (b, k) == (5, 2)
    rows = [sum(_entropy_ref(codes[i, r, s]) for s in range(k)) for i in range(g) for r in range(b)]
    got = gate_penalty(out, "entropy")
    assert got is not None and got.item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)


def test_load_balance_penalty_of_a_gate_bank_is_the_mean_cv2_per_gate() -> None:
    # importance of gate g: its weights summed over the batch; CV^2 = population variance /
    # squared mean, per gate, then averaged. B=2 < n=5 makes the mean importance 0.4 (< 1),
    # and the second gate's rows are scaled so that the gates' mean importances differ
    torch.manual_seed(6)
    w = torch.softmax(torch.randn(2, 2, 5, dtype=F64), -1)
    w[1] = w[1] * 3.0
    cv2 = []
    for g in range(2):
        imp = [float(w[g, :, j].sum()) for j in range(5)]
        mean = sum(imp) / 5
        var = sum((v - mean) ** 2 for v in imp) / 5
        cv2.append(var / mean**2)
    got = gate_penalty(GateOutput(w), "load_balance")
    assert got is not None and got.item() == pytest.approx(sum(cv2) / 2, rel=1e-12)


def test_load_balance_penalty_of_real_softmax_bank_rows() -> None:
    torch.manual_seed(7)
    w = GateBank(3, 4, 6)(torch.randn(2, 4)).detach().double()  # [3, 2, 6], B < n
    cv2 = []
    for g in range(3):
        imp = w[g].sum(0)
        cv2.append(float(((imp - imp.mean()) ** 2).mean() / imp.mean() ** 2))
    got = gate_penalty(GateOutput(w), "load_balance")
    assert got is not None and got.item() == pytest.approx(sum(cv2) / 3, rel=1e-9)


def test_gate_penalty_unknown_kind_message() -> None:
    w = GateOutput(torch.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"^unknown gate penalty 'l2'; choose from \('none', "):
        gate_penalty(w, "l2")


def test_gate_bank_parameters_need_separate_gates_message() -> None:
    bank = GateBank(2, 3, 4, separate=False)
    with pytest.raises(
        ValueError, match=r"^the gates of this bank share stacked tensors \(separate=False\)$"
    ):
        bank.gate_parameters(0)


def test_only_softmax_gates_permute_message() -> None:
    gate = Gate(3, 4, kind="dselect")
    with pytest.raises(
        ValueError, match=r"^only a softmax gate has one logit per expert to permute$"
    ):
        gate.permute_experts_(torch.arange(4))


# -- routing -----------------------------------------------------------------------------------
def test_hard_concrete_cdf_is_computed_in_the_dtype_of_log_alpha() -> None:
    # float64 log_alpha with a Python float x: the float64 formula, not a float32-rounded x
    beta, gamma, zeta = 2.0 / 3.0, -0.1, 1.1
    la = torch.tensor([-1.0, 0.3, 2.0], dtype=F64)
    got = hard_concrete_cdf(0.3, la)
    assert got.dtype == F64
    for g, a in zip(got.tolist(), la.tolist(), strict=True):
        z = beta * (math.log(0.3 - gamma) - math.log(zeta - 0.3)) - a
        assert g == pytest.approx(1.0 / (1.0 + math.exp(-z)), rel=1e-13, abs=0.0)


def test_snr_trans_unit_parameters_include_its_transforms() -> None:
    trans = SubNetworkRouting(3, 2, 4, 5, transform=True)
    params = trans.unit_parameters(1)
    assert len(params) == 2
    assert params[-1] is trans.weights[1]
    assert params[0] is trans.gate.row_parameters(1)[0]
    aver = SubNetworkRouting(3, 2, 4, 4, transform=False)
    assert len(aver.unit_parameters(1)) == 1


# -- expert banks and levels ---------------------------------------------------------------------
def test_grouped_bank_group_layer_weight_is_the_groups_parameter() -> None:
    net = GroupedParallelMLP(5, 4, [6, 3], groups=[2, 2, 1])
    last = net.group_layer_weight(2, -1)
    assert last is net.groups[2].weights[-1]
    assert tuple(last.shape) == (1, 6, 3)  # one member, [in, out]
    first = net.group_layer_weight(1, 0)
    assert tuple(first.shape) == (4, 2 * 6)  # fused shared-input layer: two members' columns


def test_ungrouped_bank_group_accessors_are_the_stacked_parameters() -> None:
    net = GroupedParallelMLP(5, 4, [6, 3])
    assert net.group_layer_weight(0, 1) is net.weights[1]
    params = net.group_parameters(0)
    assert len(params) == 4
    assert all(a is b for a, b in zip(params, net.parameters(), strict=True))


def test_extraction_level_shared_expert_parameters_are_the_last_group() -> None:
    lvl = ExtractionLevel(2, 1, 3, 4, [6], shared_gate=False, first=True)
    params = lvl.shared_expert_parameters()
    group = list(lvl.experts.groups[2].parameters())
    assert len(params) == len(group) == 2
    assert all(a is b for a, b in zip(params, group, strict=True))
    assert tuple(params[0].shape) == (4, 3 * 6)  # the three shared experts' columns


def test_stacked_moe_level_sizes() -> None:
    lvl = StackedMoELevel(2, 3, 4, [5], first=False)
    out, g = lvl(torch.randn(2, 7, 4))
    assert (lvl.num_tasks, lvl.num_experts) == (2, 3)
    assert g.weights.shape == (lvl.num_tasks, 7, lvl.num_experts)
    assert out.shape == (lvl.num_tasks, 7, 5)


def test_stacked_moe_level_experts_use_its_activation() -> None:
    # reference: tanh(x W_e + b_e) mixed by the gate weights
    torch.manual_seed(8)
    lvl = StackedMoELevel(2, 3, 4, [5], first=True, activation="tanh")
    x = torch.randn(6, 4)
    with torch.no_grad():
        out, g = lvl(x)
        (w,), (b,) = lvl.experts.layer_tensors()  # [4, 3*5], [3*5]
        experts = torch.tanh(x @ w + b).view(6, 3, 5).transpose(0, 1)  # [E, B, H]
        want = torch.einsum("tbe,ebh->tbh", g.weights, experts)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


def test_stacked_moe_level_experts_use_its_dropout() -> None:
    # inverted dropout p=0.5 in training: every expert output is 0 or twice its eval value
    torch.manual_seed(9)
    lvl = StackedMoELevel(2, 3, 4, [8], first=True, activation="tanh", dropout=0.5)
    x = torch.randn(16, 4)
    with torch.no_grad():
        ev = lvl.experts.eval()(x)
        tr = lvl.experts.train()(x)
    dropped = tr == 0
    assert dropped.any() and not dropped.all()
    torch.testing.assert_close(tr[~dropped], 2 * ev[~dropped])


def test_stacked_moe_level_has_no_dropout_by_default() -> None:
    torch.manual_seed(10)
    lvl = StackedMoELevel(2, 3, 4, [8], first=True, activation="tanh")
    x = torch.randn(16, 4)
    with torch.no_grad():
        ev = lvl.eval()(x)[0]
        tr = lvl.train()(x)[0]
    torch.testing.assert_close(tr, ev)


# -- embeddings --------------------------------------------------------------------------------
def _sparse_grad_collection() -> EmbeddingCollection:
    layout = FeatureLayout(
        (FieldSpec("a", "a", 4),),
        (SequenceSpec("hist", "a", 4, "mean", 3),),
        (),
        {"a": 6},
        {"a": 4},
    )
    emb = EmbeddingCollection(layout)
    emb.sparse_grad = True  # what the trainer sets for optimizer.sparse_embeddings
    return emb


def test_embed_ids_gives_sparse_gradients_when_asked() -> None:
    emb = _sparse_grad_collection()
    emb.embed_ids("a", torch.tensor([[1, 2], [2, 5]])).sum().backward()
    grad = emb.tables["d4"].weight.grad
    assert grad is not None and grad.is_sparse
    # rows 1 and 5 once, row 2 twice: d sum / d row = count
    want = torch.zeros(6, 4)
    want[1], want[2], want[5] = 1.0, 2.0, 1.0
    torch.testing.assert_close(grad.to_dense(), want)


def test_embed_sequence_gives_sparse_gradients_when_asked() -> None:
    emb = _sparse_grad_collection()
    feats = Features(
        torch.zeros(2, 1, dtype=torch.int32),
        torch.zeros(2, 0),
        {"hist": torch.tensor([[3, 1, 0], [3, 0, 0]], dtype=torch.int32)},
    )
    values, mask = emb.embed_sequence(feats, "hist")
    assert mask.tolist() == [[True, True, False], [True, False, False]]
    values.sum().backward()
    grad = emb.tables["d4"].weight.grad
    assert grad is not None and grad.is_sparse
