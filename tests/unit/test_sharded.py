"""Sharded embedding tables (``model.embedding_backend: torchrec``): two gloo processes with
row-wise, table-wise and column-wise plans train exactly like one process of the torch backend
on the whole batch, with a masked task and with a gradient-based strategy (PCGrad).

The masked task (``watch``, on clicked rows only) has a different number of valid rows in the
two halves of most batches, and the last batch of every epoch (27 rows) is split 13 / 14, so
one process tops its share up with a filler row: both must leave the result unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torchrec")
pytest.importorskip("fbgemm_gpu")

import torch.distributed as dist
import torch.multiprocessing as mp
from _sharded_helpers import MODEL, PLANS, data, sharded_run, strategy, training, worker

from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.nn.torchrec_embedding import initial_rows
from mtlrec.train.shard_checkpoint import restore_gathered
from mtlrec.train.trainer import Trainer
from mtlrec.utils.runtime import free_port

TOL = dict(atol=1e-5, rtol=0.0)
CASES = [
    ("row_wise", "static", "sgd"),
    ("table_wise", "static", "sgd"),
    ("column_wise", "static", "sgd"),
    ("row_wise", "pcgrad", "sgd"),
    ("column_wise", "pcgrad", "sgd"),
    ("row_wise", "static", "rowwise_adagrad"),  # against one torchrec process (below)
]


@pytest.fixture
def private_group() -> Any:
    """The one-process group a one-process sharded run creates, removed afterwards."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def reference(strategy_name: str) -> dict[str, Any]:
    """One process, the torch backend, the sharded run's initial weights."""
    pre, ds = data()
    torch.manual_seed(0)
    twin = build_model("mmoe", ds.schema, pre.table_sizes(), MODEL, embedding_backend="torchrec")
    model = build_model("mmoe", ds.schema, pre.table_sizes(), MODEL)
    cfg = training()
    std = model.params.embedding_init_std
    dims = {t: ds.schema.tables()[t][0].embedding_dim for t in pre.table_sizes()}
    tables = {
        "embedding": {
            t: initial_rows(cfg.seed, f"embedding/{t}", (0, n), (n, dims[t]), std)
            for t, n in pre.table_sizes().items()
        }
    }
    dense = {k: v for k, v in twin.state_dict().items() if not k.startswith("embedding.ebc.")}
    restore_gathered(model, dense, tables, source="twin")
    trainer = Trainer(
        model, ds.schema, config=cfg, strategy=strategy(strategy_name, model.loss_task_names)
    )
    result = trainer.fit(ds, None)
    state = model.state_dict()
    return {
        "losses": [r["train_loss"] for r in result.history],
        "dense": {k: v for k, v in state.items() if not k.startswith("embedding.")},
        "tables": {t: model.embedding.table_weight(t).detach() for t in pre.table_sizes()},
        "metrics": trainer.evaluate(ds),
        "preds": trainer.predict(ds),
    }


def assert_same(got: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    for e, (a, b) in enumerate(zip(got["losses"], ref["losses"], strict=True)):
        for t in b:
            assert a[t] == pytest.approx(b[t], abs=1e-5), f"{what}: epoch {e + 1} loss {t}"
    for k, v in ref["dense"].items():
        torch.testing.assert_close(got["dense"][k], v, **TOL, msg=f"{what}: {k}")
    for t, v in ref["tables"].items():
        torch.testing.assert_close(got["tables"]["embedding"][t], v, **TOL, msg=f"{what}: {t}")
    for t, m in ref["metrics"].items():
        for k, v in m.items():
            assert got["metrics"][t][k] == pytest.approx(v, abs=1e-5), f"{what}: {t} {k}"
    for t, p in ref["preds"].items():
        torch.testing.assert_close(
            torch.as_tensor(got["preds"][t]), torch.as_tensor(p), **TOL, msg=f"{what}: {t}"
        )


@pytest.mark.slow
def test_two_processes_with_every_plan_equal_one_unsharded_process(tmp_path: Path) -> None:
    out = str(tmp_path / "results.pt")
    mp.start_processes(
        worker, args=(2, free_port(), out, CASES), nprocs=2, join=True, start_method="spawn"
    )
    got = torch.load(out, weights_only=False)
    refs = {s: reference(s) for s in {s for _, s, _ in CASES}}
    for plan, strat, opt in CASES:
        if opt != "sgd":
            continue
        res = got[f"{plan}/{strat}/{opt}"]
        kinds = {k: v[0] for k, v in res["plan"].items()}
        if plan == "table_wise":  # one small table on each process
            assert sorted(r for _, (_, (r,)) in res["plan"].items()) == [0, 1]
        else:
            assert set(kinds.values()) == {plan}
        assert_same(res, refs[strat], f"{plan}/{strat}")
    # the comparison can fail: training moved the weights, and the strategies differ
    init = reference("static")
    assert init["losses"][-1]["click"] < init["losses"][0]["click"]
    a, b = refs["static"]["dense"], refs["pcgrad"]["dense"]
    assert any(not torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # the default tables' optimiser (row-wise Adagrad, FBGEMM) has no torch twin: two
    # processes against one process of the torchrec backend, whose tables are whole
    one = sharded_run(
        tmp_path / "one", PLANS["row_wise"], "static", None, table_optimizer="rowwise_adagrad"
    )
    dist.destroy_process_group()  # the one-process group of that run
    two = got["row_wise/static/rowwise_adagrad"]
    one["tables"] = one["tables"]["embedding"]
    assert_same(two, one, "row-wise Adagrad")
    assert any(
        not torch.allclose(one["tables"][t], refs["static"]["tables"][t]) for t in one["tables"]
    )


def test_one_process_torchrec_equals_torch_backend(tmp_path: Path, private_group: Any) -> None:
    """The torchrec backend alone (its private one-process group, the tables whole) trains
    like the torch backend from the same weights."""
    got = sharded_run(tmp_path / "run", {}, "static", None)
    assert_same(got, reference("static"), "one process")


def test_refusals(tmp_path: Path, private_group: Any) -> None:
    pre, ds = data()
    from mtlrec.train.sharded import ShardedTrainer

    def make(**kw: Any) -> Any:
        torch.manual_seed(0)
        model = build_model(
            "mmoe", ds.schema, pre.table_sizes(), MODEL, embedding_backend="torchrec"
        )
        return ShardedTrainer(model, ds.schema, **kw)

    with pytest.raises(ConfigError, match="run folder"):
        make(config=training())
    with pytest.raises(ConfigError, match="fp16"):
        make(config=training(precision="fp16"), run_dir=tmp_path)
    with pytest.raises(ConfigError, match="include_embeddings"):
        from mtlrec.weighting.build import build_weighting

        make(
            config=training(),
            run_dir=tmp_path,
            strategy=build_weighting("mgda", ["click", "watch"], {"include_embeddings": True}),
        )
