"""Tests that kill the mutants of ``mtlrec.models.cross_stitch``, ``mtlrec.models.mose`` and
``mtlrec.models.stem`` the rest of the suite let live (``python benchmarks/mutation.py
models``): every model's forward pass is rebuilt by hand from its own blocks, following its
paper, with options off their defaults (``tanh``, gate hidden layers, a gate temperature, GRU
cells, sluice subspaces, three stitched layers), so that an option a model forgets to pass on
changes the result. Also: the sluice orthogonality penalty against its definition and when it
is reported, dropout inside the per-task layers and experts, the per-task parameter groups, the
last shared layer, MoSE's choice of sequence and its error, and STEM's non-persistent buffer."""

from __future__ import annotations

import re

import pytest
import torch
from _model_refs import mlp_ref
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.nn.mlp import ParallelMLP
from mtlrec.testing import tiny_dataset

TASKS = ("click", "watch")
ATOL, RTOL = 1e-5, 1e-5


def _build(name: str, seed: int = 0, n: int = 32, **params: object):
    pre, ds = tiny_dataset(n=n, seed=0)
    torch.manual_seed(seed)
    model = build_model(name, pre.schema, pre.table_sizes(), params)
    return model, ds.features_at(slice(0, 12))


def _gate_ref(gate: nn.Module, x: Tensor, act, temperature: float = 1.0) -> Tensor:
    """A softmax gate: ``softmax(MLP(x) / temperature)`` over the experts."""
    return torch.softmax(mlp_ref(gate.net, x, act, last=False) / temperature, -1)


def _member_ref(bank: ParallelMLP, x: Tensor, k: int, act) -> Tensor:
    """Member ``k`` of a parallel MLP as a plain MLP: ``act(x W_l + b_l)`` layer by layer."""
    _, biases = bank.layer_tensors()
    for layer in range(len(bank.dims)):
        b = biases[layer]  # [num * d] for a fused shared-input first layer, else [num, 1, d]
        b = b.view(bank.num, -1)[k] if b.dim() == 1 else b[k, 0]
        x = act(x @ bank.member_weight(layer, k) + b)
    return x


# -- cross-stitch -------------------------------------------------------------------------------
def _stitch_ref(model: nn.Module, feats: Features, subspaces: int) -> list[Tensor]:
    """Every stitched layer's output ``[T, B, H]`` by hand (Misra et al. 2016, eq. 1; with
    subspaces, Ruder et al. 2019): each task's layer ``tanh(x_t W_t + b_t)``, then
    ``x~_u = sum_v alpha[u, v] x_v`` over the T * S pieces, piece ``t * S + s`` being subspace
    ``s`` of task ``t``."""
    t = len(TASKS)
    x = model.embedding(feats).flat
    xs = [x] * t
    outs = []
    for layer, stitch in zip(model.layers, model.stitches, strict=True):
        acts = [_member_ref(layer, xs[k], k, torch.tanh) for k in range(t)]
        w = acts[0].shape[-1] // subspaces
        pieces = [a[:, s * w : (s + 1) * w] for a in acts for s in range(subspaces)]
        alpha = stitch.alpha
        mixed = [
            sum(alpha[u, v] * pieces[v] for v in range(t * subspaces)) for u in range(t * subspaces)
        ]
        xs = [torch.cat(mixed[k * subspaces : (k + 1) * subspaces], -1) for k in range(t)]
        outs.append(torch.stack(xs))
    return outs


def test_cross_stitch_forward_equals_the_hand_built_network() -> None:
    """Three tanh layers (the towers read the last one), each mixed by a T x T unit started at
    ``self_weight`` on the diagonal and ``1 - self_weight`` off it (T = 2)."""
    model, feats = _build(
        "cross_stitch", bottom_hidden=(8, 6, 5), tower_hidden=(4,), activation="tanh",
        self_weight=0.8,
    )  # fmt: skip
    model.eval()
    for stitch in model.stitches:
        torch.testing.assert_close(stitch.alpha.detach(), torch.tensor([[0.8, 0.2], [0.2, 0.8]]))
    with torch.no_grad():
        last = _stitch_ref(model, feats, 1)[-1]
        out = model(feats)
    assert set(out.tower_inputs) == set(TASKS)
    for k, task in enumerate(TASKS):
        assert out.tower_inputs[task].shape == (12, 5)
        torch.testing.assert_close(out.tower_inputs[task], last[k], atol=ATOL, rtol=RTOL)
        logit = model.heads.towers[task](last[k]).squeeze(-1)
        torch.testing.assert_close(out.logits[task], logit, atol=ATOL, rtol=RTOL)


def test_cross_stitch_layers_apply_their_dropout() -> None:
    """In training, dropout p zeroes entries of a per-task layer and scales the rest by
    ``1 / (1 - p)``; in eval mode the layer is deterministic."""
    model, feats = _build("cross_stitch", bottom_hidden=(8, 6), dropout=0.5)
    x = model.embedding(feats).flat.detach()
    layer = model.layers[0]
    with torch.no_grad():
        ref = layer.eval()(x)
        torch.manual_seed(3)
        got = layer.train()(x)
    dropped = got == 0
    assert (dropped & (ref != 0)).any()  # some live units were dropped
    torch.testing.assert_close(got[~dropped], 2.0 * ref[~dropped])


def test_stitched_task_parameters_are_the_towers() -> None:
    for name, hidden in (("cross_stitch", (8, 6)), ("sluice", (8, 8))):
        model, _ = _build(name, bottom_hidden=hidden)
        for task in TASKS:
            want = [id(p) for p in model.heads.towers[task].parameters()]
            assert want and [id(p) for p in model.task_parameters(task)] == want


def test_stitched_last_shared_layer_is_the_last_per_task_layer() -> None:
    """The last per-task layer's weight, ``[T, H_{L-1}, H_L]``, whatever the depth."""
    model, _ = _build("cross_stitch", bottom_hidden=(8, 6, 5))
    w = model.last_shared_layer()
    assert w is model.layers[2].weights[-1]
    assert w.shape == (2, 6, 5)


# -- sluice -------------------------------------------------------------------------------------
def _penalty_ref(o: Tensor, subspaces: int) -> Tensor:
    """``sum_t sum_{i<j} ||G_ti^T G_tj||_F^2 / B`` from a plain loop."""
    t, b, d = o.shape
    w = d // subspaces
    total = torch.zeros(())
    for k in range(t):
        g = [o[k, :, s * w : (s + 1) * w] for s in range(subspaces)]
        for i in range(subspaces):
            for j in range(i + 1, subspaces):
                total = total + (g[i].T @ g[j]).square().sum()
    return total / b


def test_sluice_forward_and_penalty_equal_the_hand_built_network() -> None:
    """Subspace stitch units (T * S pieces), a per-task beta mix of the layers feeding the
    towers, and ``aux_losses['orthogonality'] = weight * sum_l penalty(out_l)`` in training."""
    model, feats = _build(
        "sluice", bottom_hidden=(8, 8), tower_hidden=(4,), activation="tanh", subspaces=2,
        orthogonality_weight=0.5,
    )  # fmt: skip
    model.train()  # no dropout: training only adds the penalty
    for stitch in model.stitches:
        assert stitch.alpha.shape == (4, 4)  # T * S pieces
    with torch.no_grad():
        # a non-uniform beta, so that each layer's share shows
        model.mix.beta.copy_(torch.tensor([[0.3, 0.7], [0.9, -0.2]]))
        outs = _stitch_ref(model, feats, 2)
        out = model(feats)
    beta = model.mix.beta
    assert set(out.tower_inputs) == set(TASKS)
    for k, task in enumerate(TASKS):
        h = beta[k, 0] * outs[0][k] + beta[k, 1] * outs[1][k]
        torch.testing.assert_close(out.tower_inputs[task], h, atol=ATOL, rtol=RTOL)
        logit = model.heads.towers[task](h).squeeze(-1)
        torch.testing.assert_close(out.logits[task], logit, atol=ATOL, rtol=RTOL)
    pen = 0.5 * sum(_penalty_ref(o, 2) for o in outs)
    assert set(out.aux_losses) == {"orthogonality"}
    assert float(pen) > 0
    torch.testing.assert_close(out.aux_losses["orthogonality"], pen, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("subspaces", "weight"), [(2, 0.0), (1, 0.5)], ids=["zero_weight", "one_subspace"]
)
def test_sluice_reports_no_penalty_without_weight_or_subspaces(
    subspaces: int, weight: float
) -> None:
    """The penalty exists only for ``orthogonality_weight > 0`` and more than one subspace
    (one subspace has no pair to be orthogonal); not even a zero entry otherwise."""
    model, feats = _build(
        "sluice", bottom_hidden=(8, 8), subspaces=subspaces, orthogonality_weight=weight
    )
    assert model.train()(feats).aux_losses == {}


# -- MoSE ---------------------------------------------------------------------------------------
def _gru(bank: nn.Module, k: int) -> nn.GRU:
    """Recurrent expert ``k`` of a bank as a ``torch.nn.GRU``."""
    w_ih = bank.w_ih[k]
    ref = nn.GRU(w_ih.shape[0], bank.hidden, batch_first=True)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(w_ih.T)
        ref.weight_hh_l0.copy_(bank.w_hh[k].T)
        ref.bias_ih_l0.copy_(bank.b_ih[k, 0])
        ref.bias_hh_l0.copy_(bank.b_hh[k, 0])
    return ref


def test_mose_forward_equals_the_hand_built_network() -> None:
    """Qin et al. 2020 with GRU cells: a GRU bottom over the real elements of a row's
    sequence, K GRU experts over the bottom's states (summarised by their last state), per
    task a softmax gate ``softmax(MLP_tanh([h_bottom, x]) / temperature)`` over the experts,
    and the task's tower reading ``[sum_k g_k e_k, x]``; against ``torch.nn.GRU``."""
    k_num, temp = 3, 2.0
    model, feats = _build(
        "mose", cell="gru", bottom_hidden=6, num_experts=k_num, expert_hidden=5,
        gate_hidden=(7,), gate_temperature=temp, activation="tanh", tower_hidden=(4,),
    )  # fmt: skip
    model.eval()
    for gate in model.gates.values():
        assert [lin.out_features for lin in gate.net.layers] == [7, k_num]
    with torch.no_grad():
        x = model.embedding(feats).flat
        seq, mask = model.embedding.embed_sequence(feats, "hist")
        bottom = _gru(model.bottom, 0)
        experts = [_gru(model.experts, k) for k in range(k_num)]
        lasts, finals = [], []
        for b in range(x.shape[0]):
            real = seq[b][mask[b]].unsqueeze(0)  # [1, L_b, E]
            if real.shape[1] == 0:  # no element: every state stays zero
                lasts.append(torch.zeros(6))
                finals.append(torch.zeros(k_num, 5))
                continue
            states, _ = bottom(real)  # [1, L_b, Hb]
            lasts.append(states[0, -1])
            finals.append(torch.stack([e(states)[0][0, -1] for e in experts]))
        last, fin = torch.stack(lasts), torch.stack(finals)  # [B, Hb], [B, K, He]
        out = model(feats)
    gate_in = torch.cat([last, x], -1)
    assert set(out.gates) == set(out.tower_inputs) == set(TASKS)
    for task in TASKS:
        g = _gate_ref(model.gates[task], gate_in, torch.tanh, temp)  # [B, K]
        torch.testing.assert_close(out.gates[task], g, atol=ATOL, rtol=RTOL)
        rep = torch.cat([(g.unsqueeze(-1) * fin).sum(1), x], -1)
        torch.testing.assert_close(out.tower_inputs[task], rep, atol=ATOL, rtol=RTOL)
        logit = model.heads.towers[task](rep).squeeze(-1)
        torch.testing.assert_close(out.logits[task], logit, atol=ATOL, rtol=RTOL)


def test_mose_reads_the_named_sequence_and_rejects_an_unknown_one() -> None:
    model, _ = _build("mose", sequence="hist", bottom_hidden=6, num_experts=2, expert_hidden=5)
    assert model.sequence == "hist"
    msg = "mose needs a sequence feature (model.params.sequence='nope'; sequence features: "
    msg += "['hist'])"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        _build("mose", sequence="nope")


# -- STEM ---------------------------------------------------------------------------------------
def test_stem_forward_equals_the_hand_built_network() -> None:
    """Su et al. 2024: expert k (a tanh MLP) reads embedding k (task k's, the last one the
    shared table), gate t is ``softmax(MLP_tanh([E_t(x), E_shared(x)]))`` over all T + 1
    experts, and tower t reads the gate's mixture (in value: stop-gradient changes nothing)."""
    model, feats = _build(
        "stem", expert_hidden=(8, 6), gate_hidden=(5,), activation="tanh", tower_hidden=(4,)
    )
    model.eval()
    for gate in model.gates.values():
        assert [lin.out_features for lin in gate.net.layers] == [5, 3]
    with torch.no_grad():
        embs = [model.embeddings[n](feats).flat for n in (*TASKS, "__shared__")]
        experts = torch.stack(
            [_member_ref(model.bank, e, k, torch.tanh) for k, e in enumerate(embs)]
        )
        out = model(feats)
    assert set(out.gates) == set(out.tower_inputs) == set(TASKS)
    for k, task in enumerate(TASKS):
        g = _gate_ref(model.gates[task], torch.cat([embs[k], embs[-1]], -1), torch.tanh)
        torch.testing.assert_close(out.gates[task], g, atol=ATOL, rtol=RTOL)
        mixed = (g.T.unsqueeze(-1) * experts).sum(0)  # [B, H]
        torch.testing.assert_close(out.tower_inputs[task], mixed, atol=ATOL, rtol=RTOL)
        logit = model.heads.towers[task](mixed).squeeze(-1)
        torch.testing.assert_close(out.logits[task], logit, atol=ATOL, rtol=RTOL)


def test_stem_experts_apply_their_dropout() -> None:
    """In training, dropout p zeroes expert units and scales the rest by ``1 / (1 - p)``."""
    model, feats = _build("stem", expert_hidden=(8,), dropout=0.5)
    x = torch.stack([model.embeddings[n](feats).flat for n in model.embeddings]).detach()
    with torch.no_grad():
        ref = model.bank.eval()(x)
        torch.manual_seed(3)
        got = model.bank.train()(x)
    dropped = got == 0
    assert (dropped & (ref != 0)).any()
    torch.testing.assert_close(got[~dropped], 2.0 * ref[~dropped])


def test_stem_trainable_mask_is_a_buffer_kept_out_of_checkpoints() -> None:
    """The gradient mask is derived from the task count, not learned: a buffer that moves with
    the model, but not part of the state dict (checkpoints load without it)."""
    model, _ = _build("stem", expert_hidden=(8,))
    want = torch.tensor([[True, False, True], [False, True, True]])  # own + shared expert
    assert torch.equal(dict(model.named_buffers())["trainable"], want)
    assert "trainable" not in model.state_dict()
