"""Tests that kill the mutants of ``mtlrec.nn.mlp`` the rest of the suite let live, each against
an independent float64 computation or a documented property: the default activation and the
layer norm of :class:`MLP` and :class:`ParallelMLP` against plain per-member loops, dropout in
training (every element zeroed or rescaled by ``1 / (1 - p)``), the recorded widths, the
empty-``dims`` error message, the in-place relu of the bank, when the fused relu-then-linear
Function is used, and gradients under ``torch.func`` transforms (where it must not be)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import mtlrec.nn.mlp as mlp_module
from mtlrec.nn.mlp import MLP, ParallelMLP

F64 = torch.float64
EPS = 1e-5  # nn.LayerNorm / F.layer_norm default


def _layer_norm(h: Tensor) -> Tensor:
    """Layer norm over the last dim without affine parameters: biased variance, eps 1e-5."""
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + EPS)


def _member_reference(
    bank: ParallelMLP, x: Tensor, k: int, *, layer_norm: bool, last_activation: bool
) -> Tensor:
    """Member ``k`` of a relu bank, one layer at a time, from the documented weight layout:
    a shared first layer keeps member k in columns ``[k*d:(k+1)*d]``, the others are
    ``[num, in, out]`` / ``[num, 1, out]``."""
    weights, biases = list(bank.weights), list(bank.biases)
    h = x if bank.shared_input else x[k]
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if i == 0 and bank.shared_input:
            d = bank.dims[0]
            h = h @ w[:, k * d : (k + 1) * d] + b[k * d : (k + 1) * d]
        else:
            h = h @ w[k] + b[k, 0]
        if i < len(weights) - 1 or last_activation:
            if layer_norm:
                h = _layer_norm(h)
            h = torch.clamp(h, min=0.0)
    return h


# -- MLP -----------------------------------------------------------------------------------------
def test_mlp_default_activation_is_relu() -> None:
    torch.manual_seed(0)
    net = MLP(4, [7]).to(F64)
    x = torch.randn(9, 4, dtype=F64)
    lin = net.layers[0]
    ref = torch.clamp(x @ lin.weight.T + lin.bias, min=0.0)
    assert torch.allclose(net(x), ref)
    assert (ref == 0).any() and (ref > 0).any()  # the relu really cut something


def test_mlp_layer_norm_is_applied_before_each_activation() -> None:
    torch.manual_seed(1)
    net = MLP(4, [6, 5], layer_norm=True).to(F64)
    assert all(isinstance(n, torch.nn.LayerNorm) for n in net.norms)
    # fresh LayerNorm: weight 1, bias 0, so the plain normalisation is the reference
    x = torch.randn(8, 4, dtype=F64) * 3.0 + 2.0
    h = x
    for lin in net.layers:
        h = torch.clamp(_layer_norm(h @ lin.weight.T + lin.bias), min=0.0)
    assert torch.allclose(net(x), h)


def test_mlp_out_dim_is_the_last_width_or_the_input_width() -> None:
    assert MLP(4, [6, 5]).out_dim == 5
    empty = MLP(4, [])
    assert empty.out_dim == 4
    x = torch.randn(3, 4)
    assert torch.equal(empty(x), x)  # identity when dims is empty


def _check_dropout(out: Tensor, ref: Tensor, p: float) -> None:
    """Inverted dropout: every element is 0 or ``ref / (1 - p)``, about a fraction p zeroed."""
    kept = out != 0
    assert torch.allclose(out[kept], ref[kept] / (1.0 - p))
    frac = 1.0 - kept.double().mean().item()
    assert 0.35 < frac < 0.65, frac


def test_mlp_dropout_in_training_zeroes_or_rescales() -> None:
    torch.manual_seed(2)
    p = 0.5
    net = MLP(8, [64], activation="sigmoid", dropout=p).to(F64)  # sigmoid > 0: no zero in ref
    x = torch.randn(32, 8, dtype=F64)
    lin = net.layers[0]
    ref = torch.sigmoid(x @ lin.weight.T + lin.bias)
    net.train()
    _check_dropout(net(x), ref, p)
    net.eval()
    assert torch.allclose(net(x), ref)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_mlp_and_parallel_mlp_refuse_a_dropout_rate_outside_0_1(rate: float) -> None:
    # a negative rate used to be accepted and silently ignored (no dropout); 1 zeroes every unit
    msg = rf"^dropout must be in \[0, 1\), got {rate}$"
    with pytest.raises(ValueError, match=msg):
        MLP(3, [4], dropout=rate)
    with pytest.raises(ValueError, match=msg):
        ParallelMLP(2, 3, [4], dropout=rate)


# -- ParallelMLP -----------------------------------------------------------------------------------
def test_parallel_mlp_without_layers_says_so() -> None:
    with pytest.raises(ValueError, match=r"^ParallelMLP needs at least one layer$"):
        ParallelMLP(3, 4, [])


def test_parallel_mlp_records_its_widths() -> None:
    bank = ParallelMLP(3, 4, [6, 5])
    assert (bank.num, bank.in_dim, bank.dims, bank.out_dim) == (3, 4, (6, 5), 5)
    assert ParallelMLP(2, 7, [9], shared_input=False).out_dim == 9


@pytest.mark.parametrize("dims", [[6], [6, 5]])
@pytest.mark.parametrize("last_activation", [True, False])
@pytest.mark.parametrize("shared_input", [True, False])
def test_parallel_mlp_layer_norm_matches_per_member_reference(
    dims: list[int], last_activation: bool, shared_input: bool
) -> None:
    torch.manual_seed(3)
    num, bsz = 3, 5
    bank = ParallelMLP(
        num, 4, dims, shared_input=shared_input, layer_norm=True, last_activation=last_activation
    ).to(F64)
    x = torch.randn(bsz, 4, dtype=F64) if shared_input else torch.randn(num, bsz, 4, dtype=F64)
    out = bank(x)
    assert out.shape == (num, bsz, dims[-1])
    for k in range(num):
        ref = _member_reference(bank, x, k, layer_norm=True, last_activation=last_activation)
        assert torch.allclose(out[k], ref), k
    if not last_activation:
        assert (out < 0).any()  # the raw last layer is neither normalised nor activated


def test_parallel_mlp_dropout_in_training_zeroes_or_rescales() -> None:
    torch.manual_seed(4)
    p = 0.5
    bank = ParallelMLP(3, 8, [32], shared_input=False, activation="sigmoid", dropout=p).to(F64)
    x = torch.randn(3, 16, 8, dtype=F64)
    ref = torch.sigmoid(torch.baddbmm(bank.biases[0], x, bank.weights[0]))
    bank.train()
    _check_dropout(bank(x), ref, p)
    bank.eval()
    assert torch.allclose(bank(x), ref)


@pytest.mark.parametrize(
    ("dims", "shared_input"), [([6], True), ([6], False), ([6, 5], True), ([6, 5], False)]
)
def test_parallel_mlp_relu_runs_in_place_on_the_matmul_result(
    dims: list[int], shared_input: bool
) -> None:
    # the relu of the bank is torch.relu_ on the fresh matmul output (no second activation
    # buffer): the returned tensor is that buffer, so its version counter has been bumped
    torch.manual_seed(5)
    bank = ParallelMLP(3, 4, dims, shared_input=shared_input)
    x = torch.randn(5, 4) if shared_input else torch.randn(3, 5, 4)
    out = bank(x)
    assert out._version > 0
    for k in range(3):
        ref = _member_reference(bank, x, k, layer_norm=False, last_activation=True)
        assert torch.allclose(out[k], ref, atol=1e-6)


def _count_fused(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = mlp_module._ReluThenMemberLinear.apply

    def spy(*args: object) -> object:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(mlp_module._ReluThenMemberLinear, "apply", spy)
    return calls


@pytest.mark.parametrize("dims", [[6, 5], [6, 5, 4]])
def test_fused_relu_linear_is_used_for_eligible_banks(
    monkeypatch: pytest.MonkeyPatch, dims: list[int]
) -> None:
    # shared input, >= 2 layers, relu, no layer norm, no dropout, autograd on: the fused path
    calls = _count_fused(monkeypatch)
    torch.manual_seed(6)
    bank = ParallelMLP(3, 4, dims).to(F64)
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    out = bank(x)
    assert len(calls) == 1
    # same values and gradients as the per-member reference
    w = torch.randn_like(out)
    (out * w).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in bank.parameters()]
    x.grad = None
    bank.zero_grad()
    ref = torch.stack(
        [_member_reference(bank, x, k, layer_norm=False, last_activation=True) for k in range(3)]
    )
    assert torch.allclose(out, ref)
    (ref * w).sum().backward()
    want = [x.grad] + [p.grad for p in bank.parameters()]
    for g, r in zip(got, want, strict=True):
        assert torch.allclose(g, r)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dims": [6]},
        {"dims": [6, 5], "shared_input": False},
        {"dims": [6, 5], "activation": "gelu"},
        {"dims": [6, 5], "layer_norm": True},
        {"dims": [6, 5], "dropout": 0.1},
    ],
)
def test_fused_relu_linear_is_not_used_for_other_banks(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict
) -> None:
    calls = _count_fused(monkeypatch)
    dims = kwargs.pop("dims")
    bank = ParallelMLP(3, 4, dims, **kwargs)
    x = torch.randn(5, 4) if bank.shared_input else torch.randn(3, 5, 4)
    bank(x)
    with torch.no_grad():  # eligible bank, but no autograd: nothing to fuse for
        ParallelMLP(3, 4, [6, 5])(torch.randn(5, 4))
    assert calls == []


def test_parallel_mlp_gradients_under_torch_func_match_autograd() -> None:
    # the fused Function has no vmap / functorch rule: under torch.func.grad the bank must take
    # the plain ops and give the same gradients as ordinary autograd (which takes the fused path)
    torch.manual_seed(7)
    bank = ParallelMLP(3, 4, [6, 5]).to(F64)
    x = torch.randn(5, 4, dtype=F64)
    params = {k: v.detach() for k, v in bank.named_parameters()}

    def loss(p: dict[str, Tensor]) -> Tensor:
        return (torch.func.functional_call(bank, p, (x,)) ** 2).sum()

    grads = torch.func.grad(loss)(params)
    (bank(x) ** 2).sum().backward()
    for name, p in bank.named_parameters():
        assert torch.allclose(grads[name], p.grad), name


# -- the fused relu-then-linear Function's backward ------------------------------------------------
def _fused_inputs(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x [B, in], the first layer (w0 [in, n*d], b0 [n*d]) and the members' second layer
    (w [n, d, o], b [n, 1, o]) for n = 3 members, d = 4, o = 2, in float64."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (3, 12), (12,), (3, 4, 2), (3, 1, 2)]
    return tuple(torch.randn(*s, generator=g, dtype=F64, requires_grad=True) for s in shapes)  # type: ignore[return-value]


def _fused_reference(
    x: Tensor, w0: Tensor, b0: Tensor, w: Tensor, b: Tensor
) -> tuple[Tensor, Tensor]:
    """Plain autograd ops: r = relu(x w0 + b0) (the Function's second output), and each
    member's ``r_k w_k + b_k`` (its first)."""
    r = torch.relu(x @ w0 + b0)
    out = torch.stack([r[:, 4 * k : 4 * k + 4] @ w[k] + b[k] for k in range(3)])
    return out, r


def _losses(out: Tensor, r: Tensor, use: str) -> Tensor:
    """Three scalar losses reading the Function's outputs as ``use`` says."""
    g = torch.Generator().manual_seed(11)
    c_out = torch.randn(3, *out.shape, generator=g, dtype=F64)
    c_r = torch.randn(3, *r.shape, generator=g, dtype=F64)
    terms = []
    for i in range(3):
        t = out.new_zeros(())
        if use in ("out", "both"):
            t = t + (out * c_out[i]).sum()
        if use in ("h", "both"):
            t = t + (r * c_r[i]).sum()
        terms.append(t)
    return torch.stack(terms)


@pytest.mark.parametrize("frozen", [(), ("w",), ("x", "w0", "b0")])
@pytest.mark.parametrize("use", ["out", "h", "both"])
@pytest.mark.parametrize("batched", [False, True])
def test_fused_function_gradients_match_plain_autograd(
    use: str, batched: bool, frozen: tuple[str, ...]
) -> None:
    # the Function returns (out, h): the bank reads only out, but its backward also takes h's
    # own gradient (added before the relu mask) and must leave w, b without one when only h is
    # read; per-loss gradients (is_grads_batched) take its vmap-friendly branch; an input that
    # needs no gradient (a frozen w, or an h made from frozen tensors) must not stop the others
    fn = mlp_module._ReluThenMemberLinear
    leaves = _fused_inputs(3)
    for name, t in zip(("x", "w0", "b0", "w", "b"), leaves, strict=True):
        t.requires_grad_(name not in frozen)
    x, w0, b0, w, b = leaves
    out, h = fn.apply(torch.addmm(b0, x, w0), w, b, 3)
    got_losses = _losses(out, h, use)
    ref_leaves = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in leaves)
    want_losses = _losses(*_fused_reference(*ref_leaves), use)
    assert torch.allclose(got_losses, want_losses)
    names = [n for n, t in zip(("x", "w0", "b0", "w", "b"), leaves, strict=True) if t.requires_grad]
    live = [t for t in leaves if t.requires_grad]
    ref_live = [t for t in ref_leaves if t.requires_grad]
    if not want_losses.requires_grad:  # only h read, and h made from frozen tensors: the
        # Function's outputs still require grad (w and b do), but no gradient reaches w or b
        got = torch.autograd.grad(got_losses.sum(), live, allow_unused=True)
        assert all(g is None for g in got)
        return
    if batched:
        eye = torch.eye(3, dtype=F64)
        got = torch.autograd.grad(got_losses, live, eye, is_grads_batched=True, allow_unused=True)
        want = torch.autograd.grad(
            want_losses, ref_live, eye, is_grads_batched=True, allow_unused=True
        )
    else:
        got = torch.autograd.grad(got_losses.sum(), live, allow_unused=True)
        want = torch.autograd.grad(want_losses.sum(), ref_live, allow_unused=True)
    for name, g, r in zip(names, got, want, strict=True):
        if r is None:  # only h read: the second layer gets no gradient at all
            assert g is None, name
        else:
            assert g is not None and torch.allclose(g, r), name


@pytest.mark.parametrize("frozen", ["w", "b", "w and b"])
@pytest.mark.parametrize("batched", [False, True])
def test_fused_bank_with_a_frozen_second_layer_still_trains_the_rest(
    frozen: str, batched: bool
) -> None:
    # a frozen second-layer weight or bias must not stop the gradients of the other tensors
    torch.manual_seed(12)
    bank = ParallelMLP(3, 4, [6, 5]).to(F64)
    if "w" in frozen:
        bank.weights[1].requires_grad_(False)
    if "b" in frozen:
        bank.biases[1].requires_grad_(False)
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    trainable = [x] + [p for p in bank.parameters() if p.requires_grad]
    out = bank(x)
    ref = torch.stack(
        [_member_reference(bank, x, k, layer_norm=False, last_activation=True) for k in range(3)]
    )
    c = torch.randn(2, *out.shape, dtype=F64)
    got_l = torch.stack([(out * c[0]).sum(), (out**2 * c[1]).sum()])
    want_l = torch.stack([(ref * c[0]).sum(), (ref**2 * c[1]).sum()])
    if batched:
        eye = torch.eye(2, dtype=F64)
        got = torch.autograd.grad(got_l, trainable, eye, is_grads_batched=True)
        want = torch.autograd.grad(want_l, trainable, eye, is_grads_batched=True)
    else:
        got = torch.autograd.grad(got_l.sum(), trainable)
        want = torch.autograd.grad(want_l.sum(), trainable)
    for g, r in zip(got, want, strict=True):
        assert torch.allclose(g, r)


def test_fused_bank_backward_under_bf16_autocast() -> None:
    # autocast runs the forward in bf16 while the saved weight stays float32: the backward
    # casts it, and the gradients agree with float32 ones to bf16 precision
    torch.manual_seed(13)
    bank = ParallelMLP(3, 8, [16, 8])
    x = torch.randn(32, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bank(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    got = [p.grad.clone() for p in bank.parameters()]
    bank.zero_grad()
    bank(x).sum().backward()
    for g, r in zip(got, (p.grad for p in bank.parameters()), strict=True):
        assert g.dtype == torch.float32
        assert torch.allclose(g, r, rtol=0.05, atol=0.05 * r.abs().max().item())
