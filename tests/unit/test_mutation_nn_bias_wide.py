"""Tests that kill the mutants of ``mtlrec.nn.auxiliary``, ``mtlrec.nn.bias`` and
``mtlrec.nn.wide`` the rest of the suite let live, each against a hand-computed value, an
independent reference or a documented property: the default factor of gradient reversal, the
next-behaviour block's GRU (batch-first, against a hand-run recurrence) and its default of one
negative; the bias tower's defaults (10% feature drop-out, the tables' ``init_std``), its input
width (no zero padding), activation, the serving row (int32 ids, not saved in the state dict)
and its error messages; the cross hash (one multiplier per feature, a single feature) and the
wide part's field ids, per-task sums, task names, state dict and error message."""

from __future__ import annotations

import math
import re

import pytest
import torch

from mtlrec.batch import FIRST_ID, OOV_ID, Features
from mtlrec.nn.auxiliary import GradientReversal, NextBehaviourLoss, grad_reverse, sample_negatives
from mtlrec.nn.bias import BiasTower
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout, FieldSpec, SequenceSpec
from mtlrec.nn.wide import HASH_PRIME, WideLinear, hash_cross

F64 = torch.float64


def _exact(msg: str) -> str:
    """A ``pytest.raises(match=...)`` pattern that takes ``msg`` and nothing else."""
    return f"^{re.escape(msg)}$"


def _log_sig(x: float) -> float:
    """``log s(x)``, the log of the logistic sigmoid, in float64."""
    return -math.log1p(math.exp(-x))


# -- gradient reversal ---------------------------------------------------------------------------
def test_grad_reverse_default_factor_is_one() -> None:
    # Ganin & Lempitsky's R_lambda with the default lambda = 1: d(sum x)/dx reversed is -1
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    grad_reverse(x).sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [-1.0, -1.0, -1.0]


def test_gradient_reversal_layer_default_factor_is_one() -> None:
    layer = GradientReversal()
    assert layer.lam == 1.0
    x = torch.ones(3, requires_grad=True)
    (layer(x) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [-1.0, -2.0, -3.0]  # -lambda times the incoming gradient


# -- DIEN's next-behaviour block -------------------------------------------------------------------
def _gru_by_hand(gru: torch.nn.GRU, x: torch.Tensor) -> torch.Tensor:
    """The GRU of one row ``x [L, E]`` step by step in float64 (PyTorch's equations: gates
    ``r, z, n`` in this order in ``weight_ih_l0`` / ``weight_hh_l0``, zero initial state)."""
    w_ih, w_hh = gru.weight_ih_l0.detach().double(), gru.weight_hh_l0.detach().double()
    b_ih, b_hh = gru.bias_ih_l0.detach().double(), gru.bias_hh_l0.detach().double()
    e = w_hh.shape[1]
    h = torch.zeros(e, dtype=F64)
    out = []
    for xt in x.double():
        gi, gh = w_ih @ xt + b_ih, w_hh @ h + b_hh
        r = torch.sigmoid(gi[:e] + gh[:e])
        z = torch.sigmoid(gi[e : 2 * e] + gh[e : 2 * e])
        n = torch.tanh(gi[2 * e :] + r * gh[2 * e :])
        h = (1 - z) * n + z * h
        out.append(h)
    return torch.stack(out)  # [L, E]


def test_next_behaviour_block_runs_the_gru_over_each_row_with_one_negative_by_default() -> None:
    rows, dim = 9, 3
    lay = FeatureLayout(
        (), (SequenceSpec("hist", "item", dim, "mean", 4),), (), {"item": rows}, {"item": dim}
    )
    torch.manual_seed(0)
    emb = EmbeddingCollection(lay, init_std=0.5)
    block = NextBehaviourLoss("hist", "item", dim, rows)  # negatives: the default
    assert block.negatives == 1
    # 3 rows of 4 steps (B != L), right-padded: the GRU reads each row's own steps in order
    ids = torch.tensor([[3, 4, 2, 5], [6, 2, 7, 0], [8, 3, 0, 0]], dtype=torch.int32)
    feats = Features(torch.zeros(3, 0, dtype=torch.int32), torch.zeros(3, 0), {"hist": ids})
    torch.manual_seed(5)
    got = float(block(emb, feats).detach())
    with torch.no_grad():
        values, _ = emb.embed_sequence(feats, "hist")  # [B, L, E]
        torch.manual_seed(5)  # the block's only random draw: the negatives
        negs = emb.embed_ids("item", sample_negatives(ids[:, 1:].long(), rows, 1))
    # valid (step t real, item t+1 real): row 0: 3 steps, row 1: 2, row 2: 1
    valid = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]
    total = 0.0
    for b in range(3):
        states = _gru_by_hand(block.gru, values[b])  # [L, E]
        for t in [t for bb, t in valid if bb == b]:
            total += _log_sig(float(states[t] @ values[b, t + 1].double()))
            total += _log_sig(-float(states[t] @ negs[b, t, 0].double()))
    want = -total / len(valid)
    assert abs(got - want) < 1e-5, (got, want)


def test_next_behaviour_block_rejects_zero_negatives_with_its_message() -> None:
    with pytest.raises(ValueError, match=_exact("negatives must be >= 1, got 0")):
        NextBehaviourLoss("hist", "item", 3, 9, negatives=0)


# -- the bias tower --------------------------------------------------------------------------------
def _layout(pos_rows: int = 5, direct: frozenset[str] | None = None) -> FeatureLayout:
    """Bias features: ``pos`` (sparse, width 2, ``pos_rows`` real ids) and ``dev`` (dense);
    flat width 2 + 1 = 3."""
    return FeatureLayout(
        (FieldSpec("pos", "pos", 2),),
        (),
        ("dev",),
        {"pos": pos_rows + FIRST_ID},
        {"pos": 2},
        direct=frozenset({"pos", "dev"}) if direct is None else direct,
    )


def _bias_rows(n: int = 16) -> Features:
    g = torch.Generator().manual_seed(2)
    pos = torch.randint(FIRST_ID, 5 + FIRST_ID, (n, 1), generator=g, dtype=torch.int32)
    return Features(
        pos, torch.randn(n, 1, generator=g), sparse_names=("pos",), dense_names=("dev",)
    )


def test_bias_tower_default_feature_dropout_is_ten_percent() -> None:
    # Zhao et al. (RecSys 2019, Section 4.3) drop the bias features 10% of the time
    assert BiasTower(_layout(), ["click"]).feature_dropout == 0.1


@pytest.mark.parametrize("p", [1.0, 1.5])
def test_bias_tower_rejects_a_feature_dropout_of_one_or_more(p: float) -> None:
    # p = 1 would drop every bias feature of every row: the tower could learn nothing
    with pytest.raises(ValueError, match=_exact(f"feature_dropout must be in [0, 1), got {p}")):
        BiasTower(_layout(), ["click"], feature_dropout=p)


@pytest.mark.parametrize("init_std", [None, 0.5])
def test_bias_tower_tables_are_initialised_with_init_std(init_std: float | None) -> None:
    # 4000 rows x 2 columns of N(0, std^2): the sample std is within 5% of std (its relative
    # standard error is 1 / sqrt(2 * 8000) < 1%); the default std is 0.05
    torch.manual_seed(0)
    kw = {} if init_std is None else {"init_std": init_std}
    tower = BiasTower(_layout(pos_rows=4000), ["click"], **kw)
    w = tower.embedding.table_weight("pos").detach()
    want = 0.05 if init_std is None else init_std
    assert abs(float(w.std()) / want - 1.0) < 0.05, (float(w.std()), want)


def test_bias_tower_reads_the_bias_features_without_zero_padding() -> None:
    # the shallow tower's first layer reads the 3 bias values (pos: 2, dev: 1), no padding
    tower = BiasTower(_layout(), ["click", "watch"], hidden=(4,))
    assert tower.embedding.out_dim == 3
    assert tower.mlp.layers[0].weight.shape == (4, 3)
    assert tower.logits(_bias_rows(5)).shape == (5, 2)


def test_bias_tower_uses_its_activation_between_layers() -> None:
    torch.manual_seed(1)
    tower = BiasTower(_layout(), ["click"], hidden=(4,), activation="tanh", feature_dropout=0.0)
    f = _bias_rows()
    with torch.no_grad():
        got = tower.logits(f)
        # by hand: embedded pos, dev -> tanh(W1 x + b1) -> W2 h + b2 (no activation on logits)
        x = torch.cat([tower.embedding.table_weight("pos")[f.sparse[:, 0].long()], f.dense], 1)
        l1, l2 = tower.mlp.layers
        want = l2(torch.tanh(l1(x)))
    assert (l1(x) < 0).any()  # relu would differ on these rows
    torch.testing.assert_close(got, want)


def test_bias_tower_serving_row_holds_int32_ids() -> None:
    tower = BiasTower(_layout(), ["click"], serve={"pos": 3})
    row = tower.serving_features()
    assert row.sparse.dtype == torch.int32  # the id dtype of every batch (Features)
    assert row.sparse.tolist() == [[3 + FIRST_ID]]
    assert BiasTower(_layout(), ["click"], serve={}).serving_features().sparse.dtype == torch.int32


def test_bias_tower_serving_values_are_not_in_the_state_dict() -> None:
    a = BiasTower(_layout(), ["click"], serve={"pos": 0, "dev": 1.5})
    b = BiasTower(_layout(), ["click"], serve={"pos": 3, "dev": -2.0})
    state = a.state_dict()
    assert not [k for k in state if "_serve" in k]
    # loading another tower's weights keeps this tower's own serving row (from its options)
    b.load_state_dict(state)
    row = b.serving_features()
    assert row.sparse.tolist() == [[3 + FIRST_ID]]
    assert row.dense.tolist() == [[-2.0]]


def test_bias_tower_serving_value_of_an_encoded_feature_is_refused_with_its_message() -> None:
    msg = (
        "serve_as 'pos': only pre-indexed ids (vocab_size) and untransformed "
        "numbers (transform: none) can be given as values (the model holds no encoders); "
        "use serve_as: drop or missing for the others"
    )
    with pytest.raises(ValueError, match=_exact(msg)):
        BiasTower(_layout(direct=frozenset({"dev"})), ["click"], serve={"pos": 1})


def test_bias_tower_in_training_without_bias_features_says_which_it_needs() -> None:
    tower = BiasTower(_layout(), ["click"])
    msg = (
        "the bias tower needs the bias features ['pos', 'dev'] "
        "in training (role: bias columns of the training data)"
    )
    with pytest.raises(ValueError, match=_exact(msg)):
        tower.train()(None)


def test_bias_tower_serving_row_of_missing_features_is_oov() -> None:
    tower = BiasTower(_layout(), ["click"], serve={})
    assert tower.serving_features().sparse.tolist() == [[OOV_ID]]


# -- the cross hash --------------------------------------------------------------------------------
def test_hash_cross_needs_one_multiplier_per_feature() -> None:
    a, b = torch.tensor([2, 3]), torch.tensor([4, 5])
    with pytest.raises(ValueError):
        hash_cross([a, b], [7], 10)
    with pytest.raises(ValueError):
        hash_cross([a], [7, 11], 10)


def test_hash_cross_of_one_feature_is_its_scaled_id_modulo_the_buckets() -> None:
    # h = (0 * 1000003 + id * a) mod (2^31 - 1), then mod buckets (Python integers)
    ids = [0, 5, 2**31 - 2, 123_456_789]
    a, buckets = 1_234_567, 97
    got = hash_cross([torch.tensor(ids, dtype=torch.int32)], [a], buckets)
    assert got.dtype == torch.int64
    assert got.tolist() == [(i * a % HASH_PRIME) % buckets for i in ids]


# -- the wide part -------------------------------------------------------------------------------
def _wide_layout() -> FeatureLayout:
    return FeatureLayout(
        (FieldSpec("user", "user", 4), FieldSpec("item", "item", 4)),
        (),
        ("price",),
        {"user": 6, "item": 6},
        {"user": 4, "item": 4},
    )


def _wide_rows() -> Features:
    sparse = torch.tensor([[2, 3], [4, 3], [5, 2], [2, 5]], dtype=torch.int32)
    return Features(sparse, torch.zeros(4, 1), sparse_names=("user", "item"))


def test_wide_field_ids_are_int64_without_crosses() -> None:
    wide = WideLinear(_wide_layout(), ["click"], ["user", "item"], [], buckets=8)
    f = _wide_rows()
    ids = wide.field_ids(f)
    assert ids.dtype == torch.int64  # documented: [B, F_wide + C] int64
    assert torch.equal(ids, f.sparse.long())


def test_wide_logits_sum_each_task_weights_over_the_fields() -> None:
    # two features and two tasks: task k's logit = sum over fields of w_field[id, k] + b_k
    wide = WideLinear(_wide_layout(), ["click", "watch"], ["user", "item"], [], buckets=8)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in wide.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    f = _wide_rows()
    with torch.no_grad():
        got = wide(f)
    wu, wi = wide.weights.table_weight("wide:user"), wide.weights.table_weight("wide:item")
    want = torch.stack(
        [
            torch.stack([wu[u, k] + wi[i, k] + wide.bias[k] for k in range(2)])
            for u, i in f.sparse.tolist()
        ]
    )
    assert got.shape == (4, 2)
    torch.testing.assert_close(got, want.detach())


def test_wide_part_records_its_tasks_in_output_order() -> None:
    wide = WideLinear(_wide_layout(), ["click", "watch"], ["user"], [], buckets=8)
    assert wide.tasks == ("click", "watch")


def test_wide_state_dict_holds_only_the_weights() -> None:
    # the feature columns follow from the options, not from a checkpoint
    a = WideLinear(_wide_layout(), ["click"], ["user"], [], buckets=8)
    b = WideLinear(_wide_layout(), ["click"], ["item"], [], buckets=8)  # same table size
    assert set(a.state_dict()) == {"bias", "weights.tables.d1.weight"}
    b.load_state_dict(a.state_dict())
    f = _wide_rows()
    assert torch.equal(b.field_ids(f), f.sparse[:, 1:].long())  # still its own column


def test_wide_part_without_features_or_crosses_says_so() -> None:
    with pytest.raises(ValueError, match=_exact("wide part: no feature and no cross")):
        WideLinear(_wide_layout(), ["click"], [], [], buckets=8)
