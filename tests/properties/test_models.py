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
from mtlrec.data.synthetic import funnel_schema, make_funnel_table
from mtlrec.losses import MultiTaskLoss
from mtlrec.models import build_model
from mtlrec.models.base import MultiTaskModel
from mtlrec.nn.experts import ExpertBank
from mtlrec.nn.gates import Gate
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mlp import MLP, ParallelMLP
from mtlrec.nn.sequence import SequenceExpertBank
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
    "snr_trans": {"subnetworks": (3, 2), "subnetwork_hidden": (8, 6), "tower_hidden": (4,)},
    "snr_aver": {"subnetworks": (3, 2), "subnetwork_hidden": (8, 6), "tower_hidden": (4,)},
    "esm2": {"tower_hidden": (6,)},
    "dbmtl": {"bottom_hidden": (8, 6), "tower_hidden": (4,)},
}


# Models whose tasks must be a click -> conversion funnel (ctr, cvr, ctcvr).
FUNNEL_MODELS = {"esmm", "esm2"}
# ... of them, those built on a click -> action -> purchase funnel (ctr, ctavr, cvr, ctcvr).
ACTION_FUNNEL_MODELS = {"esm2"}


def small_params(name: str) -> dict[str, Any]:
    return dict(SMALL_PARAMS.get(name, {}))


@cache
def tiny(name: str = "") -> tuple[Preprocessor, ColumnarDataset]:
    """The tiny data set (a click -> conversion funnel for the models that need one)."""
    if name in ACTION_FUNNEL_MODELS:
        table = make_funnel_table(
            64, num_users=20, num_items=30, num_categories=5, click_shift=1.5, buy_shift=2.0
        )
        pre = Preprocessor.fit(funnel_schema(4), table)
        return pre, pre.encode(table)
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
# The registered models without experts (no expert bank, no gate): not parametrised below. Every
# other model must have an expert bank that ``permute_experts`` can permute, so a new model with
# experts cannot skip silently, and a new model without them fails until it is listed here (the
# list is checked against the models in ``test_models_listed_without_experts_have_none``; a
# listed name that is not registered is ignored).
NO_EXPERTS = frozenset(
    {
        "aitm",
        "asymmetric_sharing",
        "cross_stitch",
        "customized_sharing",
        "dbmtl",
        "esm2",
        "esmm",
        "shared_bottom",
        "single_task",
        "sluice",
        "soft_sharing",
        # SNR: sub-networks (ParallelMLP) joined by per-connection routes, not gates weighing
        # experts; its permutation invariance is tested in tests/unit/test_models_snr.py
        "snr_aver",
        "snr_trans",
    }
)
EXPERT_MODELS = [n for n in MODEL_NAMES if n not in NO_EXPERTS]
BANKS = (ExpertBank, SequenceExpertBank)


def _group_perm(sizes: tuple[int, ...], kind: str) -> Tensor:
    """A permutation of consecutive groups of members, within every group: ``roll`` (by one)
    or ``swap`` (the first two). When every group has one member: across all of them.

    The two generate every permutation of a group (of 3 or more): a model that mixes gate
    column j with an expert other than j passes for at most one of them (a shift, say, commutes
    with the roll, never with the swap)."""
    if max(sizes) == 1:
        sizes = (len(sizes),)
    parts, lo = [], 0
    for k in sizes:
        idx = torch.arange(lo, lo + k)
        swap = idx[[1, 0, *range(2, k)]] if k > 1 else idx
        parts.append(torch.roll(idx, 1) if kind == "roll" else swap)
        lo += k
    return torch.cat(parts)


def _permute_bank_(bank: nn.Module, perm: Tensor) -> None:
    """New expert j := old expert ``perm[j]``; experts reading their own input slices
    (``shared_input=False``) take their slice with them (a forward pre-hook)."""
    if isinstance(bank, SequenceExpertBank):
        for p in (bank.w_ih, bank.w_hh, bank.b_ih, bank.b_hh):
            p.copy_(p[perm])  # [K, ...]
    else:
        bank.permute_members_(perm)  # type: ignore[operator]
    if not bank.shared_input:
        bank.register_forward_pre_hook(lambda _m, args: (args[0][perm], *args[1:]))


@torch.no_grad()
def permute_experts(model: nn.Module, kind: str = "roll", *, gates: bool = True) -> int:
    """Permute the experts of every expert bank of ``model`` (:func:`_group_perm` of ``kind``),
    with (``gates``) the columns of the gates that weigh them; returns the number of banks.

    A block that owns a bank and its gates (``experts`` and ``permute_experts_``: a CGC / PLE
    level, an ML-MMoE level) is permuted by that method, within its expert groups (a task's
    experts, the shared ones). A bank held by the model itself (MMoE, OMoE, STEM, MoSE) is read
    by the model's gates over as many experts and permuted within its groups; STEM's one-expert
    groups, whose gates weigh every expert, are permuted across, each expert with its input
    slice (its embedding).
    """
    blocks = [
        m for m in model.modules() if hasattr(m, "permute_experts_") and not isinstance(m, Gate)
    ]
    inside = {id(x) for b in blocks for x in b.modules()}
    for b in blocks:
        perm = _group_perm(b.experts.group_sizes, kind)
        if gates:
            b.permute_experts_(perm)
        else:
            b.experts.permute_members_(perm)
    free_gates = [g for g in model.modules() if isinstance(g, Gate) and id(g) not in inside]
    banks = [
        b for b in model.modules() if isinstance(b, BANKS) and id(b) not in inside and b.num > 1
    ]
    sizes = [b.num for b in banks]
    for bank in banks:
        assert sizes.count(bank.num) == 1, (
            f"two banks of {bank.num} experts: which gates read which?"
        )
        readers = [g for g in free_gates if g.num_experts == bank.num]
        assert readers, f"no gate weighs the {bank.num} experts of a {type(bank).__name__}"
        perm = _group_perm(getattr(bank, "group_sizes", (bank.num,)), kind)
        _permute_bank_(bank, perm)
        for g in readers if gates else []:
            g.permute_experts_(perm)
    return len(blocks) + len(banks)


def _permutation_cases() -> list[tuple[str, tuple[int, ...]]]:
    """Every model with experts, with its default gates and (where it has the option) gates
    with a hidden layer."""
    return [
        (n, gh)
        for n in EXPERT_MODELS
        for gh in [(), (5,)]
        if not gh or "gate_hidden" in MODELS.get(n).params.model_fields
    ]


@pytest.mark.parametrize(("name", "gate_hidden"), _permutation_cases())
def test_expert_permutation_leaves_outputs_unchanged(name: str, gate_hidden: tuple) -> None:
    params = small_params(name) | ({"gate_hidden": gate_hidden} if gate_hidden else {})
    _, ds = tiny(name)
    feats = ds.features_at(slice(0, 16))
    model = build(name, params=params).eval()
    with torch.no_grad():
        ref = model(feats)
    assert ref.gates, f"{name} reports no gates"
    prev = ref
    for kind in ("roll", "swap"):  # one after the other
        with torch.no_grad():
            assert permute_experts(model, kind) > 0, f"{name}: no expert bank; see NO_EXPERTS"
            out = model(feats)
        for k, v in ref.logits.items():
            where = f"{name}, {kind}: logits of {k}"
            torch.testing.assert_close(
                out.logits[k], v, atol=1e-5, rtol=1e-5, msg=lambda m, w=where: f"{w}: {m}"
            )
        for k, v in ref.gates.items():  # every gate row: its weights, in the experts' new order
            torch.testing.assert_close(out.gates[k].sort(-1).values, v.sort(-1).values)
        assert any(not torch.allclose(out.gates[k], v) for k, v in prev.gates.items()), kind
        prev = out
    # permuting the experts without their gates does change the outputs (the test has teeth)
    other = build(name, params=params).eval()
    with torch.no_grad():
        permute_experts(other, gates=False)
        moved = other(feats)
    assert any(not torch.allclose(moved.logits[k], v, atol=1e-5) for k, v in ref.logits.items())


@pytest.mark.parametrize("name", sorted(NO_EXPERTS & set(MODEL_NAMES)))
def test_models_listed_without_experts_have_none(name: str) -> None:
    found = [type(m).__name__ for m in build(name).modules() if isinstance(m, (*BANKS, Gate))]
    assert not found, f"{name} is listed in NO_EXPERTS but has {found}"


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


# -- options any model takes: bias tower, adversarial auxiliary task, next-item loss ---------------
# Every registered model (but the funnel ones) with all three options on :func:`tiny_bias_dataset`
# (bias features ``pos``, ``dev``; an auxiliary ``domain`` task; the ``hist`` sequence).
OPTIONS: dict[str, Any] = {
    "bias_tower": {"tasks": ["click", "watch"], "hidden": [4], "serve_as": {"pos": 0}},
    "adversarial_tasks": {"domain": 0.5},
    "next_item": {"feature": "hist", "negatives": 2},
}
OPTION_MODELS = [n for n in MODEL_NAMES if n not in FUNNEL_MODELS]


@cache
def tiny_options() -> tuple[Preprocessor, ColumnarDataset]:
    from mtlrec.testing import tiny_bias_dataset

    return tiny_bias_dataset(n=64, seed=0)


def build_with_options(name: str, seed: int = 0) -> MultiTaskModel:
    # gelu: no unit of the tiny towers is dead for every row (relu's can be, for some seeds)
    params = {**small_params(name), **OPTIONS, "activation": "gelu"}
    return build(name, seed=seed, pre=tiny_options()[0], params=params)


@pytest.mark.parametrize("name", OPTION_MODELS)
def test_options_every_parameter_gets_a_gradient(name: str) -> None:
    pre, ds = tiny_options()
    model = build_with_options(name)
    assert {"bias_tower", "next_item"} <= {n for n, _ in model.named_children()}
    ctx = make_context(model, pre.schema)
    batch = ds.take(slice(0, len(ds)))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    results = [train_step(ctx, batch) for _ in range(3)]
    assert all(np.isfinite(float(r.objective)) for r in results)
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"
        assert not torch.equal(p.detach(), before[pname]), f"{name}: {pname} was not updated"


@pytest.mark.parametrize("name", OPTION_MODELS)
@settings(deadline=None, max_examples=5)
@given(data=st.data())
def test_options_prediction_does_not_depend_on_the_batch(name: str, data: st.DataObject) -> None:
    pre, ds = tiny_options()
    model = _options_eval_model(name)
    idx = data.draw(st.lists(st.integers(0, len(ds) - 1), min_size=1, max_size=16), label="rows")
    pos = data.draw(st.integers(0, len(idx) - 1), label="pos")
    with torch.no_grad():
        together = model(_features(ds, idx)).predictions(pre.schema.tasks)
        alone = model(_features(ds, [idx[pos]])).predictions(pre.schema.tasks)
    for t in pre.schema.tasks:
        torch.testing.assert_close(together[t.name][pos], alone[t.name][0], atol=1e-5, rtol=1e-5)


@cache
def _options_eval_model(name: str) -> MultiTaskModel:
    return build_with_options(name, seed=3).eval()
