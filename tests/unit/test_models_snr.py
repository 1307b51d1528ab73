"""SNR (Ma et al., AAAI 2019) and its hard-concrete gates (Louizos et al., ICLR 2018): the
sampler's distribution against the closed forms, the routing products, the L0 penalty closing
connections, task isolation through closed routes, and the routing report."""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import Tensor

from mtlrec.analysis.gates import expert_utilisation, gate_flags, is_route, routing_matrices
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import ConfigError
from mtlrec.losses import MultiTaskLoss
from mtlrec.models import build_model
from mtlrec.models.base import MultiTaskModel
from mtlrec.nn.mlp import ParallelMLP
from mtlrec.nn.routing import (
    HardConcrete,
    SubNetworkRouting,
    deterministic_gate,
    hard_concrete_cdf,
    prob_nonzero,
    prob_one,
    sample_hard_concrete,
)
from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec
from mtlrec.train.step import StepContext, train_step
from mtlrec.weighting import build_weighting

SNR = ("snr_trans", "snr_aver")
SMALL: dict[str, Any] = {"subnetworks": (2,), "subnetwork_hidden": (8, 6), "tower_hidden": (4,)}


@cache
def data() -> tuple[Preprocessor, ColumnarDataset]:
    """Two binary tasks, ``a`` (from the item) and ``b`` (from the price)."""
    rng = np.random.default_rng(0)
    n = 128
    user, item, price = rng.integers(0, 10, n), rng.integers(0, 12, n), rng.normal(size=n)
    table = pa.table(
        {
            "user": pa.array([f"u{u}" for u in user]),
            "item": pa.array([f"i{i}" for i in item]),
            "price": pa.array(price),
            "a": pa.array((item % 3 == 0).astype(np.int64)),
            "b": pa.array((price > 0).astype(np.int64)),
        }
    )
    schema = Schema(
        features=(
            SparseFeature(name="user", embedding_dim=4),
            SparseFeature(name="item", embedding_dim=4),
            DenseFeature(name="price"),
        ),
        tasks=(TaskSpec(name="a", kind="binary"), TaskSpec(name="b", kind="binary")),
    )
    pre = Preprocessor.fit(schema, table)
    return pre, pre.encode(table)


def build(name: str, seed: int = 0, **over: Any) -> MultiTaskModel:
    pre, _ = data()
    torch.manual_seed(seed)
    return build_model(name, pre.schema, pre.table_sizes(), {**SMALL, **over})


def task_loss(model: MultiTaskModel, task: str) -> Tensor:
    pre, ds = data()
    b = ds.take(slice(0, len(ds)))
    spec = next(t for t in pre.schema.tasks if t.name == task)
    return MultiTaskLoss([spec])(model(b.features), b)[task]


def member_grads(bank: ParallelMLP, loss: Tensor) -> Tensor:
    """Sum of |gradient| of every member of a stacked network, ``[K]``."""
    params = [*bank.weights, *bank.biases]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    k, n = bank.num, len(bank.dims)
    total = torch.zeros(k, dtype=torch.float64)
    for i, g in enumerate(grads):
        if g is None:
            continue
        g = g.abs().double()
        if i % n == 0 and bank.shared_input:  # first layer: columns / entries per member
            total += g.reshape(-1, k, bank.dims[0]).sum((0, 2)) if i < n else g.view(k, -1).sum(1)
        else:
            total += g.flatten(1).sum(1)  # [K, ...]
    return total


def permute_members_(net: ParallelMLP, perm: Tensor) -> None:
    """New member j := old member ``perm[j]`` in every layer (shared-input first layer)."""
    k = net.num
    for i, (w, b) in enumerate(zip(net.weights, net.biases, strict=True)):
        if i == 0 and net.shared_input:
            d = net.dims[0]  # columns [j*d:(j+1)*d] belong to member j
            w.copy_(w.view(w.shape[0], k, d)[:, perm].reshape(w.shape))
            b.copy_(b.view(k, d)[perm].reshape(b.shape))
        else:
            w.copy_(w[perm])  # [K, in, out]
            b.copy_(b[perm])  # [K, 1, out]


# -- the hard-concrete distribution -------------------------------------------------------------
@pytest.mark.parametrize("log_alpha", [-2.0, 0.0, 1.5])
def test_sampler_matches_the_closed_form_cdf(log_alpha: float) -> None:
    """P(z = 0), P(z = 1) and P(z <= x) inside (0, 1) of 400k draws against the closed forms
    (4 standard errors of a binomial proportion)."""
    torch.manual_seed(0)
    n = 400_000
    la = torch.full((n,), log_alpha, dtype=torch.float64)
    z = sample_hard_concrete(la)
    one = la[:1]

    def close(emp: float, want: float) -> None:
        se = math.sqrt(max(want * (1 - want), 1e-12) / n)
        assert abs(emp - want) < 4 * se + 1e-6, (log_alpha, emp, want)

    close(float((z == 0).double().mean()), float(1 - prob_nonzero(one)))
    close(float((z == 1).double().mean()), float(prob_one(one)))
    for x in (0.25, 0.5, 0.75):
        close(float((z <= x).double().mean()), float(hard_concrete_cdf(x, one)))


def test_closed_forms_by_hand() -> None:
    la = torch.tensor([0.0])
    b, g, zt = 2 / 3, -0.1, 1.1
    # P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)), here sigmoid(beta log 11)
    want = 1 / (1 + math.exp(-b * math.log(11)))
    assert float(prob_nonzero(la)) == pytest.approx(want, abs=1e-7)
    assert float(1 - hard_concrete_cdf(0.0, la)) == pytest.approx(want, abs=1e-7)
    # P(z = 1) = 1 - Q(1) = sigmoid(-beta log(1.1 / 0.1)) at log_alpha 0
    assert float(prob_one(la)) == pytest.approx(1 / (1 + math.exp(b * math.log(11))), abs=1e-7)
    # deterministic gate: min(1, max(0, sigmoid(la) (zeta - gamma) + gamma))
    assert float(deterministic_gate(la)) == pytest.approx(0.5 * (zt - g) + g)
    assert float(deterministic_gate(torch.tensor(-5.0))) == 0.0
    assert float(deterministic_gate(torch.tensor(5.0))) == 1.0


def test_sample_is_reparameterised_and_uses_its_noise() -> None:
    la = torch.zeros(3, requires_grad=True)
    u = torch.tensor([0.3, 0.5, 0.7])
    z = sample_hard_concrete(la, u)
    s = torch.sigmoid(torch.log(u / (1 - u)) / (2 / 3))
    torch.testing.assert_close(z, (s * 1.2 - 0.1).clamp(0, 1).detach())
    z.sum().backward()
    assert la.grad is not None and bool((la.grad > 0).all())  # inside (0, 1): differentiable


def test_fixed_gates_are_exact_without_gradient_or_penalty() -> None:
    fixed = torch.tensor([[0.0, math.nan], [math.nan, 1.0]])
    g = HardConcrete(2, 2, init_open=0.5, fixed=fixed)
    for mode in (True, False):
        g.train(mode)
        z = g().detach()
        assert float(z[0, 0]) == 0.0 and float(z[1, 1]) == 1.0
    p = g.open_probability().detach()
    assert float(p[0, 0]) == 0.0 and float(p[1, 1]) == 1.0
    assert float(g.l0_penalty()) == pytest.approx(2 * 0.5)  # the two learned gates only
    g.train()
    g().sum().backward()
    assert float(g.log_alpha[0].grad[0]) == 0.0 and float(g.log_alpha[1].grad[1]) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        HardConcrete(1, 2, fixed=torch.tensor([[0.5, 0.0]]))


# -- routing -------------------------------------------------------------------------------------
def test_routing_products_match_the_papers_sums() -> None:
    torch.manual_seed(0)
    u = torch.randn(3, 5, 4)  # K=3 lower outputs
    trans = SubNetworkRouting(3, 2, 4, 6, transform=True).eval()
    aver = SubNetworkRouting(3, 2, 4, 4, transform=False).eval()
    with torch.no_grad():
        for r in (trans, aver):
            for row in r.gate.log_alpha:
                row.copy_(torch.randn(3))
        v, z = trans(u)
        for j in range(2):  # Eq. 1: v_j = sum_i z_ji W_ji u_i
            want = sum(z[j, i] * u[i] @ trans.weights[j][i] for i in range(3))
            torch.testing.assert_close(v[j], want)
        v, z = aver(u)
        for j in range(2):  # Eq. 2: v_j = sum_i z_ji u_i
            torch.testing.assert_close(v[j], sum(z[j, i] * u[i] for i in range(3)))
    with pytest.raises(ValueError, match="equal widths"):
        SubNetworkRouting(3, 2, 4, 6, transform=False)


@pytest.mark.parametrize("name", SNR)
def test_gates_report_every_connections_open_probability(name: str) -> None:
    model = build(name, subnetworks=(3, 2)).eval()
    out = model(data()[1].features_at(slice(0, 5)))
    want = {f"route:sub0.{i}->sub1.{j}" for i in range(3) for j in range(2)}
    want |= {f"route:sub1.{i}->{t}" for i in range(2) for t in ("a", "b")}
    assert set(out.gates) == want
    p = model.routings[1].open_probability()  # [tasks, sources]
    for g in out.gates.values():
        assert g.shape == (5, 2)
        torch.testing.assert_close(g.sum(-1), torch.ones(5))
    torch.testing.assert_close(out.gates["route:sub1.1->b"][0, 0], p[1, 1])
    assert model.expected_open_routes() == pytest.approx(10 * 0.9, abs=1e-5)


@pytest.mark.parametrize("name", SNR)
def test_strong_l0_penalty_closes_the_connections(name: str) -> None:
    """400 steps with a strong L0 penalty: the expected number of open connections
    falls toward 0; without the penalty it stays high (the test has teeth)."""
    pre, ds = data()
    batch = ds.take(slice(0, len(ds)))
    result = {}
    for weight in (0.0, 1.0):
        model = build(name, subnetworks=(3,), l0_weight=weight)
        start = model.expected_open_routes()
        ctx = StepContext(
            model,
            MultiTaskLoss(list(pre.schema.tasks)),
            build_weighting("static", ["a", "b"]),
            torch.optim.Adam(model.parameters(), lr=0.02),
        )
        for _ in range(400):
            train_step(ctx, batch)
        result[weight] = model.expected_open_routes()
        assert start == pytest.approx(6 * 0.9, abs=1e-5)
    assert result[1.0] < 0.5, result  # of 6 connections
    assert result[0.0] > 3.0, result
    model.eval()
    with torch.no_grad():  # the deterministic gates are closed too
        assert float(sum(r.gate().sum() for r in model.routings)) < 0.5


@pytest.mark.parametrize("name", SNR)
@pytest.mark.parametrize("levels", [1, 2])
def test_closed_routes_isolate_the_tasks(name: str, levels: int) -> None:
    """With the crossing routes fixed closed, task a's loss gives exactly zero gradient to task
    b's sub-networks (and its tower and routes), and the other way round; with them open it
    reaches every sub-network. The open routes start at P(open) = 0.999, so that no sampled
    zero voids the check."""
    if levels == 1:
        closed: dict[str, Any] = {"subnetworks": (2,), "closed_routes": ("sub0.1->a", "sub0.0->b")}
        closed["init_open"] = 0.999
    else:
        closed = {
            "subnetworks": (2, 2),
            "closed_routes": ("sub0.1->sub1.0", "sub0.0->sub1.1", "sub1.1->a", "sub1.0->b"),
            "init_open": 0.999,
        }
    for own, other in ((0, 1), (1, 0)):
        task = "ab"[own]
        model = build(name, **closed)  # training mode: sampled gates
        loss = task_loss(model, task)
        for bank in model.levels:
            g = member_grads(bank, loss)
            assert float(g[other]) == 0.0, (task, g)
            assert float(g[own]) > 0.0, (task, g)
        theirs = model.task_parameters("ab"[other])
        grads = torch.autograd.grad(loss, theirs, allow_unused=True)
        assert all(gr is None or not gr.any() for gr in grads)
    open_model = build(name, subnetworks=closed["subnetworks"], init_open=0.999)
    g = member_grads(open_model.levels[0], task_loss(open_model, "a"))
    assert bool((g > 0).all()), g


def test_route_options_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"unknown route 'sub0\.5->a'"):
        build("snr_trans", closed_routes=("sub0.5->a",))
    with pytest.raises(ConfigError, match="both"):
        build("snr_trans", closed_routes=("sub0.0->a",), open_routes=("sub0.0->a",))
    model = build("snr_trans", open_routes=("sub0.0->a",)).eval()
    assert float(model.routings[0].open_probability()[0, 0]) == 1.0


@pytest.mark.parametrize("name", SNR)
def test_permuting_subnetworks_with_their_routes_changes_nothing(name: str) -> None:
    model = build(name, subnetworks=(3, 2)).eval()
    with torch.no_grad():
        for r in model.routings:
            for row in r.gate.log_alpha:
                row.add_(torch.randn_like(row))
    feats = data()[1].features_at(slice(0, 9))
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        ref = model(feats)
        permute_members_(model.levels[0], perm)
        r = model.routings[0]
        for j in range(r.num_out):  # connections from the permuted sources move with them
            r.gate.log_alpha[j].copy_(r.gate.log_alpha[j][perm])
            if r.transform:
                r.weights[j].copy_(r.weights[j][perm])
        out = model(feats)
    for k, v in ref.logits.items():
        torch.testing.assert_close(out.logits[k], v, atol=1e-5, rtol=1e-5)
    # without moving the routes the outputs change
    with torch.no_grad():
        permute_members_(model.levels[0], perm)
        moved = model(feats)
    assert any(not torch.allclose(moved.logits[k], v, atol=1e-5) for k, v in ref.logits.items())


def test_snr_towers_take_task_chaining() -> None:
    model = build("snr_trans", chain={"b": "a"}, chain_detach=False)
    out = model(data()[1].features_at(slice(0, 4)))
    assert out.tower_inputs["b"].shape == (4, 6 + 1)  # the routed input and P(a)
    torch.testing.assert_close(out.tower_inputs["b"][:, -1], torch.sigmoid(out.logits["a"]))


# -- the routing report ------------------------------------------------------------------------
def test_gate_analysis_and_report_show_the_routing(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from mtlrec.analysis.report import gate_entropy_plot, gate_heatmap, routing_heatmap

    model = build("snr_trans", subnetworks=(3,), closed_routes=("sub0.2->a",))
    with torch.no_grad():
        model.routings[0].gate.log_alpha[1][0] = -8.0  # sub0.0 -> b nearly closed
    stats = expert_utilisation(model, data()[1])
    assert all(is_route(g) for g in stats)
    layers = routing_matrices(stats)
    assert list(layers) == ["sub0 -> towers"]
    m = layers["sub0 -> towers"]
    assert m["targets"] == ["a", "b"] and m["sources"] == ["sub0.0", "sub0.1", "sub0.2"]
    p = model.routings[0].open_probability().detach()
    np.testing.assert_allclose(np.array(m["open"]), p.numpy(), atol=1e-6)
    assert m["open"][0][2] == 0.0
    assert gate_flags("route:sub0.0->b", stats["route:sub0.0->b"]["utilisation"])["closed"]
    assert not gate_flags("route:sub0.1->b", stats["route:sub0.1->b"]["utilisation"])["closed"]
    assert gate_flags("route:sub0.0->b", [0.01, 0.99])["dead"] == []
    img = routing_heatmap(stats, "snr")
    assert img.startswith("<img") and "routing heatmap" in img
    assert gate_heatmap(stats, "snr") == ""  # routes are not expert gates
    recs = [
        {"epoch": e, "gate_entropy": {g: v["entropy"] for g, v in stats.items()}} for e in (1, 2)
    ]
    assert gate_entropy_plot(recs, "snr").startswith("<img")
