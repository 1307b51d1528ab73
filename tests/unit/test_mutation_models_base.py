"""Tests that kill the mutants of ``mtlrec.models.base`` and ``mtlrec.models.snr`` the rest of
the suite let live (``python benchmarks/mutation.py models``).

Base: ``ModelOutput.predictions`` asked by task name (and its exact ``KeyError`` messages with
and without task specs), ``probabilities`` and ``predict_proba`` with a subset of tasks (and the
training mode restored), a model called with a keyword argument, no task specs attached while
``torch.jit.trace`` captures a graph, the FM term on a regression task with its own factor
width, the message of wide features without wide tasks, the message of a model without
tasks, a model class called with keyword arguments, and the embedding backend (the layout
records it, ``make_embedding`` builds its tables with ``embedding_init_std``).

SNR (Ma et al., AAAI 2019): the eval forward pass of SNR-Trans and SNR-Aver rebuilt by hand
from the model's own blocks (three levels, a non-default activation, deep towers, gates from
the hard-concrete formulas with non-default ``beta``/``gamma``/``zeta``), the reported route
gates and the L0 penalty against the closed form ``P(z != 0) = sigmoid(log_alpha - beta
log(-gamma / zeta))`` (and when it is reported), dropout in the sub-networks, the exact route
error messages of both variants, the last shared layer and the task parameters."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelOutput, MultiTaskModel
from mtlrec.models.build import build_model
from mtlrec.models.snr import SNRParams, SNRTrans
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout
from mtlrec.nn.mlp import MLP, ParallelMLP
from mtlrec.schema import TaskSpec
from mtlrec.testing import tiny_dataset

TASKS = ("click", "watch")
# three levels (so levels[r + 1] and levels[r - 1] differ) of three layers each
SNR_SMALL: dict[str, Any] = {
    "subnetworks": (2, 3, 2),
    "subnetwork_hidden": (5, 4, 3),
    "tower_hidden": (5, 3),
    "activation": "tanh",
}
# non-default hard-concrete constants (Louizos et al. use 2/3, -0.1, 1.1)
HC = {"beta": 0.5, "gamma": -0.3, "zeta": 1.4}


@pytest.fixture(scope="module")
def tiny():
    return tiny_dataset(n=64)


def _build(tiny, name: str, seed: int = 0, **params: Any) -> MultiTaskModel:
    pre, _ = tiny
    torch.manual_seed(seed)
    return build_model(name, pre.schema, pre.table_sizes(), params)


def _feats(tiny, n: int = 12) -> Features:
    return tiny[1].features_at(slice(0, n))


# -- base: ModelOutput.predictions / probabilities / predict_proba -----------------------------
def test_predictions_by_task_name_use_the_attached_specs(tiny) -> None:
    model = _build(tiny, "snr_trans", **SNR_SMALL).eval()
    out = model(_feats(tiny))
    assert out.task_specs == model.tasks
    p = out.predictions(["click"])
    assert set(p) == {"click"}
    torch.testing.assert_close(p["click"], torch.sigmoid(out.logits["click"]))
    p = out.predictions(["watch", "click"])  # regression: the value itself
    assert set(p) == {"watch", "click"}
    torch.testing.assert_close(p["watch"], out.logits["watch"])


def test_predictions_unknown_name_message_lists_the_tasks(tiny) -> None:
    model = _build(tiny, "snr_trans", **SNR_SMALL).eval()
    out = model(_feats(tiny))
    with pytest.raises(KeyError) as e:
        out.predictions(["nope"])
    assert e.value.args == ("no task 'nope' in this output (tasks: ['click', 'watch'])",)


def test_predictions_by_name_without_specs_message() -> None:
    out = ModelOutput({"click": torch.zeros(3)})
    with pytest.raises(KeyError) as e:
        out.predictions(["click"])
    assert e.value.args == (
        "task 'click': this output carries no task specs; pass TaskSpec objects "
        "(the schema's tasks)",
    )
    # TaskSpec objects work without specs: sigmoid(0) = 0.5
    p = out.predictions([TaskSpec(name="click", kind="binary")])
    torch.testing.assert_close(p["click"], torch.full((3,), 0.5))


def test_probabilities_keep_the_requested_tasks_only(tiny) -> None:
    model = _build(tiny, "snr_aver", **SNR_SMALL).eval()
    out = model(_feats(tiny))
    p = out.probabilities(["click"])
    assert set(p) == {"click"}
    torch.testing.assert_close(p["click"], torch.sigmoid(out.logits["click"]))


@pytest.mark.parametrize("training", [True, False])
def test_predict_proba_subset_in_eval_mode_and_mode_restored(tiny, training: bool) -> None:
    # dropout makes train and eval forwards differ: predict_proba must run the eval one
    model = _build(tiny, "snr_trans", dropout=0.5, **SNR_SMALL).train(training)
    feats = _feats(tiny)
    p = model.predict_proba(feats, ["click"])
    assert model.training is training
    assert set(p) == {"click"}
    assert not p["click"].requires_grad
    model.eval()
    with torch.no_grad():
        ref = torch.sigmoid(model(feats).logits["click"])
    torch.testing.assert_close(p["click"], ref)


def test_model_called_with_keyword_features(tiny) -> None:
    model = _build(tiny, "snr_trans", **SNR_SMALL).eval()
    feats = _feats(tiny)
    out = model(features=feats)
    assert out.task_specs == model.tasks
    torch.testing.assert_close(out.logits["click"], model(feats).logits["click"])


@pytest.mark.filterwarnings("ignore")  # the tracer's own warnings
def test_no_task_specs_attached_while_tracing(tiny) -> None:
    # "not while a graph is captured for export": under torch.jit.trace the output keeps ()
    model = _build(tiny, "snr_trans", **SNR_SMALL).eval()
    feats = _feats(tiny)
    seen: list[tuple] = []

    class Wrapper(nn.Module):  # a module, so that the model's parameters are graph inputs
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, sparse: Tensor, dense: Tensor, hist: Tensor) -> Tensor:
            f = Features(sparse, dense, {"hist": hist}, feats.sparse_names, feats.dense_names)
            out = self.model(f)
            seen.append(out.task_specs)
            return out.logits["click"]

    with torch.no_grad():
        torch.jit.trace(
            Wrapper(),
            (feats.sparse, feats.dense, feats.sequences["hist"]),
            check_trace=False,
            strict=False,
        )
    assert seen == [()]
    assert model(feats).task_specs == model.tasks  # and attached outside the trace


# -- base: construction, embedding backend ------------------------------------------------------
def test_a_model_needs_a_task_message(tiny) -> None:
    pre, _ = tiny
    layout = FeatureLayout.from_schema(pre.schema, pre.table_sizes())
    with pytest.raises(ValueError, match=r"^a model needs at least one task$"):
        SNRTrans(layout, [], SNRParams())


def test_model_class_called_with_keyword_arguments(tiny) -> None:
    pre, _ = tiny
    layout = FeatureLayout.from_schema(pre.schema, pre.table_sizes())
    model = SNRTrans(layout=layout, tasks=pre.schema.tasks, params=SNRParams(**SNR_SMALL))
    assert model.task_names == TASKS
    assert set(model.eval()(_feats(tiny)).logits) == set(TASKS)


def test_embedding_tables_drawn_with_embedding_init_std(tiny) -> None:
    # N(0, 0.5^2) over a few hundred entries: the sample std is near 0.5 (the default is 0.05)
    model = _build(tiny, "snr_trans", embedding_init_std=0.5, **SNR_SMALL)
    assert type(model.embedding) is EmbeddingCollection
    w = torch.cat([t.weight.detach().flatten() for t in model.embedding.tables.values()])
    assert w.numel() > 200
    assert 0.35 < float(w.std()) < 0.65


def test_embedding_backend_recorded_and_used() -> None:
    pytest.importorskip("torchrec")
    from mtlrec.nn.torchrec_embedding import TorchRecEmbeddingCollection

    pre, _ = tiny_dataset(n=32, sequences=False)  # TorchRec bags: no sequence features here
    default = build_model("snr_trans", pre.schema, pre.table_sizes(), SNR_SMALL)
    assert default.layout.backend == "torch"
    assert type(default.embedding) is EmbeddingCollection
    params = {**SNR_SMALL, "embedding_init_std": 0.3}
    model = build_model(
        "snr_trans", pre.schema, pre.table_sizes(), params, embedding_backend="torchrec"
    )
    assert model.layout.backend == "torchrec"
    assert type(model.embedding) is TorchRecEmbeddingCollection
    assert model.embedding.layout is model.layout
    # the std its tables are filled with once sharded (fill_initial / initial_rows)
    assert model.embedding.init_std == 0.3


# -- base: FM and wide options ------------------------------------------------------------------
def test_fm_term_on_a_regression_task_with_its_factor_width(tiny) -> None:
    model = _build(tiny, "snr_trans", fm_tasks=("watch",), fm_dim=3, **SNR_SMALL).eval()
    feats = _feats(tiny)
    # the FM's factor vectors have the width asked for (not FactorizationMachine's default 8)
    assert model.fm.field_vectors(feats).shape[-1] == 3
    out = model(feats)
    plain = model.forward(feats)  # forward() skips the hook that adds the FM term
    torch.testing.assert_close(out.logits["watch"], plain.logits["watch"] + model.fm(feats))
    torch.testing.assert_close(out.logits["click"], plain.logits["click"])


def test_wide_features_without_wide_tasks_message(tiny) -> None:
    msg = "wide_features / wide_crosses need wide_tasks (the tasks to feed)"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        _build(tiny, "snr_trans", wide_features=("user",), **SNR_SMALL)


# -- SNR: references ----------------------------------------------------------------------------
def _members_ref(mlp: ParallelMLP, xs: list[Tensor], act: Callable) -> list[Tensor]:
    """Every member of a sub-network level run on its own input: ``act(h W_k^l + b_k^l)``."""
    outs = []
    for k in range(mlp.num):
        h = xs[k]
        for layer, b in enumerate(mlp.biases):
            bias = b.view(mlp.num, -1)[k] if b.dim() == 1 else b[k, 0]
            h = act(h @ mlp.member_weight(layer, k) + bias)
        outs.append(h)
    return outs


def _tower_ref(tower: MLP, x: Tensor, hidden: tuple[int, ...], act: Callable) -> Tensor:
    """The tower as ``hidden`` activated linear layers and a linear width-1 logit layer."""
    assert [lin.out_features for lin in tower.layers] == [*hidden, 1]
    for i, lin in enumerate(tower.layers):
        x = x @ lin.weight.T + lin.bias
        if i < len(tower.layers) - 1:
            x = act(x)
    return x.squeeze(-1)


def _log_alpha(routing) -> Tensor:
    return torch.stack(list(routing.gate.log_alpha))  # [M, K]


def _eval_gate(la: Tensor, gamma: float, zeta: float) -> Tensor:
    """Louizos et al., Eq. 13: ``min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))``."""
    return (torch.sigmoid(la) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def _p_open(la: Tensor, beta: float, gamma: float, zeta: float) -> Tensor:
    """``P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))`` (Louizos et al., Eq. 12)."""
    return torch.sigmoid(la - beta * math.log(-gamma / zeta))


def _spread_log_alphas(model: MultiTaskModel, seed: int = 1) -> None:
    """Distinct log_alpha per connection (some gates clamp at 0 or 1, most lie in between)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for routing in model.routings:
            for la in routing.gate.log_alpha:
                la.copy_(torch.randn(la.shape, generator=g) * 2.0)


@pytest.mark.parametrize("name", ["snr_trans", "snr_aver"])
def test_snr_eval_forward_rebuilt_by_hand(tiny, name: str) -> None:
    model = _build(tiny, name, **SNR_SMALL, **HC).eval()
    _spread_log_alphas(model)
    feats = _feats(tiny)
    with torch.no_grad():
        out = model(feats)
        x = model.embedding(feats).flat
        u = _members_ref(model.levels[0], [x] * model.levels[0].num, torch.tanh)
        for r, routing in enumerate(model.routings):
            z = _eval_gate(_log_alpha(routing), HC["gamma"], HC["zeta"])  # [M, K]
            if name == "snr_trans":  # Eq. 1: v_j = sum_i z_ji W_ji u_i
                v = [
                    sum(z[j, i] * (u[i] @ routing.weights[j][i]) for i in range(len(u)))
                    for j in range(z.shape[0])
                ]
            else:  # Eq. 2: v_j = sum_i z_ji u_i
                assert len(routing.weights) == 0
                v = [sum(z[j, i] * u[i] for i in range(len(u))) for j in range(z.shape[0])]
            # the next level (bottom first) reads v; the last routing feeds the towers
            u = _members_ref(model.levels[r + 1], v, torch.tanh) if r + 1 < 3 else v
        assert len(u) == len(TASKS)
        for k, t in enumerate(TASKS):
            torch.testing.assert_close(out.tower_inputs[t], u[k])
            ref = _tower_ref(model.heads.towers[t], u[k], SNR_SMALL["tower_hidden"], torch.tanh)
            torch.testing.assert_close(out.logits[t], ref)


def test_snr_route_gates_and_l0_penalty_closed_form(tiny) -> None:
    weight = 0.3
    closed = "sub1.2->sub2.0"  # a fixed gate: reported (0, 1), left out of the penalty
    model = _build(
        tiny, "snr_trans", l0_weight=weight, closed_routes=(closed,), **SNR_SMALL, **HC
    ).train()
    _spread_log_alphas(model)
    feats = _feats(tiny, 5)
    out = model(feats)
    total = torch.zeros((), dtype=torch.float64)
    units = [[f"sub{lv}.{j}" for j in range(k)] for lv, k in enumerate((2, 3, 2))]
    units.append(list(TASKS))
    for routing, (srcs, dsts) in zip(model.routings, itertools.pairwise(units), strict=True):
        p = _p_open(_log_alpha(routing).detach().double(), **HC)  # [M, K]
        for j, dst in enumerate(dsts):
            for i, src in enumerate(srcs):
                route = f"{src}->{dst}"
                pij = 0.0 if route == closed else float(p[j, i])
                total = total + pij
                g = out.gates[f"route:{route}"]
                assert g.shape == (5, 2)
                ref = torch.tensor([pij, 1.0 - pij]).expand(5, 2)
                torch.testing.assert_close(g.detach(), ref)
    assert set(out.aux_losses) == {"l0"}
    torch.testing.assert_close(out.aux_losses["l0"].double(), weight * total)


def test_snr_l0_penalty_only_in_training_with_positive_weight(tiny) -> None:
    feats = _feats(tiny, 4)
    model = _build(tiny, "snr_trans", l0_weight=0.1, **SNR_SMALL)
    assert model.eval()(feats).aux_losses == {}  # eval: no penalty
    model = _build(tiny, "snr_trans", l0_weight=0.0, **SNR_SMALL)
    assert model.train()(feats).aux_losses == {}  # weight 0: nothing to add


def test_snr_dropout_reaches_the_subnetworks(tiny) -> None:
    # tanh is 0 only at 0: exact zeros in a level's output come from dropout (rate 0.5)
    model = _build(tiny, "snr_aver", dropout=0.5, **SNR_SMALL).train()
    seen: list[Tensor] = []
    for level in model.levels:
        level.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    model(_feats(tiny, 64))
    assert len(seen) == 3
    for o in seen:
        frac = float((o == 0).float().mean())
        assert 0.3 < frac < 0.7, frac


def _all_routes(subnetworks: tuple[int, ...]) -> list[str]:
    units = [[f"sub{lv}.{j}" for j in range(k)] for lv, k in enumerate(subnetworks)]
    units.append(list(TASKS))
    return [f"{s}->{t}" for a, b in itertools.pairwise(units) for s in a for t in b]


@pytest.mark.parametrize("name", ["snr_trans", "snr_aver"])
def test_snr_route_error_messages(tiny, name: str) -> None:
    params = {**SNR_SMALL, "subnetworks": (3, 3)}  # 15 routes: the message shows the first 6
    examples = sorted(_all_routes((3, 3)))[:6]
    msg = f"{name}: unknown route 'sub0.5->click'; routes are '<source>-><target>', e.g. {examples}"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        _build(tiny, name, closed_routes=("sub0.5->click",), **params)
    both = "sub0.0->sub1.1"
    msg = f"{name}: route {both!r} is both in closed_routes and open_routes"
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        _build(tiny, name, closed_routes=(both,), open_routes=(both,), **params)


def test_snr_last_shared_layer_is_the_top_levels_last_layer(tiny) -> None:
    model = _build(tiny, "snr_trans", **SNR_SMALL)
    w = model.last_shared_layer()
    # the top level (2 sub-networks) feeds every task's routes; its last layer is 4 -> 3
    assert w is model.levels[2].weights[2]
    assert w.shape == (2, 4, 3)
    assert any(w is p for p in model.shared_parameters())


@pytest.mark.parametrize("name", ["snr_trans", "snr_aver"])
def test_snr_task_parameters_are_tower_and_routes_into_it(tiny, name: str) -> None:
    model = _build(tiny, name, **SNR_SMALL)
    top = model.routings[-1]
    for k, t in enumerate(TASKS):
        got = [id(p) for p in model.task_parameters(t)]
        want = [id(p) for p in model.heads.towers[t].parameters()]
        want.append(id(top.gate.log_alpha[k]))
        if name == "snr_trans":  # the transforms W_ki into task k's tower
            want.append(id(top.weights[k]))
        assert got == want
