"""Tests that kill the mutants of ``mtlrec.nn.embedding`` and ``mtlrec.nn.heads`` the rest of the
suite let live, each against an independent computation or a documented property: the default
initialisation of the fused tables, width groups after a width read by sequences only, index
buffers left out of the state dict and int32 global ids, the ``fields`` and ``dense`` of
:class:`Embedded` (one sparse field included), the zero padding of a single part, sparse
gradients of every lookup, :meth:`FeatureLayout.from_schema` (missing tables, sequence lengths),
and the task towers: chain validation and its messages, the default dropout and detaching, and
the chained column (a probability for a binary source, the raw value for a regression one)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mtlrec.batch import Features
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout, FieldSpec, SequenceSpec
from mtlrec.nn.heads import TaskHeads
from mtlrec.schema import DenseFeature, Schema, SequenceFeature, SparseFeature, TaskSpec

I32 = torch.int32


def _ids(rows: list[list[int]]) -> Tensor:
    return torch.tensor(rows, dtype=I32)


# -- EmbeddingCollection -----------------------------------------------------------------------
def test_tables_are_initialised_with_std_005_by_default() -> None:
    # 16000 normal draws: the sample std is 0.05 within a few 1e-4 (0.05 / sqrt(2 n) = 3e-4)
    torch.manual_seed(0)
    lay = FeatureLayout((FieldSpec("a", "a", 4),), (), (), {"a": 4000}, {"a": 4})
    w = EmbeddingCollection(lay).tables["d4"].weight.detach().double()
    assert abs(w.std().item() - 0.05) < 3e-3
    assert abs(w.mean().item()) < 3e-3


def test_sparse_width_after_a_width_read_only_by_a_sequence_is_still_embedded() -> None:
    # widths 2 (the sequence's table) and 4 (the sparse field's): the narrower one has no sparse
    # field, which must not end the grouping of the wider one
    torch.manual_seed(1)
    lay = FeatureLayout(
        (FieldSpec("u", "u", 4),),
        (SequenceSpec("h", "h", 2, "sum", 3),),
        (),
        {"u": 5, "h": 6},
        {"u": 4, "h": 2},
    )
    emb = EmbeddingCollection(lay, pad_to=1)
    feats = Features(_ids([[3], [1]]), torch.zeros(2, 0), {"h": _ids([[1, 4, 0], [5, 0, 0]])})
    out = emb(feats).flat
    u, h = emb.table_weight("u").detach(), emb.table_weight("h").detach()
    want = torch.stack(
        [torch.cat([u[3], h[1] + h[4]]), torch.cat([u[1], h[5]])]
    )  # [u row | sum of the non-padding h rows]
    assert out.shape == (2, 6)
    torch.testing.assert_close(out, want)


def test_index_buffers_are_left_out_of_the_state_dict() -> None:
    # column positions and row offsets follow from the layout: a checkpoint holds the tables only
    lay = FeatureLayout(
        (FieldSpec("a", "a", 4), FieldSpec("b", "b", 2)), (), (), {"a": 5, "b": 3}, {"a": 4, "b": 2}
    )
    emb = EmbeddingCollection(lay)
    assert len(list(emb.buffers())) == 4  # the buffers exist (cols and offsets of two widths)
    assert sorted(emb.state_dict()) == ["tables.d2.weight", "tables.d4.weight"]


def test_global_ids_of_int32_sparse_ids_stay_int32(monkeypatch: pytest.MonkeyPatch) -> None:
    # ids + offsets: int32 offsets keep the batch's int32 ids int32 (no int64 copy per batch)
    seen: list[torch.dtype] = []
    real: Callable[..., Tensor] = F.embedding

    def spy(ids: Tensor, *args: object, **kwargs: object) -> Tensor:
        seen.append(ids.dtype)
        return real(ids, *args, **kwargs)

    lay = FeatureLayout(
        (FieldSpec("a", "a", 4), FieldSpec("b", "b", 4)), (), (), {"a": 5, "b": 3}, {"a": 4, "b": 4}
    )
    emb = EmbeddingCollection(lay)
    monkeypatch.setattr(torch.nn.functional, "embedding", spy)
    out = emb.embed_fields(Features(_ids([[1, 2], [4, 0]]), torch.zeros(2, 0)))
    assert seen == [I32]
    # and the offsets are right: b's rows start after a's 5
    w = emb.tables["d4"].weight.detach()
    torch.testing.assert_close(out[0], torch.stack([w[[1, 7]], w[[4, 5]]]))


def test_single_sparse_field_gives_fields_and_zero_padding() -> None:
    # Embedded.fields is [B, F, E] whenever all sparse fields share one width, one field included;
    # flat is that field's 4 values then 4 zero columns (pad to a multiple of 8)
    lay = FeatureLayout((FieldSpec("a", "a", 4),), (), (), {"a": 5}, {"a": 4})
    emb = EmbeddingCollection(lay)
    out = emb(Features(_ids([[2], [3], [0]]), torch.zeros(3, 0)))
    w = emb.tables["d4"].weight.detach()
    assert out.fields is not None and out.fields.shape == (3, 1, 4)
    torch.testing.assert_close(out.fields[:, 0], w[[2, 3, 0]])
    torch.testing.assert_close(out.flat, torch.cat([w[[2, 3, 0]], torch.zeros(3, 4)], dim=1))


def test_embedded_dense_is_the_batch_dense_values() -> None:
    lay = FeatureLayout((FieldSpec("a", "a", 4),), (), ("x", "y"), {"a": 5}, {"a": 4})
    dense = torch.tensor([[0.5, -1.0], [2.0, 3.0]])
    out = EmbeddingCollection(lay)(Features(_ids([[1], [2]]), dense))
    assert out.dense is not None
    torch.testing.assert_close(out.dense, dense)
    torch.testing.assert_close(out.flat[:, 4:6], dense)


def _sparse_grad_collection(pooling: str) -> EmbeddingCollection:
    torch.manual_seed(2)
    lay = FeatureLayout(
        (FieldSpec("a", "a", 3), FieldSpec("b", "a", 3)),
        (SequenceSpec("h", "a", 3, pooling, 3),),
        (),
        {"a": 6},
        {"a": 3},
    )
    emb = EmbeddingCollection(lay, pad_to=1)
    emb.sparse_grad = True  # what the trainer sets for optimizer.sparse_embeddings
    return emb


def test_sparse_field_lookups_give_sparse_gradients_when_asked() -> None:
    emb = _sparse_grad_collection("sum")
    emb.embed_fields(Features(_ids([[1, 2], [1, 5]]), torch.zeros(2, 0)))[0].sum().backward()
    grad = emb.tables["d3"].weight.grad
    assert grad is not None and grad.is_sparse
    want = torch.zeros(6, 3)  # d sum / d row = how often the row was read
    want[1], want[2], want[5] = 2.0, 1.0, 1.0
    torch.testing.assert_close(grad.to_dense(), want)


@pytest.mark.parametrize("pooling", ["mean", "sum", "max"])
def test_pooled_sequences_give_sparse_gradients_when_asked(pooling: str) -> None:
    emb = _sparse_grad_collection(pooling)
    seq = _ids([[1, 4, 0], [2, 2, 5]])
    feats = Features(_ids([[0, 0], [0, 0]]), torch.zeros(2, 0), {"h": seq})
    flat = emb(feats).flat  # [a | b | pooled h]
    coef = torch.tensor([1.0, -2.0, 0.5])
    (flat[:, 6:] * coef).sum().backward()
    grad = emb.tables["d3"].weight.grad
    assert grad is not None and grad.is_sparse
    # reference: the pooling written as a loop over rows on a dense float64 copy of the table
    w = emb.tables["d3"].weight.detach().double().requires_grad_(True)
    rows = []
    for r in seq.tolist():
        real = torch.stack([w[i] for i in r if i != 0])
        rows.append({"sum": real.sum(0), "mean": real.mean(0), "max": real.max(0).values}[pooling])
    (torch.stack(rows) * coef.double()).sum().backward()
    assert w.grad is not None
    torch.testing.assert_close(grad.to_dense().double(), w.grad)


# -- FeatureLayout.from_schema -----------------------------------------------------------------
def _schema() -> Schema:
    return Schema(
        features=(
            SparseFeature(name="item", embedding_dim=4),
            SparseFeature(name="user", embedding_dim=4),
            SequenceFeature(name="hist", table="item", embedding_dim=4, max_len=7, pooling="max"),
            DenseFeature(name="price"),
        ),
        tasks=(TaskSpec(name="click", kind="binary"),),
    )


def test_from_schema_names_the_tables_without_a_size() -> None:
    with pytest.raises(ValueError, match=r"no table size for \['user'\]"):
        FeatureLayout.from_schema(_schema(), {"item": 10})


def test_from_schema_keeps_each_sequence_spec() -> None:
    lay = FeatureLayout.from_schema(_schema(), {"item": 10, "user": 3})
    assert lay.sequences == (SequenceSpec("hist", "item", 4, "max", 7),)
    assert lay.sparse == (FieldSpec("item", "item", 4), FieldSpec("user", "user", 4))
    assert lay.table_sizes == {"item": 10, "user": 3}


# -- TaskHeads ---------------------------------------------------------------------------------
BIN = TaskSpec(name="click", kind="binary")
REG = TaskSpec(name="watch", kind="regression")
MULTI = TaskSpec(name="grade", kind="multiclass", num_classes=3)


@pytest.mark.parametrize(
    "chain",
    [{"nope": "click"}, {"click": "nope"}],
)
def test_chain_with_an_unknown_task_is_refused_with_the_task_list(chain: dict[str, str]) -> None:
    ((dst, src),) = chain.items()
    msg = rf"chain '{dst}' <- '{src}': unknown task \(tasks: \['click', 'watch'\]\)"
    with pytest.raises(ValueError, match=msg):
        TaskHeads([BIN, REG], 4, chain=chain)


def test_multiclass_chain_source_is_refused_with_its_message() -> None:
    msg = "chain 'click' <- 'grade': a multiclass task cannot be a source"
    with pytest.raises(ValueError, match=msg):
        TaskHeads([BIN, MULTI], 4, chain={"click": "grade"})


def test_towers_have_no_dropout_by_default() -> None:
    # training and evaluation outputs agree when nothing is dropped
    torch.manual_seed(3)
    heads = TaskHeads([BIN, REG], 4, [8])
    x = torch.randn(16, 4)
    with torch.no_grad():
        tr = heads.train()(x)
        ev = heads.eval()(x)
    for k in ("click", "watch"):
        torch.testing.assert_close(tr[k], ev[k])


def test_chained_column_is_detached_by_default() -> None:
    # the chained task's loss reaches its own tower only, not the source's
    torch.manual_seed(4)
    heads = TaskHeads([BIN, REG], 4, [8], chain={"watch": "click"})
    heads(torch.randn(8, 4))["watch"].sum().backward()
    assert all(p.grad is None for p in heads.towers["click"].parameters())
    assert all(p.grad is not None for p in heads.towers["watch"].parameters())


@pytest.mark.parametrize("source", [BIN, REG])
def test_chained_column_is_the_source_probability_or_value(source: TaskSpec) -> None:
    # binary source: sigmoid of its logit; regression source: its raw value
    torch.manual_seed(5)
    dst = TaskSpec(name="buy", kind="binary")
    heads = TaskHeads([source, dst], 4, [8], chain={"buy": source.name})
    x = torch.randn(8, 4)
    out, read = heads.run(x)
    z = out[source.name].detach()
    want = torch.sigmoid(z) if source.kind == "binary" else z
    torch.testing.assert_close(read["buy"], torch.cat([x, want[:, None]], dim=1))
    assert out["buy"].shape == (8,)
