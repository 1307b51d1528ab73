"""The TorchRec embedding backend is the same object as the torch one: with the same table
values it gives the same ``Embedded`` (fields of two widths, mean- and sum-pooled sequences,
empty sequences, a table shared by a field and a sequence); what it cannot do is refused with
one clear message; and ``import mtlrec`` never imports torchrec."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout, FieldSpec, SequenceSpec


def test_import_mtlrec_does_not_import_torchrec() -> None:
    code = (
        "import sys, mtlrec, mtlrec.cli, mtlrec.train.run, mtlrec.train.sharded; "
        "bad = [m for m in ('torchrec', 'fbgemm_gpu') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


LAYOUT = FeatureLayout(
    sparse=(FieldSpec("user", "user", 4), FieldSpec("item", "item", 8), FieldSpec("cat", "cat", 4)),
    sequences=(
        SequenceSpec("hist", "item", 8, "mean", 5),
        SequenceSpec("tags", "tag", 4, "sum", 3),
    ),
    dense=("price", "age"),
    table_sizes={"user": 11, "item": 23, "cat": 5, "tag": 9},
    table_dims={"user": 4, "item": 8, "cat": 4, "tag": 4},
)


@pytest.fixture
def private_group() -> Any:
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _features(b: int = 6) -> Features:
    g = torch.Generator().manual_seed(0)
    sparse = torch.stack([torch.randint(1, n, (b,), generator=g) for n in (11, 23, 5)], 1).to(
        torch.int32
    )
    hist = torch.randint(1, 23, (b, 5), generator=g).to(torch.int32)
    hist[0] = 0  # an empty sequence
    hist[1, 2:] = 0  # a short one
    tags = torch.randint(1, 9, (b, 3), generator=g).to(torch.int32)
    tags[2, 1:] = 0
    return Features(
        sparse,
        torch.randn(b, 2, generator=g),
        {"hist": hist, "tags": tags},
        ("user", "item", "cat"),
        ("price", "age"),
    )


def test_same_embedded_as_the_torch_backend(private_group: Any) -> None:
    pytest.importorskip("torchrec")
    import torchrec.optim as trec_optim
    from torchrec.distributed.types import ShardingEnv

    from mtlrec.nn.torchrec_embedding import TorchRecEmbeddingCollection
    from mtlrec.train.sharded import local_context

    local_context(torch.device("cpu"))
    import torch.distributed as dist

    emb = TorchRecEmbeddingCollection(LAYOUT)
    assert emb.ebc.embedding_bags["item"].weight.device.type == "meta"
    plan = {t: ("table_wise", (0,)) for t in LAYOUT.table_sizes}
    emb.shard(
        plan,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        optimizer=(trec_optim.SGD, {"lr": 0.1}),
        seed=0,
        key="embedding",
        local_size=1,
    )
    ref = EmbeddingCollection(LAYOUT)
    with torch.no_grad():
        for table, pieces in emb.local_shards().items():
            (tensor, _, _, _) = pieces[0]
            ref.table_weight(table).copy_(tensor)
    f = _features()
    got, want = emb(f), ref(f)
    assert got.flat.shape == want.flat.shape and emb.out_dim == ref.out_dim
    torch.testing.assert_close(got.flat, want.flat, atol=1e-6, rtol=1e-5)
    assert got.fields is None and want.fields is None  # two widths: no [B, F, E] view
    torch.testing.assert_close(got.dense, want.dense)


def test_what_the_bags_cannot_do_is_refused() -> None:
    pytest.importorskip("torchrec")
    from mtlrec.nn.torchrec_embedding import TorchRecEmbeddingCollection, table_infos

    def layout(*seqs: SequenceSpec) -> FeatureLayout:
        return FeatureLayout((FieldSpec("item", "item", 4),), seqs, (), {"item": 9}, {"item": 4})

    with pytest.raises(ConfigError, match="max pooling"):
        table_infos(layout(SequenceSpec("h", "item", 4, "max", 3)))
    with pytest.raises(ConfigError, match="one pooling"):
        table_infos(
            layout(SequenceSpec("h", "item", 4, "mean", 3), SequenceSpec("g", "item", 4, "sum", 3))
        )
    emb = TorchRecEmbeddingCollection(layout(SequenceSpec("h", "item", 4, "mean", 3)))
    with pytest.raises(ConfigError, match="unpooled"):
        emb.embed_sequence(_features(), "h")
