"""Tests that kill the mutants of ``mtlrec.nn.auxiliary`` and ``mtlrec.nn.bias`` the rest of the
suite let live, each against a hand-computed value or a property the code documents: DIEN's
next-behaviour loss (one valid position, the loss's dtype), the valid positions of the
next-behaviour block (padding anywhere, the first real id), the sampled negatives of tiny
tables and on another device; the split of a batch's bias features (bias sequences, dense-only
bias layouts, the error messages, the batch without bias features), the bias tower's feature
drop-out (sequences, dense values, the ``u < p`` threshold, no random draw at ``p = 0``, the
device) and its serving row."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch

from mtlrec.batch import FIRST_ID, OOV_ID, PAD_ID, Features
from mtlrec.nn.auxiliary import NextBehaviourLoss, next_behaviour_loss, sample_negatives
from mtlrec.nn.bias import BiasTower, MainFeatures, split_bias
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout, FieldSpec, SequenceSpec

META = torch.device("meta")  # a device other than the CPU that needs no accelerator


def _log_sig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# -- DIEN's next-behaviour loss ------------------------------------------------------------------
def test_next_behaviour_loss_of_one_valid_position_is_that_position_s_loss() -> None:
    # one valid position out of three: the mean over valid positions divides by 1
    h = torch.tensor([[[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]]], dtype=torch.float64)
    pos = torch.tensor([[[0.5, 0.25], [1.0, 1.0], [-1.0, 2.0]]], dtype=torch.float64)
    neg = torch.tensor([[[[1.0, -1.0]], [[2.0, 2.0]], [[0.0, 1.0]]]], dtype=torch.float64)
    valid = torch.tensor([[False, True, False]])
    # step 1: <h, e+> = 0.5 - 1 = -0.5; <h, e-> = 1 - 2 = -1; log(1 - s(x)) = log s(-x)
    want = -(_log_sig(-0.5) + _log_sig(1.0))
    got = next_behaviour_loss(h, pos, neg, valid)
    assert abs(float(got) - want) < 1e-12, (float(got), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_next_behaviour_loss_keeps_the_states_dtype(dtype: torch.dtype) -> None:
    # the mask is cast to the loss's dtype, so a half-precision model gets a half-precision loss
    h = torch.ones(2, 3, 2, dtype=dtype)
    pos, neg = torch.ones(2, 3, 2, dtype=dtype), torch.zeros(2, 3, 1, 2, dtype=dtype)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    got = next_behaviour_loss(h, pos, neg, valid)
    assert got.dtype == dtype
    # every valid position: -[log s(2) + log s(0)]
    want = -(_log_sig(2.0) + math.log(0.5))
    assert abs(float(got) - want) < 2e-2


def test_next_behaviour_block_counts_only_real_steps_followed_by_real_items() -> None:
    lay = FeatureLayout(
        (), (SequenceSpec("hist", "item", 3, "mean", 4),), (), {"item": 9}, {"item": 3}
    )
    emb = EmbeddingCollection(lay, init_std=0.5)
    torch.manual_seed(3)
    block = NextBehaviourLoss("hist", "item", 3, 9, negatives=2)
    # row 0 starts with padding (a left-padded row); FIRST_ID (2) is a real item
    ids = torch.tensor([[0, 3, 4, 2], [3, 2, 0, 0]], dtype=torch.int32)
    feats = Features(torch.zeros(2, 0, dtype=torch.int32), torch.zeros(2, 0), {"hist": ids})
    torch.manual_seed(11)
    got = block(emb, feats)
    # valid (step t real, item t+1 real): row 0: pad->3 no, 3->4, 4->2; row 1: 3->2, then pads
    valid = torch.tensor([[False, True, True], [True, False, False]])
    with torch.no_grad():
        values, _ = emb.embed_sequence(feats, "hist")
        states, _ = block.gru(values)
        torch.manual_seed(11)
        negs = emb.embed_ids("item", sample_negatives(ids[:, 1:], 9, 2))
    # the loss by hand, a loop over the valid positions
    total = 0.0
    for b, t in valid.nonzero().tolist():
        s = states[b, t].double()
        total += _log_sig(float(s @ values[b, t + 1].double()))
        total += sum(_log_sig(-float(s @ n.double())) for n in negs[b, t])
    want = -total / int(valid.sum())
    assert abs(got.item() - want) < 1e-5, (got.item(), want)


# -- sampled negatives ---------------------------------------------------------------------------
def test_negatives_of_a_table_with_one_real_id_are_that_id() -> None:
    # rows=3: ids 0 (pad), 1 (OOV), 2: nothing but FIRST_ID to draw
    got = sample_negatives(torch.tensor([[2, 2, 0]]), rows=3, k=4)
    assert got.shape == (1, 3, 4) and got.dtype == torch.long
    assert (got == FIRST_ID).all()


def test_negatives_of_a_table_with_two_real_ids_are_the_other_id() -> None:
    # rows=4: real ids 2 and 3; the only id other than the positive is the other one
    torch.manual_seed(0)
    got = sample_negatives(torch.tensor([[2, 3, 2], [3, 3, 2]]), rows=4, k=3)
    want = torch.tensor([[3, 2, 3], [2, 2, 3]]).unsqueeze(-1).expand(2, 3, 3)
    assert torch.equal(got, want)


@pytest.mark.parametrize("rows", [3, 10])
def test_negatives_are_made_on_the_positives_device(rows: int) -> None:
    got = sample_negatives(torch.zeros(2, 3, dtype=torch.long, device=META), rows=rows, k=2)
    assert got.device == META and got.shape == (2, 3, 2) and got.dtype == torch.long


# -- split_bias ----------------------------------------------------------------------------------
def _bias_layout(
    sparse: tuple[str, ...] = ("pos",),
    dense: tuple[str, ...] = ("dev",),
    seqs: tuple[str, ...] = ("shown",),
) -> FeatureLayout:
    """A bias layout: sparse fields over 5 real ids, dense columns, sequences of length 3."""
    return FeatureLayout(
        tuple(FieldSpec(n, n, 2) for n in sparse),
        tuple(SequenceSpec(n, n, 2, "mean", 3) for n in seqs),
        dense,
        {n: 5 + FIRST_ID for n in (*sparse, *seqs)},
        {n: 2 for n in (*sparse, *seqs)},
        direct=frozenset((*sparse, *dense)),
    )


def _batch(n: int = 4) -> Features:
    """Main features item, price, hist and bias features pos, dev, shown (interleaved)."""
    g = torch.Generator().manual_seed(1)
    sparse = torch.randint(FIRST_ID, 7, (n, 2), generator=g, dtype=torch.int32)
    dense = torch.randn(n, 2, generator=g)
    seqs = {
        "hist": torch.randint(0, 7, (n, 5), generator=g, dtype=torch.int32),
        "shown": torch.randint(0, 7, (n, 3), generator=g, dtype=torch.int32),
    }
    return Features(sparse, dense, seqs, ("pos", "item"), ("price", "dev"))


def test_split_bias_moves_the_bias_sequences_to_the_bias_features() -> None:
    f = _batch()
    m = split_bias(f, _bias_layout())
    assert m.sparse_names == ("item",) and torch.equal(m.sparse, f.sparse[:, 1:])
    assert m.dense_names == ("price",) and torch.equal(m.dense, f.dense[:, :1])
    assert list(m.sequences) == ["hist"] and m.sequences["hist"] is f.sequences["hist"]
    assert m.bias is not None
    assert m.bias.sparse_names == ("pos",) and torch.equal(m.bias.sparse, f.sparse[:, :1])
    assert m.bias.dense_names == ("dev",) and torch.equal(m.bias.dense, f.dense[:, 1:])
    assert list(m.bias.sequences) == ["shown"]
    assert m.bias.sequences["shown"] is f.sequences["shown"]


def test_split_bias_without_any_bias_feature_keeps_the_batch_as_it_is() -> None:
    full = _batch()
    f = Features(full.sparse[:, 1:], full.dense[:, :1], {"hist": full.sequences["hist"]})
    f = Features(f.sparse, f.dense, f.sequences, ("item",), ("price",))
    m = split_bias(f, _bias_layout())
    assert isinstance(m, MainFeatures) and m.bias is None
    assert torch.equal(m.sparse, f.sparse) and torch.equal(m.dense, f.dense)
    assert list(m.sequences) == ["hist"] and torch.equal(m.sequences["hist"], f.sequences["hist"])
    assert m.sparse_names == ("item",) and m.dense_names == ("price",)


def test_split_bias_of_a_dense_only_bias_layout_gives_an_empty_sparse_block() -> None:
    f = _batch(5)
    m = split_bias(f, _bias_layout(sparse=(), seqs=()))
    assert m.bias is not None
    assert m.bias.sparse.shape == (5, 0) and m.bias.sparse.dtype == torch.int32
    assert torch.equal(m.bias.dense, f.dense[:, 1:]) and m.bias.dense_names == ("dev",)
    assert torch.equal(m.sparse, f.sparse) and m.sparse_names == ("pos", "item")


def test_split_bias_names_the_missing_bias_columns() -> None:
    f = _batch()  # holds pos but not pos2
    with pytest.raises(ValueError, match=re.escape("some bias features but not ['pos2']")):
        split_bias(f, _bias_layout(sparse=("pos", "pos2")))


def test_split_bias_names_the_missing_bias_sequences() -> None:
    f = _batch()  # holds shown but not shown2
    with pytest.raises(ValueError, match=re.escape("some bias sequences but not {'shown2'}")):
        split_bias(f, _bias_layout(seqs=("shown", "shown2")))


def test_split_bias_refuses_a_batch_with_one_kind_of_bias_feature_only() -> None:
    f = _batch()
    no_dev = Features(f.sparse, f.dense[:, :1], f.sequences, f.sparse_names, ("price",))
    msg = "^the batch holds some bias features but not all of them$"
    with pytest.raises(ValueError, match=msg):
        split_bias(no_dev, _bias_layout())


# -- the bias tower: feature drop-out ------------------------------------------------------------
def _tower(p: float, **kw: object) -> BiasTower:
    torch.manual_seed(0)
    return BiasTower(_bias_layout(), ["click"], hidden=(4,), feature_dropout=p, **kw)  # type: ignore[arg-type]


def _rows(n: int, device: torch.device | None = None) -> Features:
    """``n`` rows of bias features: pos id 5, dev 2.5, a full sequence shown [3, 4, 6]."""
    return Features(
        torch.full((n, 1), 5, dtype=torch.int32, device=device),
        torch.full((n, 1), 2.5, device=device),
        {"shown": torch.tensor([[3, 4, 6]], dtype=torch.int32, device=device).expand(n, 3)},
        ("pos",),
        ("dev",),
    )


def test_feature_dropout_empties_whole_sequences_per_row_at_the_rate() -> None:
    n, p = 6000, 0.25
    torch.manual_seed(5)
    d = _tower(p).drop_features(_rows(n))
    assert d.sparse_names == ("pos",) and d.dense_names == ("dev",)
    assert set(d.sequences) == {"shown"}
    seq = d.sequences["shown"]
    assert seq.shape == (n, 3)
    dropped = (seq == PAD_ID).all(1)
    kept = (seq == torch.tensor([3, 4, 6], dtype=torch.int32)).all(1)
    assert (dropped | kept).all()  # a whole sequence is dropped, or none of it
    assert abs(float(dropped.float().mean()) - p) < 0.025  # at the rate, row by row
    # a dropped dense value is 0 (missing), whatever the value was
    assert set(d.dense.unique().tolist()) == {0.0, 2.5}
    assert set(d.sparse.unique().tolist()) == {OOV_ID, 5}


def _uniform_at(value: float) -> Callable[..., torch.Tensor]:
    """A stand-in for ``torch.rand`` whose every draw is ``value``."""
    full = torch.full

    def rand(*size: object, device: torch.device | None = None) -> torch.Tensor:
        shape = size[0] if len(size) == 1 and isinstance(size[0], tuple | list) else size
        return full(tuple(shape), value, device=device)  # type: ignore[arg-type]

    return rand


def test_feature_dropout_drops_where_the_uniform_is_below_p(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # u ~ U[0, 1): "drop iff u < p" drops with probability p exactly; a draw equal to p keeps
    p = 0.25  # a float32 value exactly
    tower = _tower(p)
    monkeypatch.setattr(torch, "rand", _uniform_at(p))
    kept = tower.drop_features(_rows(3))
    assert (kept.sparse == 5).all() and (kept.dense == 2.5).all()
    assert (kept.sequences["shown"] == torch.tensor([3, 4, 6])).all()
    monkeypatch.setattr(torch, "rand", _uniform_at(p - 2.0**-24))
    gone = tower.drop_features(_rows(3))
    assert (gone.sparse == OOV_ID).all() and (gone.dense == 0).all()
    assert (gone.sequences["shown"] == PAD_ID).all()


def test_feature_dropout_off_draws_no_random_numbers() -> None:
    # p = 0: the batch unchanged, and the random stream left as it was (reproducible training)
    tower, f = _tower(0.0), _rows(4)
    before = torch.get_rng_state()
    out = tower.drop_features(f)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(out.sparse, f.sparse) and torch.equal(out.dense, f.dense)
    assert torch.equal(out.sequences["shown"], f.sequences["shown"])


def test_feature_dropout_stays_on_the_features_device() -> None:
    d = _tower(0.5).drop_features(_rows(4, device=META))
    assert d.sparse.device == META and d.dense.device == META
    assert d.sequences["shown"].device == META


# -- the bias tower: the serving row -------------------------------------------------------------
def test_serving_row_has_every_bias_feature_and_empty_sequences() -> None:
    tower = _tower(0.1, serve={"pos": 1, "dev": 2.0})
    f = tower.serving_features()
    assert f.sparse_names == ("pos",) and f.dense_names == ("dev",)
    assert torch.equal(f.sparse, torch.tensor([[1 + FIRST_ID]], dtype=torch.int32))
    assert torch.equal(f.dense, torch.tensor([[2.0]]))
    assert set(f.sequences) == {"shown"}
    seq = f.sequences["shown"]
    assert seq.dtype == torch.int32 and torch.equal(seq, torch.zeros(1, 3, dtype=torch.int32))
    # the tower's serving logits are those of that row: the empty sequence pools to 0
    tower.eval()
    with torch.no_grad():
        served = tower(None)
        assert served is not None and served.shape == (1, 1)
        row = Features(f.sparse, f.dense, {"shown": torch.zeros(1, 3, dtype=torch.int32)})
        torch.testing.assert_close(served, tower.logits(row))


def test_serving_row_is_on_the_tower_s_device() -> None:
    tower = _tower(0.1, serve={}).to(META)
    f = tower.serving_features()
    assert f.sparse.device == META and f.sequences["shown"].device == META
