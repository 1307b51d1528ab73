"""Tests that kill the mutants of ``mtlrec.models.addons``, ``mtlrec.models.moe`` and
``mtlrec.models.ple`` the rest of the suite let live (``python benchmarks/mutation.py models``):
the layout a bias tower reads (a subset of the bias features, sequences and tables included),
its options reaching the tower (widths, activation, initialisation), serving a tower over some
bias features without them, the exact configuration errors of the bias tower, the adversarial
tasks and the next-item loss, the next-item loss's wiring and weight, the gate regulariser
(weight, no gate outputs, every PLE level), the experts' and gates' options in MoE and PLE,
and PLE's task-specific parameters against the gradients each task's logit reaches."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from mtlrec.batch import FIRST_ID, Features
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.models.base import ModelOutput, ModelParams, MultiTaskModel
from mtlrec.models.moe import GatedParams
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.gates import GateOutput
from mtlrec.schema import DenseFeature, Schema, SequenceFeature, SparseFeature, TaskSpec

SIZES = {"user": 10, "item": 12, "pos": 5 + FIRST_ID, "bseq": 6}
SMALL = {"expert_hidden": [6], "tower_hidden": [3]}
MOE = {"num_experts": 2}  # the MoE models' only other option needed


def _schema(*, bias_dense: bool = True, bias_seq: bool = True) -> Schema:
    """Two sparse features, a dense one and a sequence as the main input; bias features
    ``pos`` (sparse, width 2), optionally ``dev`` (dense) and ``bseq`` (a sequence over its own
    table, width 3: a table width the other bias features do not have)."""
    feats: list = [
        SparseFeature(name="user", embedding_dim=4),
        SparseFeature(name="item", embedding_dim=4),
        DenseFeature(name="price"),
        SequenceFeature(name="hist", embedding_dim=4, table="item", max_len=4),
        SparseFeature(name="pos", embedding_dim=2, vocab_size=5, role="bias"),
    ]
    if bias_dense:
        feats.append(DenseFeature(name="dev", role="bias"))
    if bias_seq:
        feats.append(SequenceFeature(name="bseq", embedding_dim=3, role="bias", max_len=3))
    return Schema(
        features=tuple(feats),
        tasks=(
            TaskSpec(name="click", kind="binary"),
            TaskSpec(name="watch", kind="regression"),
            TaskSpec(name="domain", kind="binary", auxiliary=True),
        ),
    )


def _sizes(schema: Schema) -> dict[str, int]:
    return {k: v for k, v in SIZES.items() if k in schema.tables()}


def _features(
    schema: Schema, n: int = 6, *, bias: bool = True, named: bool = True, seed: int = 0
) -> Features:
    """Random ids / values for every column of ``schema`` (the bias ones only with ``bias``)."""
    g = torch.Generator().manual_seed(seed)
    keep = [f for f in schema.features if bias or f.role != "bias"]
    sparse = [f for f in keep if f.type == "sparse"]
    dense = [f for f in keep if f.type == "dense"]
    seqs = [f for f in keep if f.type == "sequence"]

    def ids(table: str, *shape: int) -> torch.Tensor:
        return torch.randint(FIRST_ID, SIZES[table], shape, generator=g, dtype=torch.int32)

    return Features(
        torch.stack([ids(f.table_name, n) for f in sparse], 1),
        torch.randn(n, len(dense), generator=g),
        {f.name: ids(f.table_name, n, f.max_len) for f in seqs},
        tuple(f.name for f in sparse) if named else (),
        tuple(f.name for f in dense) if named else (),
    )


def _model(name: str = "mmoe", schema: Schema | None = None, **params):
    schema = schema or _schema()
    torch.manual_seed(0)
    base = {**SMALL, **MOE} if name in ("mmoe", "omoe") else SMALL
    return build_model(name, schema, _sizes(schema), {**base, **params})


# Python's own message for a stray positional argument (after the function's name)
STRAY = re.escape("() takes 2 positional arguments but 3 were given") + "$"


def _full(msg: str) -> str:
    return f"^{re.escape(msg)}$"


# -- the bias tower: the features it reads --------------------------------------------------------
@pytest.mark.parametrize(
    ("features", "sparse", "seqs", "dense", "tables"),
    [
        (["pos"], ["pos"], [], [], {"pos": 2}),
        (["bseq", "dev"], [], ["bseq"], ["dev"], {"bseq": 3}),
        ([], ["pos"], ["bseq"], ["dev"], {"pos": 2, "bseq": 3}),  # default: every bias feature
    ],
)
def test_bias_tower_layout_holds_exactly_the_chosen_features(
    features: list[str], sparse: list[str], seqs: list[str], dense: list[str], tables: dict
) -> None:
    tower_opts = {"tasks": ["click"], "features": features, "hidden": [4]}
    model = _model(bias_tower=tower_opts)
    lay = model.bias_tower.layout
    assert [f.name for f in lay.sparse] == sparse
    assert [s.name for s in lay.sequences] == seqs
    assert list(lay.dense) == dense
    assert lay.table_dims == tables
    assert lay.table_sizes == {k: SIZES[k] for k in tables}
    # one embedding table per width the chosen features have (no empty table of another width)
    assert sorted(model.bias_tower.embedding.tables) == sorted(
        f"d{d}" for d in set(tables.values())
    )
    # the tower's input: the chosen features' widths side by side
    assert model.bias_tower.embedding.out_dim == sum(tables.values()) + len(dense)


def test_bias_tower_takes_the_configured_widths_activation_and_init() -> None:
    model = _model(
        activation="tanh",
        embedding_init_std=1.0,
        bias_tower={"tasks": ["click", "watch"], "hidden": [5, 3]},
    )
    mlp = model.bias_tower.mlp
    # hidden [5, 3], then one logit per task
    assert [layer.out_features for layer in mlp.layers] == [5, 3, 2]
    assert mlp.act is torch.tanh
    # tables drawn from N(0, 1), not the default N(0, 0.05^2): 7 * 2 + 6 * 3 = 32 values
    w = torch.cat([t.weight.flatten() for t in model.bias_tower.embedding.tables.values()])
    assert w.numel() == 32
    assert 0.5 < float(w.detach().std()) < 1.6


def test_bias_tower_over_some_features_serves_without_the_bias_features() -> None:
    tower = {"tasks": ["click"], "features": ["pos"], "hidden": [], "dropout": 0.0}
    s = _schema()
    missing = _model(schema=s, bias_tower={**tower, "serve_as": "missing"}).eval()
    dropped = _model(schema=s, bias_tower={**tower, "serve_as": "drop"}).eval()
    f = _features(s, bias=False)
    with torch.no_grad():
        a, b = missing(f), dropped(f)
        z = missing.bias_tower(None)  # [1, 1]: the tower at "missing" features
    # same seed, same main model: the scores differ by the tower's constant only
    torch.testing.assert_close(a.logits["click"], b.logits["click"] + z[0, 0])
    assert torch.equal(a.logits["watch"], b.logits["watch"])


def test_bias_tower_over_some_features_reads_only_those_in_training() -> None:
    s = _schema()
    tower = {"tasks": ["click"], "features": ["pos"], "hidden": [], "dropout": 0.0}
    model = _model(schema=s, bias_tower=tower).train()
    f = _features(s)
    pos = f.sparse[:, 2:3]
    with torch.no_grad():
        out = model(f)
        z = model.bias_tower.logits(Features(pos, torch.zeros(6, 0), sparse_names=("pos",)))
        model.eval()
        base = model(f)
    torch.testing.assert_close(out.logits["click"], base.logits["click"] + z[:, 0])


# -- the bias tower: errors ---------------------------------------------------------------------
def test_unnamed_features_are_refused_with_the_column_counts() -> None:
    # only a sparse bias feature: unnamed columns leave the dense count right, the sparse wrong
    s = _schema(bias_dense=False, bias_seq=False)
    model = _model(schema=s)
    f = _features(s, named=False)
    msg = (
        "features of 3 sparse / 1 dense columns (unnamed) for a model reading 2 / 1: "
        "give Features their column names (sparse_names, dense_names)"
    )
    with pytest.raises(ValueError, match=_full(msg)):
        model(f)
    # named but unknown sparse columns: the names are shown
    g = dataclasses.replace(f, sparse_names=("a", "b", "c"), dense_names=("price",))
    msg = msg.replace("(unnamed)", "('a', 'b', 'c')")
    with pytest.raises(ValueError, match=_full(msg)):
        model(g)


def test_bias_tower_errors_name_the_option() -> None:
    plain = Schema(
        features=(SparseFeature(name="user"),), tasks=(TaskSpec(name="click", kind="binary"),)
    )
    with pytest.raises(
        ConfigError, match=_full("bias_tower: the schema has no feature with role: bias")
    ):
        build_model(
            "mmoe", plain, {"user": 5}, {**SMALL, **MOE, "bias_tower": {"tasks": ["click"]}}
        )
    with pytest.raises(
        ConfigError,
        match=_full("bias_tower.tasks: 'nope' is not a binary or regression task here"),
    ):
        _model(bias_tower={"tasks": ["nope"]})


# -- adversarial tasks and the next-item loss: errors and wiring -----------------------------------
class _Bare(MultiTaskModel):
    """A model with neither towers (``TaskHeads``) nor an embedding over its inputs."""

    def __init__(self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: ModelParams):
        super().__init__(layout, tasks, params)
        self.lin = nn.Linear(layout.flat_dim, len(self.tasks))

    def forward(self, features: Features) -> ModelOutput:
        z = self.lin(features.dense.new_zeros(features.batch_size, self.lin.in_features))
        return ModelOutput({t: z[:, k] for k, t in enumerate(self.task_names)})

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return []


def _bare(**params) -> _Bare:
    s = _schema(bias_dense=False, bias_seq=False)
    return _Bare(FeatureLayout.from_schema(s, _sizes(s)), s.tasks, ModelParams(**params))


def test_adversarial_task_errors() -> None:
    msg = (
        "adversarial_tasks: 'click' must be an auxiliary task (auxiliary: true): "
        "the layers below its tower learn to make it unpredictable"
    )
    with pytest.raises(ConfigError, match=_full(msg)):
        _model(adversarial_tasks={"click": 1.0})
    with pytest.raises(
        ConfigError, match=_full("adversarial_tasks: this model builds no tower for 'domain'")
    ):
        _bare(adversarial_tasks={"domain": 1.0})


def test_next_item_errors() -> None:
    with pytest.raises(
        ConfigError, match=_full("next_item.feature: 'user' is not a sequence feature ['hist']")
    ):
        _model(schema=_schema(bias_seq=False), next_item={"feature": "user"})
    with pytest.raises(
        ConfigError,
        match=_full("next_item: this model has no embedding collection over its inputs"),
    ):
        _bare(next_item={"feature": "hist"})


def test_next_item_loss_reads_the_table_size_and_negatives_and_is_weighted() -> None:
    s = _schema(bias_seq=False)
    model = _model(schema=s, next_item={"feature": "hist", "weight": 0.25, "negatives": 3})
    loss = model.next_item
    # negatives are drawn from the whole shared item table (12 rows), 3 per position
    assert (loss.feature, loss.table, loss.rows, loss.negatives) == ("hist", "item", 12, 3)
    seen: list[torch.Tensor] = []
    loss.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    out = model.train()(_features(s))
    assert len(seen) == 1 and float(seen[0]) > 0  # a softplus loss: positive
    # alpha * the loss (Zhou et al., AAAI 2019, Eq. 2)
    torch.testing.assert_close(out.aux_losses["next_item_hist"].detach(), 0.25 * seen[0])


# -- the gate regulariser ------------------------------------------------------------------------
def _entropy64(w: torch.Tensor) -> torch.Tensor:
    """Mean row entropy of gate weights, in float64."""
    w = w.double()
    return -(w * w.clamp_min(1e-12).log()).sum(-1).mean()


def test_gate_aux_is_empty_without_gate_outputs_and_weights_the_penalty() -> None:
    p = GatedParams(gate_regularizer="entropy", gate_reg_weight=0.5)
    assert p.gate_aux([]) == {}
    outs = [
        GateOutput(torch.tensor([[0.5, 0.5], [1.0, 0.0]])),  # entropies ln 2, 0
        GateOutput(torch.tensor([[0.25, 0.75]])),
    ]
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    want = 0.5 * (math.log(2) / 2 + h)
    got = p.gate_aux(outs)
    assert set(got) == {"gate_entropy"}
    assert abs(float(got["gate_entropy"]) - want) < 1e-6


def test_mmoe_gate_regulariser_sums_every_gate() -> None:
    s = _schema(bias_seq=False)
    model = _model(schema=s, gate_regularizer="entropy", gate_reg_weight=0.3).eval()
    f = _features(s)
    with torch.no_grad():
        out = model(f)
    gates = [out.gates[t] for t in ("click", "watch", "domain")]
    assert all(g.shape == (6, 2) for g in gates)
    want = 0.3 * sum(_entropy64(g) for g in gates)
    assert abs(float(out.aux_losses["gate_entropy"]) - float(want)) < 1e-5


def test_ple_gate_regulariser_sums_every_level() -> None:
    s = _schema(bias_dense=False, bias_seq=False)
    params = {"num_levels": 2, "experts_per_task": 1, "shared_experts": 2, "expert_hidden": [5]}
    model = _model("ple", s, gate_regularizer="entropy", gate_reg_weight=0.2, **params).eval()
    with torch.no_grad():
        out = model(_features(s))
    # level 0: three task gates over 1 + 2 experts and the shared gate over all 5; level 1:
    # the three task gates (no shared gate)
    lv0 = [out.gates[f"level0.{t}"] for t in ("click", "watch", "domain")]
    lv1 = [out.gates[t] for t in ("click", "watch", "domain")]
    shared = out.gates["level0.shared"]
    assert shared.shape == (6, 5) and "shared" not in out.gates
    # each task bank's entropy is the mean over its tasks and rows
    want = 0.2 * (
        sum(_entropy64(g) for g in lv0) / 3
        + _entropy64(shared)
        + sum(_entropy64(g) for g in lv1) / 3
    )
    assert abs(float(out.aux_losses["gate_entropy"]) - float(want)) < 1e-5


# -- options reaching the experts and gates --------------------------------------------------------
def test_moe_experts_and_gates_take_the_options() -> None:
    s = _schema(bias_seq=False)
    gate = {
        "gate_hidden": [3],
        "gate_temperature": 2.0,
        "gate_type": "dselect",
        "dselect_k": 3,
        "dselect_gamma": 0.5,
        "gate_dropout": 0.2,
    }
    for name in ("mmoe", "omoe"):
        model = _model(name, s, activation="tanh", dropout=0.3, **gate)
        assert model.experts.activation == "tanh" and model.experts.act is torch.tanh
        assert model.experts.dropout == 0.3
        assert len(model.gates) == (3 if name == "mmoe" else 1)
        for g in model.gates.values():
            assert g.kind == "dselect" and g.temperature == 2.0
            assert g.net.layers[0].out_features == 3  # the hidden layer
            assert g.net.act is torch.tanh
            codes = g.route(torch.randn(4, g.net.layers[0].in_features)).codes
            assert codes is not None and codes.shape[-2] == 3  # k = 3 selectors


@pytest.mark.parametrize("name", ["cgc", "ple"])
def test_extraction_experts_take_the_activation_and_dropout(name: str) -> None:
    s = _schema(bias_seq=False)
    model = _model(name, s, activation="tanh", dropout=0.3, expert_hidden=[5])
    for level in model.levels:
        assert level.experts.activation == "tanh" and level.experts.act is torch.tanh
        assert level.experts.dropout == 0.3


# -- PLE / CGC: task-specific parameters are what only that task's logit reaches -------------------
@pytest.mark.parametrize(("name", "levels"), [("cgc", 1), ("ple", 2), ("ple", 3)])
def test_extraction_task_parameters_are_reached_by_that_task_alone(name: str, levels: int) -> None:
    s = _schema(bias_dense=False, bias_seq=False)
    extra = {"num_levels": levels} if name == "ple" else {}
    model = _model(name, s, activation="tanh", experts_per_task=1, shared_experts=1, **extra)
    out = model.train()(_features(s, n=8))
    params = list(model.parameters())
    reached: dict[str, set[int]] = {}
    for t in model.task_names:
        grads = torch.autograd.grad(
            out.logits[t].sum(), params, retain_graph=True, allow_unused=True
        )
        reached[t] = {
            id(p) for p, g in zip(params, grads, strict=True) if g is not None and g.abs().sum() > 0
        }
    for t in model.task_names:
        others = set().union(*(reached[u] for u in model.task_names if u != t))
        own = {id(p) for p in model.task_parameters(t)}
        assert own == reached[t] - others, t
        assert {id(p) for p in model.heads.towers[t].parameters()} <= own


# -- the hooks pass every positional argument on ----------------------------------------------
def test_bias_and_adversarial_pre_hooks_pass_every_argument_on() -> None:
    # forward pre-hooks replace the call's positional arguments: the bias split replaces the
    # first (the features) and the gradient reversal the tower's input, and every other one
    # still reaches forward, which refuses a stray one as it would without the hook
    s = _schema()
    model = _model(schema=s, adversarial_tasks={"domain": 1.0})
    f = _features(s)
    with pytest.raises(TypeError, match=STRAY):
        model(f, None)
    tower = model.heads.towers["domain"]
    x = torch.randn(4, tower.layers[0].in_features)
    with pytest.raises(TypeError, match=STRAY):
        tower(x, None)
    # the reversal itself, against the same tower (same seed) without it: the same value,
    # the gradient times -lambda
    plain = _model(schema=s).heads.towers["domain"]
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(tower(x).sum(), x)
    (g_plain,) = torch.autograd.grad(plain(x).sum(), x)
    torch.testing.assert_close(tower(x), plain(x))
    torch.testing.assert_close(g, -g_plain)
