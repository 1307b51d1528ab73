"""Tests of the nn blocks: ParallelMLP / ExpertBank, Gate, mix, EmbeddingCollection, TaskHeads.

Every block is checked against a plain, independent re-computation (Python loops over members,
per-table ``F.embedding``), plus the known traps of peer libraries: identical expert
initialisation, a softmax over the wrong axis, towers without a width-1 output.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mtlrec.batch import PAD_ID, Features
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout, FieldSpec, SequenceSpec
from mtlrec.nn.experts import ExpertBank
from mtlrec.nn.gates import Gate
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mixture import mix
from mtlrec.nn.mlp import ParallelMLP
from mtlrec.schema import TaskSpec
from mtlrec.testing import tiny_dataset, tiny_schema

# Our own reference activations (not the module's table), so a wrong mapping is caught.
REF_ACT = {
    "relu": lambda x: torch.clamp(x, min=0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "silu": lambda x: x / (1.0 + torch.exp(-x)),
    "tanh": torch.tanh,
    "sigmoid": lambda x: 1.0 / (1.0 + torch.exp(-x)),
    "leaky_relu": lambda x: torch.where(x >= 0, x, 0.01 * x),
}


# -- ParallelMLP ---------------------------------------------------------------------------------
def member_bias(pm: ParallelMLP, layer: int, k: int) -> Tensor:
    """The ``[out]`` bias of member ``k`` in ``layer``."""
    b = pm.biases[layer]
    d = pm.dims[layer]
    if layer == 0 and pm.shared_input:
        return b[k * d : (k + 1) * d]
    return b[k].reshape(d)


def loop_reference(pm: ParallelMLP, x: Tensor) -> Tensor:
    """Each member as its own MLP, in a Python loop: ``[num, B, dims[-1]]``."""
    act = REF_ACT[pm.activation]
    outs = []
    n_layers = len(pm.dims)
    for k in range(pm.num):
        h = x if pm.shared_input else x[k]
        for i in range(n_layers):
            h = h @ pm.member_weight(i, k) + member_bias(pm, i, k)
            if i < n_layers - 1 or pm.last_activation:
                if pm.layer_norm:
                    mu = h.mean(-1, keepdim=True)
                    var = h.var(-1, unbiased=False, keepdim=True)
                    h = (h - mu) / torch.sqrt(var + 1e-5)
                h = act(h)
        outs.append(h)
    return torch.stack(outs)


@pytest.mark.parametrize("shared_input", [True, False])
@pytest.mark.parametrize("dims", [(5,), (6, 3), (7, 4, 2)])
@pytest.mark.parametrize("last_activation", [True, False])
def test_parallel_mlp_equals_loop_of_members(
    shared_input: bool, dims: tuple[int, ...], last_activation: bool
) -> None:
    torch.manual_seed(0)
    num, in_dim, b = 4, 9, 6
    pm = ParallelMLP(num, in_dim, dims, shared_input=shared_input, last_activation=last_activation)
    x = torch.randn(b, in_dim) if shared_input else torch.randn(num, b, in_dim)
    out = pm(x)
    assert out.shape == (num, b, dims[-1])
    torch.testing.assert_close(out, loop_reference(pm, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared_input", [True, False])
def test_parallel_mlp_gradients_equal_loop(shared_input: bool) -> None:
    """The fused forward (with its in-place activation) differentiates like the loop."""
    torch.manual_seed(1)
    num, in_dim = 3, 5
    pm = ParallelMLP(num, in_dim, (6, 4, 3), shared_input=shared_input)
    x = torch.randn(7, in_dim) if shared_input else torch.randn(num, 7, in_dim)
    x.requires_grad_(True)
    w_out = torch.randn(num, 7, 3)
    g_fused = torch.autograd.grad((pm(x) * w_out).sum(), [x, *pm.parameters()])
    g_loop = torch.autograd.grad((loop_reference(pm, x) * w_out).sum(), [x, *pm.parameters()])
    for a, r in zip(g_fused, g_loop, strict=True):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [(6, 4), (6, 4, 3)])
def test_parallel_mlp_per_task_jacobian_equals_loop(dims: tuple[int, ...]) -> None:
    """The fused relu + second layer also differentiates under ``is_grads_batched`` (the
    per-task gradients of gradient-based balancing strategies)."""
    torch.manual_seed(2)
    num, in_dim = 3, 5
    pm = ParallelMLP(num, in_dim, dims)
    x = torch.randn(7, in_dim, requires_grad=True)

    def task_losses(out: Tensor) -> Tensor:
        return torch.stack([out[0].pow(2).mean(), (out[1:] * 0.3).sum(), out.sin().sum()])

    eye = torch.eye(3)
    params = [x, *pm.parameters()]
    jac = torch.autograd.grad(task_losses(pm(x)), params, eye, is_grads_batched=True)
    ref = torch.autograd.grad(
        task_losses(loop_reference(pm, x)), params, eye, is_grads_batched=True
    )
    for a, r in zip(jac, ref, strict=True):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_parallel_mlp_fused_backward_gradcheck() -> None:
    torch.manual_seed(3)
    pm = ParallelMLP(3, 4, (5, 2)).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    # away from the relu kink, where finite differences are not defined
    with torch.no_grad():
        pm.biases[0].add_(torch.sign(pm.biases[0]) * 0.5)
    assert torch.autograd.gradcheck(lambda x, *p: pm(x), (x, *pm.parameters()))


@pytest.mark.parametrize("activation", sorted(REF_ACT))
@pytest.mark.parametrize("shared_input", [True, False])
def test_parallel_mlp_activations(activation: str, shared_input: bool) -> None:
    torch.manual_seed(2)
    pm = ParallelMLP(3, 6, (5, 4), shared_input=shared_input, activation=activation)
    x = 2.0 * (torch.randn(8, 6) if shared_input else torch.randn(3, 8, 6))
    torch.testing.assert_close(pm(x), loop_reference(pm, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared_input", [True, False])
@pytest.mark.parametrize("dims", [(5,), (6, 4), (6, 5, 3)])
def test_parallel_mlp_layer_norm(shared_input: bool, dims: tuple[int, ...]) -> None:
    torch.manual_seed(3)
    pm = ParallelMLP(3, 6, dims, shared_input=shared_input, layer_norm=True)
    x = 3.0 * (torch.randn(8, 6) if shared_input else torch.randn(3, 8, 6))
    torch.testing.assert_close(pm(x), loop_reference(pm, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared_input", [True, False])
def test_parallel_mlp_dropout_eval_is_identity_and_train_drops(shared_input: bool) -> None:
    torch.manual_seed(4)
    pm = ParallelMLP(3, 6, (16, 8), shared_input=shared_input, dropout=0.5)
    x = torch.randn(10, 6) if shared_input else torch.randn(3, 10, 6)
    pm.eval()
    ref = loop_reference(pm, x)  # the reference applies no dropout
    torch.testing.assert_close(pm(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pm(x), pm(x))  # deterministic in eval
    pm.train()
    assert not torch.allclose(pm(x), ref)


def test_parallel_mlp_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        ParallelMLP(3, 4, [])
    with pytest.raises(ValueError, match="activation"):
        ParallelMLP(3, 4, [2], activation="nope")


def test_member_weight_is_a_view_of_the_stacked_parameter() -> None:
    pm = ParallelMLP(3, 4, (5, 2))
    for layer, k in itertools.product(range(2), range(3)):
        w = pm.member_weight(layer, k)
        assert w.shape == ((4, 5) if layer == 0 else (5, 2))
        assert w.data_ptr() >= pm.weights[layer].data_ptr()
    with torch.no_grad():
        pm.member_weight(0, 1).fill_(7.0)
    assert (pm.weights[0][:, 5:10] == 7.0).all()
    assert not (pm.weights[0][:, :5] == 7.0).any()
    assert not (pm.weights[0][:, 10:] == 7.0).any()


# -- expert initialisation -------------------------------------------------------------------------
def _flat_member(bank: ParallelMLP, k: int) -> Tensor:
    parts = []
    for i in range(len(bank.dims)):
        parts += [bank.member_weight(i, k).reshape(-1), member_bias(bank, i, k).reshape(-1)]
    return torch.cat(parts)


@pytest.mark.parametrize("shared_input", [True, False])
def test_experts_initialised_independently(shared_input: bool) -> None:
    torch.manual_seed(5)
    e, in_dim, dims = 6, 10, (8, 4)
    bank = ExpertBank(e, in_dim, dims, shared_input=shared_input)
    for i in range(len(dims)):
        fan_in = in_dim if i == 0 else dims[i - 1]
        assert bank.weights[i].abs().max() <= 1.0 / math.sqrt(fan_in) + 1e-7
        for j, k in itertools.combinations(range(e), 2):
            wj, wk = bank.member_weight(i, j), bank.member_weight(i, k)
            assert not torch.allclose(wj, wk), f"layer {i}: experts {j} and {k} share weights"
            bj, bk = member_bias(bank, i, j), member_bias(bank, i, k)
            assert not torch.allclose(bj, bk), f"layer {i}: experts {j} and {k} share biases"
    # no member is a (scaled or noisy) copy of another: their parameters are uncorrelated
    flat = torch.stack([_flat_member(bank, k) for k in range(e)])
    corr = torch.corrcoef(flat)
    off = corr[~torch.eye(e, dtype=torch.bool)]
    assert off.abs().max() < 0.5
    # and they compute different functions
    x = torch.randn(32, in_dim) if shared_input else torch.randn(32, in_dim).expand(e, 32, in_dim)
    out = bank(x)
    for j, k in itertools.combinations(range(e), 2):
        assert not torch.allclose(out[j], out[k], atol=1e-4)


def test_expert_banks_depend_on_the_seed() -> None:
    torch.manual_seed(10)
    a = ExpertBank(4, 6, (5, 3))
    torch.manual_seed(11)
    b = ExpertBank(4, 6, (5, 3))
    torch.manual_seed(10)
    c = ExpertBank(4, 6, (5, 3))
    for wa, wb, wc in zip(a.weights, b.weights, c.weights, strict=True):
        assert not torch.allclose(wa, wb)
        assert torch.equal(wa, wc)
    x = torch.randn(5, 6)
    assert not torch.allclose(a(x), b(x))
    assert a.num_experts == 4 and a(x).shape == (4, 5, 3)


# -- Gate ----------------------------------------------------------------------------------------
@settings(deadline=None, max_examples=30)
@given(
    batch=st.integers(1, 33),
    scale=st.floats(1e-3, 1e3),
    temperature=st.floats(0.05, 20.0),
    seed=st.integers(0, 2**16),
)
def test_gate_rows_are_distributions(
    batch: int, scale: float, temperature: float, seed: int
) -> None:
    torch.manual_seed(seed)
    gate = Gate(6, 5, temperature=temperature)
    g = gate(scale * torch.randn(batch, 6))
    assert g.shape == (batch, 5)
    assert torch.isfinite(g).all()
    assert (g >= 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(batch), atol=1e-5, rtol=0)


def test_gate_softmax_is_over_the_expert_axis() -> None:
    torch.manual_seed(6)
    gate = Gate(6, 4, temperature=1.5)
    x = torch.randn(5, 6)
    g = gate(x)
    z = gate.logits(x)
    manual = torch.exp(z / 1.5) / torch.exp(z / 1.5).sum(dim=1, keepdim=True)
    torch.testing.assert_close(g, manual, atol=1e-6, rtol=1e-5)
    # shifting one expert's logit column: rows stay distributions, the ratios of the other
    # experts within each row are unchanged, and no row leaks into another
    last = gate.net.layers[-1]
    with torch.no_grad():
        last.bias[2] += 1.0
    g2 = gate(x)
    torch.testing.assert_close(g2.sum(-1), torch.ones(5), atol=1e-6, rtol=0)
    assert (g2[:, 2] > g[:, 2]).all()
    others = [0, 1, 3]
    torch.testing.assert_close(
        g2[:, others] / g2[:, others].sum(-1, keepdim=True),
        g[:, others] / g[:, others].sum(-1, keepdim=True),
        atol=1e-6,
        rtol=1e-5,
    )
    # changing one row of the input changes only that row of the output
    x2 = x.clone()
    x2[0] += 5.0
    g3 = gate(x2)
    assert not torch.allclose(g3[0], g2[0])
    torch.testing.assert_close(g3[1:], g2[1:])


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def test_gate_temperature_above_one_increases_entropy() -> None:
    torch.manual_seed(7)
    base = Gate(6, 4)
    hot = Gate(6, 4, temperature=3.0)
    cold = Gate(6, 4, temperature=0.3)
    hot.load_state_dict(base.state_dict())
    cold.load_state_dict(base.state_dict())
    x = 3.0 * torch.randn(16, 6)
    h1, h_hot, h_cold = _entropy(base(x)), _entropy(hot(x)), _entropy(cold(x))
    assert (h_hot > h1).all()
    assert (h_cold < h1).all()
    assert (h_hot <= math.log(4) + 1e-6).all()


def test_gate_hidden_layers_and_validation() -> None:
    torch.manual_seed(8)
    gate = Gate(6, 4, hidden=(8, 5))
    assert [lin.out_features for lin in gate.net.layers] == [8, 5, 4]
    x = torch.randn(9, 6)
    g = gate(x)
    assert g.shape == (9, 4)
    torch.testing.assert_close(g, torch.softmax(gate.logits(x), dim=-1))
    torch.testing.assert_close(g.sum(-1), torch.ones(9), atol=1e-6, rtol=0)
    g.sum().backward()
    assert all(p.grad is not None for p in gate.parameters())
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            Gate(6, 4, temperature=bad)


# -- mix -----------------------------------------------------------------------------------------
def test_mix_equals_explicit_loop() -> None:
    torch.manual_seed(9)
    g_n, b, e, d = 3, 5, 4, 6
    gates = torch.softmax(torch.randn(g_n, b, e), dim=-1)
    experts = torch.randn(e, b, d)
    out = mix(gates, experts)
    assert out.shape == (g_n, b, d)
    ref = torch.zeros(g_n, b, d)
    for gi in range(g_n):
        for row in range(b):
            for k in range(e):
                ref[gi, row] += gates[gi, row, k] * experts[k, row]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_mix_rejects_wrong_expert_count() -> None:
    with pytest.raises(ValueError, match="experts"):
        mix(torch.rand(2, 3, 4), torch.randn(5, 3, 6))


# -- EmbeddingCollection ---------------------------------------------------------------------------
def _tiny_collection(seed: int = 0) -> tuple[EmbeddingCollection, Features]:
    pre, ds = tiny_dataset(n=40)
    layout = FeatureLayout.from_schema(tiny_schema(), pre.table_sizes())
    torch.manual_seed(seed)
    return EmbeddingCollection(layout, pad_to=1), ds.features_at(slice(0, 40))


def _find_block(flat: Tensor, block: Tensor) -> list[int]:
    d = block.shape[1]
    return [o for o in range(flat.shape[1] - d + 1) if torch.allclose(flat[:, o : o + d], block)]


def _ref_pool(vals: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """Loop reference of sequence pooling over the real positions."""
    out = torch.zeros(vals.shape[0], vals.shape[2])
    for r in range(vals.shape[0]):
        real = vals[r][mask[r]]
        if len(real) == 0:
            continue
        if pooling == "mean":
            out[r] = real.mean(0)
        elif pooling == "sum":
            out[r] = real.sum(0)
        else:
            out[r] = real.max(0).values
    return out


def test_embedding_lookup_equals_per_table_embedding() -> None:
    emb, feats = _tiny_collection()
    out = emb(feats)
    lay = emb.layout
    assert out.flat.shape == (40, lay.flat_dim)
    col = 0
    for j, f in enumerate(lay.sparse):
        ref = F.embedding(feats.sparse[:, j].long(), emb.table_weight(f.table))
        torch.testing.assert_close(out.flat[:, col : col + f.dim], ref, atol=0, rtol=0)
        col += f.dim
    for s in lay.sequences:
        ids = feats.sequences[s.name].long()
        vals = F.embedding(ids, emb.table_weight(s.table))
        ref = _ref_pool(vals, ids != PAD_ID, s.pooling)
        torch.testing.assert_close(out.flat[:, col : col + s.dim], ref, atol=1e-6, rtol=1e-5)
        col += s.dim
    torch.testing.assert_close(out.flat[:, col:], feats.dense)
    assert col + len(lay.dense) == lay.flat_dim


def test_table_weight_is_the_right_slice() -> None:
    emb, _ = _tiny_collection()
    for name, size in emb.layout.table_sizes.items():
        w = emb.table_weight(name)
        assert w.shape == (size, emb.layout.table_dims[name])
    # the two tables of the tiny schema do not overlap in the fused weight
    u, i = emb.table_weight("user"), emb.table_weight("item")
    with torch.no_grad():
        u.fill_(1.0)
        i.fill_(2.0)
    fused = next(iter(emb.tables.values())).weight
    assert (fused == 1.0).sum() == u.numel() and (fused == 2.0).sum() == i.numel()


def test_shared_table_same_id_same_vector() -> None:
    emb, _ = _tiny_collection()
    lay = emb.layout
    item_col = [f.name for f in lay.sparse].index("item")
    ids = torch.tensor([2, 5, 7, 11], dtype=torch.int32)
    n = len(ids)
    sparse = torch.full((n, len(lay.sparse)), 3, dtype=torch.int32)
    sparse[:, item_col] = ids
    hist = torch.zeros(n, 5, dtype=torch.int32)
    hist[:, 0] = ids  # a history of exactly the current item
    feats = Features(
        sparse, torch.zeros(n, 1), {"hist": hist}, tuple(f.name for f in lay.sparse), ("price",)
    )
    flat = emb(feats).flat
    d = lay.table_dims["item"]
    item_vec = flat[:, item_col * d : (item_col + 1) * d]
    hist_start = sum(f.dim for f in lay.sparse)
    torch.testing.assert_close(flat[:, hist_start : hist_start + d], item_vec, atol=1e-6, rtol=0)
    # and the item rows are exactly the item table's rows
    torch.testing.assert_close(item_vec, emb.table_weight("item")[ids.long()])
    # a different table (user) with the same ids reads other rows
    assert not torch.allclose(emb.table_weight("user")[ids.long()], item_vec)


def _seq_layout(pooling: str) -> FeatureLayout:
    return FeatureLayout(
        sparse=(FieldSpec("item", "item", 3),),
        sequences=(SequenceSpec("hist", "item", 3, pooling, 6),),
        dense=(),
        table_sizes={"item": 9},
        table_dims={"item": 3},
    )


def _seq_features(hist: Tensor) -> Features:
    n = hist.shape[0]
    return Features(
        torch.full((n, 1), 2, dtype=torch.int32),
        torch.zeros(n, 0),
        {"hist": hist.to(torch.int32)},
        ("item",),
        (),
    )


HIST = torch.tensor(
    [
        [3, 4, 5, 0, 0, 0],
        [8, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],  # all padding
        [2, 2, 7, 6, 5, 4],
        [1, 0, 6, 0, 0, 0],  # OOV and an interior pad
    ]
)


@pytest.mark.parametrize("pooling", ["mean", "sum", "max"])
def test_sequence_pooling(pooling: str) -> None:
    torch.manual_seed(12)
    emb = EmbeddingCollection(_seq_layout(pooling), pad_to=1)
    out = emb(_seq_features(HIST)).flat[:, 3:]  # after the item field
    w = emb.table_weight("item")
    ref = _ref_pool(F.embedding(HIST, w), HIST != PAD_ID, pooling)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[2], torch.zeros(3))  # all-padding row gives zeros
    # changing the padding row of the weight changes nothing
    with torch.no_grad():
        w[PAD_ID] = torch.tensor([100.0, -100.0, 55.0])
    torch.testing.assert_close(emb(_seq_features(HIST)).flat[:, 3:], out, atol=1e-6, rtol=1e-5)
    # appending padding changes nothing
    longer = torch.cat([HIST, torch.zeros(5, 4, dtype=HIST.dtype)], dim=1)
    torch.testing.assert_close(emb(_seq_features(longer)).flat[:, 3:], out, atol=1e-6, rtol=1e-5)
    # the unpooled view marks the real positions
    vals, mask = emb.embed_sequence(_seq_features(HIST), "hist")
    assert vals.shape == (5, 6, 3) and torch.equal(mask, HIST != PAD_ID)


def test_all_padding_max_pooling_has_finite_gradient() -> None:
    emb = EmbeddingCollection(_seq_layout("max"), pad_to=1)
    out = emb(_seq_features(HIST)).flat
    out.sum().backward()
    grad = next(iter(emb.tables.values())).weight.grad
    assert torch.isfinite(grad).all()


def test_mixed_embedding_dims() -> None:
    torch.manual_seed(13)
    lay = FeatureLayout(
        sparse=(
            FieldSpec("user", "user", 4),
            FieldSpec("item", "item", 6),
            FieldSpec("city", "city", 4),
        ),
        sequences=(SequenceSpec("hist", "item", 6, "mean", 4),),
        dense=("price", "age"),
        table_sizes={"user": 7, "item": 11, "city": 5},
        table_dims={"user": 4, "item": 6, "city": 4},
    )
    emb = EmbeddingCollection(lay, pad_to=1)
    assert len(emb.tables) == 2  # one fused table per width
    n = 12
    g = torch.Generator().manual_seed(0)
    sparse = torch.stack(
        [torch.randint(1, size, (n,), generator=g) for size in (7, 11, 5)], dim=1
    ).to(torch.int32)
    hist = torch.randint(0, 11, (n, 4), generator=g).to(torch.int32)
    dense = torch.randn(n, 2)
    feats = Features(sparse, dense, {"hist": hist}, ("user", "item", "city"), ("price", "age"))
    out = emb(feats)
    assert out.flat.shape == (n, lay.flat_dim) == (n, 4 + 6 + 4 + 6 + 2)
    assert out.fields is None  # fields of different widths cannot be stacked
    blocks = [
        F.embedding(sparse[:, j].long(), emb.table_weight(f.table))
        for j, f in enumerate(lay.sparse)
    ]
    blocks.append(_ref_pool(F.embedding(hist, emb.table_weight("item")), hist != PAD_ID, "mean"))
    blocks.append(dense)
    taken: set[int] = set()
    for blk in blocks:
        found = [o for o in _find_block(out.flat, blk) if o not in taken]
        assert found, "a field's embedding is missing from the flat output"
        taken.update(range(found[0], found[0] + blk.shape[1]))
    assert taken == set(range(lay.flat_dim))


def test_single_width_fields_tensor() -> None:
    emb, feats = _tiny_collection()
    out = emb(feats)
    assert out.fields is not None and out.fields.shape == (40, 2, 4)
    torch.testing.assert_close(out.fields.reshape(40, -1), out.flat[:, :8])


def test_gradient_touches_only_looked_up_rows() -> None:
    emb, feats = _tiny_collection()
    feats = Features(
        feats.sparse[:6],
        feats.dense[:6],
        {k: v[:6] for k, v in feats.sequences.items()},
        feats.sparse_names,
        feats.dense_names,
    )
    emb(feats).flat.sum().backward()
    lay = emb.layout
    expected: set[int] = set()
    for j, f in enumerate(lay.sparse):
        off = emb.table_offset[f.table]
        expected |= {off + int(i) for i in feats.sparse[:, j]}
    for s in lay.sequences:
        off = emb.table_offset[s.table]
        ids = feats.sequences[s.name]
        expected |= {off + int(i) for i in ids[ids != PAD_ID]}
    (weight,) = [t.weight for t in emb.tables.values()]
    touched = set(torch.nonzero(weight.grad.abs().sum(1) > 0).flatten().tolist())
    assert touched == expected
    assert len(expected) < weight.shape[0]  # the test would notice a dense gradient


def test_empty_batch_embeds_to_zero_rows() -> None:
    emb, feats = _tiny_collection()
    empty = Features(
        feats.sparse[:0],
        feats.dense[:0],
        {k: v[:0] for k, v in feats.sequences.items()},
        feats.sparse_names,
        feats.dense_names,
    )
    assert emb(empty).flat.shape == (0, emb.layout.flat_dim)


# -- TaskHeads -----------------------------------------------------------------------------------
TASKS = (
    TaskSpec(name="ctr", kind="binary"),
    TaskSpec(name="watch", kind="regression"),
    TaskSpec(name="genre", kind="multiclass", num_classes=3),
)


@pytest.mark.parametrize("hidden", [(), (5,), (6, 4)])
def test_task_heads_output_widths(hidden: tuple[int, ...]) -> None:
    torch.manual_seed(14)
    heads = TaskHeads(TASKS, 7, hidden)
    for t in TASKS:
        linears = [m for m in heads.towers[t.name].modules() if isinstance(m, nn.Linear)]
        assert len(linears) == len(hidden) + 1
        assert linears[-1].out_features == t.output_dim
        assert linears[0].in_features == 7
    b = 5
    x = torch.randn(b, 7)
    stacked = torch.randn(len(TASKS), b, 7)
    keyed = {t.name: torch.randn(b, 7) for t in TASKS}
    for inputs in (x, stacked, keyed):
        out = heads(inputs)
        assert set(out) == {t.name for t in TASKS}
        assert out["ctr"].shape == (b,)
        assert out["watch"].shape == (b,)
        assert out["genre"].shape == (b, 3)
    # stacked inputs are routed by task order, keyed inputs by name
    out = heads(stacked)
    for i, t in enumerate(TASKS):
        ref = heads.towers[t.name](stacked[i])
        torch.testing.assert_close(out[t.name], ref.squeeze(-1) if t.output_dim == 1 else ref)
        ref = heads.towers[t.name](keyed[t.name])
        torch.testing.assert_close(
            heads(keyed)[t.name], ref.squeeze(-1) if t.output_dim == 1 else ref
        )


def test_task_heads_batch_of_one() -> None:
    heads = TaskHeads(TASKS, 4, (3,))
    out = heads(torch.randn(1, 4))
    assert out["ctr"].shape == (1,) and out["genre"].shape == (1, 3)


def test_flat_width_padded_with_zeros_to_a_multiple_of_8() -> None:
    """Default padding rounds the flat width up with zero columns that change nothing."""
    lay = FeatureLayout(
        (FieldSpec("a", "a", 4), FieldSpec("b", "b", 4)),
        (),
        ("x",),
        {"a": 5, "b": 7},
        {"a": 4, "b": 4},
    )
    feats = Features(torch.tensor([[2, 3], [4, 6]], dtype=torch.int32), torch.ones(2, 1))
    padded = EmbeddingCollection(lay)
    plain = EmbeddingCollection(lay, pad_to=1)
    plain.load_state_dict(padded.state_dict())
    out, ref = padded(feats).flat, plain(feats).flat
    assert padded.out_dim == 16 and out.shape == (2, 16) and ref.shape == (2, 9)
    torch.testing.assert_close(out[:, :9], ref)
    assert torch.count_nonzero(out[:, 9:]) == 0
