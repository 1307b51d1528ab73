"""Invariants of every registered model (the registry is iterated, so new models are covered).

Shapes and gates on a tiny batch; every parameter trains; predictions do not depend on the rest
of the batch; MoE outputs are invariant to a consistent permutation of the experts; shared and
task-specific parameters partition the model; MoE-family models are wiring over the shared
blocks; checkpoints round-trip exactly; multiclass tasks train.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mtlrec.batch import Batch, Features
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.preprocess import Preprocessor
from mtlrec.losses import MultiTaskLoss
from mtlrec.models import build_model
from mtlrec.models.base import MultiTaskModel
from mtlrec.nn.experts import ExpertBank
from mtlrec.nn.gates import Gate
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mlp import MLP, ParallelMLP
from mtlrec.registry import MODELS
from mtlrec.schema import DenseFeature, Schema, SequenceFeature, SparseFeature, TaskSpec
from mtlrec.testing import tiny_dataset, tiny_funnel_dataset
from mtlrec.train.checkpoint import load_checkpoint, restore_model, save_checkpoint
from mtlrec.train.step import StepContext, train_step
from mtlrec.weighting import build_weighting

MODEL_NAMES = MODELS.names()

# Small widths keep the suite fast; a model not named here is built with its defaults.
SMALL_PARAMS: dict[str, dict[str, Any]] = {
    "mmoe": {"num_experts": 3, "expert_hidden": (8, 6), "tower_hidden": (4,)},
    "omoe": {"num_experts": 3, "expert_hidden": (8, 6), "tower_hidden": (4,)},
    "shared_bottom": {"bottom_hidden": (8, 6), "tower_hidden": (4,)},
    "single_task": {"bottom_hidden": (8,), "tower_hidden": (4,)},
    "cgc": {"experts_per_task": 2, "shared_experts": 1, "expert_hidden": (8, 6)},
    "ple": {"num_levels": 2, "experts_per_task": 2, "shared_experts": 1, "expert_hidden": (8,)},
    "ml_mmoe": {"num_levels": 2, "num_experts": 3, "expert_hidden": (8, 6), "tower_hidden": (4,)},
    "soft_sharing": {"bottom_hidden": (8, 6), "tower_hidden": (4,), "trace_norm_weight": 0.01},
    "asymmetric_sharing": {"bottom_hidden": (8, 6), "tower_hidden": (8,)},
    "customized_sharing": {"shared_hidden": (8,), "specific_hidden": (6,), "tower_hidden": (4,)},
    "cross_stitch": {"bottom_hidden": (8, 6), "tower_hidden": (4,)},
    "sluice": {"bottom_hidden": (8, 8), "tower_hidden": (8,), "orthogonality_weight": 0.01},
    "esmm": {"tower_hidden": (6,)},
    "aitm": {"tower_hidden": (8, 6), "head_hidden": (4,)},
    "stem": {"expert_hidden": (8, 6), "tower_hidden": (4,)},
    "mose": {"bottom_hidden": 6, "num_experts": 3, "expert_hidden": 5, "tower_hidden": (4,)},
}


# Models whose tasks must be a click -> conversion funnel (ctr, cvr, ctcvr).
FUNNEL_MODELS = {"esmm"}


def small_params(name: str) -> dict[str, Any]:
    return dict(SMALL_PARAMS.get(name, {}))


@cache
def tiny(name: str = "") -> tuple[Preprocessor, ColumnarDataset]:
    """The tiny data set (a click -> conversion funnel for the models that need one)."""
    if name in FUNNEL_MODELS:
        return tiny_funnel_dataset(n=64, seed=0)
    return tiny_dataset(n=64, seed=0)


def build(
    name: str,
    *,
    seed: int = 0,
    pre: Preprocessor | None = None,
    params: dict[str, Any] | None = None,
) -> MultiTaskModel:
    pre = pre or tiny(name)[0]
    torch.manual_seed(seed)
    return build_model(name, pre.schema, pre.table_sizes(), params or small_params(name))


@cache
def eval_model(name: str) -> MultiTaskModel:
    """One model per name in eval mode, never trained or mutated (shared across examples)."""
    return build(name, seed=3).eval()


def make_context(model: MultiTaskModel, schema: Schema) -> StepContext:
    tasks = [t for t in schema.tasks if t.name in model.loss_task_names]
    strategy = build_weighting("static", [t.name for t in tasks])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return StepContext(model, MultiTaskLoss(tasks), strategy, opt)


def all_outputs(out) -> dict[str, Tensor]:
    """Every tensor a model returned, keyed by kind and name."""
    res = {f"logits.{k}": v for k, v in out.logits.items()}
    res |= {f"log_probs.{k}": v for k, v in out.log_probs.items()}
    res |= {f"gates.{k}": v for k, v in out.gates.items()}
    return res


# -- forward ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shapes_gates_and_predictions(name: str) -> None:
    pre, ds = tiny(name)
    model = build(name).eval()
    b = 7
    with torch.no_grad():
        out = model(ds.features_at(slice(0, b)))
    schema = pre.schema
    for t in schema.tasks:
        if t.name in out.log_probs:
            assert out.log_probs[t.name].shape == (b,)
            continue
        assert out.logits[t.name].shape == (b,), f"{name}: logits of {t.name}"
        assert torch.isfinite(out.logits[t.name]).all()
    for g_name, g in out.gates.items():
        assert g.dim() == 2 and g.shape[0] == b, f"{name}: gate {g_name} shape {tuple(g.shape)}"
        assert (g >= 0).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(b), atol=1e-5, rtol=0)
    preds = out.predictions(schema.tasks)
    for t in schema.tasks:
        if t.kind == "binary":
            assert ((preds[t.name] >= 0) & (preds[t.name] <= 1)).all()
    for t_name, rep in out.tower_inputs.items():
        assert rep.shape[0] == b, f"{name}: tower input of {t_name}"
    heads = getattr(model, "heads", None)
    if isinstance(heads, TaskHeads):  # the reported tower inputs are what the towers read
        for t_name, rep in out.tower_inputs.items():
            if t_name in out.logits:
                with torch.no_grad():
                    z = heads.towers[t_name](rep)
                z = z.squeeze(-1) if z.shape[-1] == 1 else z
                torch.testing.assert_close(z, out.logits[t_name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if "moe" in n])
def test_moe_models_report_their_gates(name: str) -> None:
    _, ds = tiny(name)
    model = build(name).eval()
    out = model(ds.features_at(slice(0, 5)))
    assert out.gates, f"{name} returns no gate weights"
    e = small_params(name).get("num_experts")
    if e is not None:
        assert all(g.shape == (5, e) for g in out.gates.values())


# -- training: every parameter gets a gradient -------------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    pre, ds = tiny(name)
    model = build(name)
    ctx = make_context(model, pre.schema)
    batch = ds.take(slice(0, len(ds)))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = [float(train_step(ctx, batch).objective) for _ in range(3)]
    assert all(np.isfinite(losses))
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"
        assert not torch.equal(p.detach(), before[pname]), f"{name}: {pname} was not updated"


# -- batch independence ----------------------------------------------------------------------------
def _features(ds: ColumnarDataset, idx: list[int]) -> Features:
    return ds.features_at(torch.tensor(idx, dtype=torch.long))


@pytest.mark.parametrize("name", MODEL_NAMES)
@settings(deadline=None, max_examples=10)
@given(data=st.data())
def test_prediction_does_not_depend_on_the_batch(name: str, data: st.DataObject) -> None:
    pre, ds = tiny(name)
    model = eval_model(name)
    idx = data.draw(st.lists(st.integers(0, len(ds) - 1), min_size=1, max_size=24), label="rows")
    pos = data.draw(st.integers(0, len(idx) - 1), label="pos")
    with torch.no_grad():
        together = model(_features(ds, idx)).predictions(pre.schema.tasks)
        alone = model(_features(ds, [idx[pos]])).predictions(pre.schema.tasks)
    for t in pre.schema.tasks:
        torch.testing.assert_close(together[t.name][pos], alone[t.name][0], atol=1e-5, rtol=1e-5)


# -- expert permutation --------------------------------------------------------------------------
def _models_with_expert_bank() -> list[str]:
    return [n for n in MODEL_NAMES if isinstance(getattr(build(n), "experts", None), ExpertBank)]


def permute_experts(model: nn.Module, perm: Tensor, *, gates: bool = True) -> None:
    """New expert j := old expert perm[j], in every layer of the bank and every gate."""
    bank: ExpertBank = model.experts  # type: ignore[assignment]
    e = bank.num_experts
    with torch.no_grad():
        for i, (w, b) in enumerate(zip(bank.weights, bank.biases, strict=True)):
            if i == 0 and bank.shared_input:
                d = bank.dims[0]
                # columns [k*d:(k+1)*d] belong to expert k
                w.copy_(w.view(w.shape[0], e, d)[:, perm, :].reshape(w.shape[0], e * d))
                b.copy_(b.view(e, d)[perm].reshape(e * d))
            else:
                w.copy_(w[perm])  # [E, in, out]
                b.copy_(b[perm])  # [E, 1, out]
        if gates:
            for g in model.modules():
                if isinstance(g, Gate) and g.num_experts == e:
                    last = g.net.layers[-1]
                    last.weight.copy_(last.weight[perm])  # [E, hidden]
                    last.bias.copy_(last.bias[perm])


@pytest.mark.parametrize("gate_hidden", [(), (5,)])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_expert_permutation_leaves_outputs_unchanged(name: str, gate_hidden: tuple) -> None:
    if not isinstance(getattr(build(name), "experts", None), ExpertBank):
        pytest.skip(f"{name} has no expert bank")
    params = small_params(name)
    if gate_hidden:
        if "gate_hidden" not in MODELS.get(name).params.model_fields:
            pytest.skip(f"{name} has no gate_hidden option")
        params["gate_hidden"] = gate_hidden
    _, ds = tiny(name)
    feats = ds.features_at(slice(0, 16))
    model = build(name, params=params).eval()
    e = model.experts.num_experts
    perm = torch.roll(torch.arange(e), 1)
    with torch.no_grad():
        ref = model(feats)
        permute_experts(model, perm)
        out = model(feats)
    for k, v in ref.logits.items():
        torch.testing.assert_close(out.logits[k], v, atol=1e-5, rtol=1e-5)
    for k, v in ref.gates.items():
        torch.testing.assert_close(out.gates[k], v[:, perm], atol=1e-6, rtol=1e-5)
    # permuting the experts without their gates does change the outputs (the test has teeth)
    other = build(name, params=params).eval()
    with torch.no_grad():
        permute_experts(other, perm, gates=False)
        moved = other(feats)
    assert any(not torch.allclose(moved.logits[k], v, atol=1e-5) for k, v in ref.logits.items())


def test_some_registered_model_has_an_expert_bank() -> None:
    assert _models_with_expert_bank(), "no registered model exposes an ExpertBank"


# -- shared / task-specific partition --------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shared_and_task_parameters_partition_the_model(name: str) -> None:
    model = build(name)
    everything = {id(p) for p in model.parameters()}
    shared = {id(p) for p in model.shared_parameters()}
    per_task = {t: {id(p) for p in model.task_parameters(t)} for t in model.task_names}
    for a, b in [(a, b) for a in model.task_names for b in model.task_names if a < b]:
        assert not per_task[a] & per_task[b], f"{name}: tasks {a} and {b} share parameters"
    owned = set().union(*per_task.values())
    assert not shared & owned
    assert shared | owned == everything
    assert len(model.shared_parameters()) == len(shared)  # no duplicates


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_task_parameters_get_no_gradient_from_other_tasks(name: str) -> None:
    pre, ds = tiny(name)
    model = build(name)
    batch = ds.take(slice(0, len(ds)))
    tasks = [t for t in pre.schema.tasks if t.name in model.loss_task_names]
    for t in model.task_names:
        own = model.task_parameters(t)
        if not own:
            continue
        for u in tasks:
            if u.name == t:
                continue
            loss = MultiTaskLoss([u])(model(batch.features), batch)[u.name]
            grads = torch.autograd.grad(loss, own, allow_unused=True)
            for g in grads:
                assert g is None or not g.any(), f"{name}: loss of {u.name} reaches {t}'s params"


def test_single_task_shares_nothing() -> None:
    model = build("single_task")
    assert model.shared_parameters() == []


def test_mmoe_gate_and_tower_are_task_parameters() -> None:
    model = build("mmoe")
    for t in model.task_names:
        own = {id(p) for p in model.task_parameters(t)}
        assert {id(p) for p in model.gates[t].parameters()} <= own
        assert {id(p) for p in model.heads.towers[t].parameters()} <= own
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in model.experts.parameters()} <= shared
    assert {id(p) for p in model.embedding.parameters()} <= shared


# -- MoE-family models are wiring over the shared blocks -------------------------------------
@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if "moe" in n])
def test_moe_models_use_the_shared_blocks(name: str) -> None:
    model = build(name)
    mods = list(model.modules())
    assert any(isinstance(m, ExpertBank) for m in mods), f"{name} has no ExpertBank"
    assert any(isinstance(m, Gate) for m in mods), f"{name} has no Gate"
    banks = [m for m in mods if isinstance(m, ExpertBank)]
    for m in mods:
        if isinstance(m, nn.ModuleDict) and set(m.keys()) == set(model.task_names):
            continue  # per-task towers / gates
        if isinstance(m, nn.ModuleList | nn.ModuleDict):
            children = list(m.children())
            nets = [c for c in children if isinstance(c, MLP | nn.Sequential | ParallelMLP)]
            assert not (nets and any(len(children) == bank.num_experts for bank in banks)), (
                f"{name}: a list of per-expert networks instead of an ExpertBank"
            )
    # every expert network lives in an ExpertBank: the only MLPs are in gates and towers
    allowed: set[int] = set()
    for m in mods:
        if isinstance(m, Gate | TaskHeads):
            allowed |= {id(x) for x in m.modules()}
    stray = [m for m in mods if isinstance(m, MLP) and id(m) not in allowed]
    assert not stray, f"{name}: MLPs outside gates and towers: {len(stray)}"


# -- checkpoint round trip -----------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_checkpoint_round_trip_predicts_identically(name: str, tmp_path) -> None:
    pre, ds = tiny(name)
    model = build(name, seed=0)
    ctx = make_context(model, pre.schema)
    batch = ds.take(slice(0, 32))
    train_step(ctx, batch)
    path = tmp_path / "model.safetensors"
    save_checkpoint(
        path, model=model, strategy=ctx.strategy, optimizer=ctx.optimizer, meta={"model": name}
    )
    ck = load_checkpoint(path)
    assert ck.meta["model"] == name
    fresh = build(name, seed=123)
    feats = ds.features_at(slice(0, 64))
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert any(
            not torch.equal(fresh(feats).logits[k], v) for k, v in model(feats).logits.items()
        )
        restore_model(fresh, ck.model, source=str(path))
        a, b = all_outputs(model(feats)), all_outputs(fresh(feats))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{name}: {k} differs after the round trip"


# -- multiclass ----------------------------------------------------------------------------------
@cache
def multiclass_data() -> tuple[Preprocessor, ColumnarDataset]:
    schema = Schema(
        features=(
            SparseFeature(name="user", embedding_dim=4),
            SparseFeature(name="item", embedding_dim=4),
            DenseFeature(name="price", transform="standardize"),
            SequenceFeature(name="hist", embedding_dim=4, table="item", max_len=4),
        ),
        tasks=(
            TaskSpec(name="click", kind="binary"),
            TaskSpec(name="genre", kind="multiclass", num_classes=3),
        ),
    )
    rng = np.random.default_rng(1)
    n = 48
    item = rng.integers(0, 12, n)
    table = pa.table(
        {
            "user": pa.array([f"u{u}" for u in rng.integers(0, 8, n)]),
            "item": pa.array([f"i{i}" for i in item]),
            "price": pa.array(rng.normal(size=n)),
            "hist": pa.array(
                ["|".join(f"i{j}" for j in rng.integers(0, 12, k)) for k in rng.integers(0, 5, n)]
            ),
            "click": pa.array(rng.integers(0, 2, n)),
            "genre": pa.array(item % 3),
        }
    )
    pre = Preprocessor.fit(schema, table)
    return pre, pre.encode(table)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_multiclass_task_trains_and_outputs_classes(name: str) -> None:
    if name in FUNNEL_MODELS:
        pytest.skip(f"{name} needs the ctr / cvr / ctcvr tasks of a funnel")
    pre, ds = multiclass_data()
    model = build(name, pre=pre)
    ctx = make_context(model, pre.schema)
    batch: Batch = ds.take(slice(0, len(ds)))
    result = train_step(ctx, batch)
    assert torch.isfinite(result.losses).all()
    model.eval()
    with torch.no_grad():
        out = model(ds.features_at(slice(0, 10)))
    assert out.logits["genre"].shape == (10, 3)
    assert out.logits["click"].shape == (10,)
    probs = out.predictions(pre.schema.tasks)["genre"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(10), atol=1e-5, rtol=0)


# -- dropout is off in eval mode -------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eval_mode_is_deterministic_with_dropout(name: str) -> None:
    if "dropout" not in MODELS.get(name).params.model_fields:
        pytest.skip(f"{name} has no dropout option")
    _, ds = tiny(name)
    feats = ds.features_at(slice(0, 32))
    model = build(name, params={**small_params(name), "dropout": 0.5})
    with torch.no_grad():
        model.eval()
        a, b = model(feats), model(feats)
        for k, v in a.logits.items():
            assert torch.equal(v, b.logits[k]), f"{name}: {k} random in eval mode"
        model.train()
        c = model(feats)
    assert any(not torch.allclose(c.logits[k], v) for k, v in a.logits.items())
