"""Warm start (training.init_from): exact predictions at step 0 on known ids, new rows for new
ids, an added task, architecture errors, carried optimiser and strategy state, lineage."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtlrec.config import ExperimentConfig, TrainingConfig
from mtlrec.data.loading import load_datasets
from mtlrec.errors import CheckpointError, ConfigError
from mtlrec.models import build_model
from mtlrec.testing import tiny_dataset, tiny_table
from mtlrec.train.checkpoint import optimizer_param_names
from mtlrec.train.optimizers import build_optimizer, materialize_state
from mtlrec.train.remap import parameter_owners, plan_remap, remap_optimizer_state
from mtlrec.train.run import load_run, train_run
from mtlrec.train.trainer import Trainer
from mtlrec.train.warm_start import WarmStart, initialise
from mtlrec.weighting.build import build_weighting

pytestmark = pytest.mark.filterwarnings("ignore::mtlrec.errors.DataWarning")

FEATURES: list[dict[str, Any]] = [
    {"type": "sparse", "name": "user", "embedding_dim": 4},
    {"type": "sparse", "name": "item", "embedding_dim": 4, "table": "item"},
    {"type": "dense", "name": "price", "transform": "log1p_standardize"},
    {"type": "sequence", "name": "hist", "embedding_dim": 4, "table": "item", "max_len": 5},
]
CLICK = {"name": "click", "kind": "binary"}
WATCH = {"name": "watch", "kind": "regression", "mask": "click"}
LIKE = {"name": "like", "kind": "binary"}
PARAMS = {
    "mmoe": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
    "cgc": {"experts_per_task": 1, "shared_experts": 1, "expert_hidden": [8], "tower_hidden": [4]},
    "ple": {"experts_per_task": 1, "shared_experts": 1, "expert_hidden": [8], "num_levels": 2},
}


def _day(seed: int, n: int = 300, new: str = "") -> pa.Table:
    """Tiny rows (and a ``like`` label); with ``new``, a third of the items (and a fifth of
    the users) are new values."""
    t = tiny_table(n, seed=seed)
    rng = np.random.default_rng(seed)
    t = t.append_column("like", pa.array((rng.random(n) < 0.3).astype(np.int64)))
    if new:
        items = t.column("item").to_pylist()
        users = t.column("user").to_pylist()
        t = t.set_column(
            1, "item", pa.array([f"{new}{v}" if i % 3 == 0 else v for i, v in enumerate(items)])
        )
        t = t.set_column(
            0, "user", pa.array([f"{new}{v}" if i % 5 == 0 else v for i, v in enumerate(users)])
        )
    return t


def _cfg(
    d: Path,
    train: str,
    out: str,
    *,
    model: str = "mmoe",
    tasks: tuple[dict[str, Any], ...] = (CLICK, WATCH),
    epochs: int = 1,
    features: list[dict[str, Any]] | None = None,
    params: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    balancing: str = "static",
    **training: Any,
) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "data": {"train": train, "split": {"fractions": [0.8, 0.2, 0.0]}, **(data or {})},
            "schema": {"features": features or FEATURES, "tasks": list(tasks)},
            "model": {"name": model, "params": params or PARAMS[model]},
            "balancing": {"name": balancing},
            "training": {
                "epochs": epochs,
                "batch_size": 64,
                "optimizer": {"lr": 0.01},
                "progress": False,
                "num_threads": 1,
                **training,
            },
            "output_dir": str(d / out),
        },
        base_dir=str(d),
    )


@pytest.fixture(scope="module")
def days(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("days")
    pq.write_table(_day(1), d / "day1.parquet")
    pq.write_table(_day(2, new="n"), d / "day2.parquet")
    pq.write_table(_day(3, new="m"), d / "day3.parquet")
    return d


@pytest.fixture(scope="module")
def parent(days: Path) -> Path:
    return train_run(_cfg(days, "day1.parquet", "p"), overwrite=True).path


def _start(cfg: ExperimentConfig) -> tuple[Any, Any, Any, WarmStart, dict[str, Any]]:
    """What train_run does before training: grown encoders, a fresh model, the warm start."""
    warm = WarmStart(cfg, load_run(Path(cfg.training.init_from or "")))
    data = load_datasets(cfg, adapt=warm.grow)
    pre = data.preprocessor
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.model.name, pre.schema, pre.table_sizes(), cfg.model.params)
    fresh = copy.deepcopy(model)
    strategy = build_weighting(cfg.balancing.name, model.loss_task_names, cfg.balancing.params())
    init = initialise(cfg, model, strategy, pre, warm)
    return pre, model, fresh, warm, init


def test_zero_steps_predict_exactly_what_the_earlier_run_predicts(days: Path, parent: Path) -> None:
    cfg = _cfg(days, "day2.parquet", "c", init_from=str(parent))
    pre, model, fresh, _, init = _start(cfg)
    old = load_run(parent)
    raw = _day(2, new="n")
    a, b = old.preprocessor.encode(raw), pre.encode(raw)
    pa_, pb = old.trainer().predict(a), Trainer(model, pre.schema).predict(b)
    # rows whose every id the earlier run knew encode to the same ids
    known = (a.sparse == b.sparse).all(1) & (a.sequences["hist"] == b.sequences["hist"]).all(1)
    known = known.numpy()
    assert 0 < known.sum() < len(known)
    for task in ("click", "watch"):
        assert np.abs(pa_[task][known] - pb[task][known]).max() == 0.0
    # new ids get new rows, initialised as the table's init says (the fresh model's rows)
    for j, table in enumerate(("user", "item")):
        n_old = old.preprocessor.tables[table].size
        ids = b.sparse[:, j][~torch.from_numpy(known)]
        new_ids = ids[ids >= n_old]
        assert len(new_ids) > 0
        w, w0 = model.embedding.table_weight(table), fresh.embedding.table_weight(table)
        assert torch.equal(w[new_ids], w0[new_ids])
        assert torch.equal(w[:n_old], old.model.embedding.table_weight(table))
    grown = init["warm_start"]["vocabularies"]
    assert grown["item"]["added"] > 0 and grown["user"]["added"] > 0


def test_adding_a_task_keeps_the_shared_parameters_and_trains_the_new_one(days: Path) -> None:
    p = train_run(_cfg(days, "day1.parquet", "two_tasks"), overwrite=True).path
    cfg = _cfg(
        days, "day2.parquet", "three", init_from=str(p), epochs=2, tasks=(CLICK, WATCH, LIKE)
    )
    _, model, fresh, _, init = _start(cfg)
    old = load_run(p).model
    owners = parameter_owners(model)
    old_params = dict(old.named_parameters())
    for name, w in model.named_parameters():
        if owners[name] == "like":  # the new task's tower and gate: fresh
            assert torch.equal(w, dict(fresh.named_parameters())[name]), name
        elif "tables." in name:  # every table's earlier rows, at the table's new offset
            for t in ("user", "item"):
                was = old.embedding.table_weight(t)
                assert torch.equal(model.embedding.table_weight(t)[: len(was)], was), t
        else:  # everything shared, and the kept tasks' own: the earlier run's
            assert torch.equal(w, old_params[name]), name
    assert init["warm_start"]["added_tasks"] == ["like"]
    assert any("like" in n for n in init["warm_start"]["fresh_parameters"])
    res = train_run(cfg, overwrite=True)
    trained = dict(load_run(res.path).model.named_parameters())
    tower = "heads.towers.like.layers.0.weight"
    assert not torch.equal(trained[tower], dict(fresh.named_parameters())[tower])
    losses = [h["train_loss"]["like"] for h in res.fit.history]
    assert losses[1] < losses[0]
    assert np.isfinite(res.valid_metrics["like"]["auc"])


def test_cgc_adds_a_task_ple_with_shared_gates_cannot(days: Path) -> None:
    for model in ("cgc", "ple"):
        p = train_run(_cfg(days, "day1.parquet", f"{model}1", model=model), overwrite=True).path
        cfg = _cfg(
            days,
            "day2.parquet",
            f"{model}2",
            model=model,
            init_from=str(p),
            tasks=(CLICK, WATCH, LIKE),
        )
        if model == "ple":
            with pytest.raises(CheckpointError, match=r"shared_gate.*cannot add or remove a task"):
                _start(cfg)
            continue
        _, new, _, _, _ = _start(cfg)
        old = load_run(p).model
        own_old, own_new = parameter_owners(old), parameter_owners(new)
        shared_old = [w for n, w in old.named_parameters() if not own_old[n] and "tables" not in n]
        shared_new = [w for n, w in new.named_parameters() if not own_new[n] and "tables" not in n]
        assert len(shared_old) == len(shared_new) > 0
        assert all(torch.equal(a, b) for a, b in zip(shared_old, shared_new, strict=True))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"params": {"num_experts": 3, "expert_hidden": [8], "tower_hidden": [4]}}, "num_experts"),
        ({"model": "ple"}, "model 'mmoe'.*'ple'"),
        (
            {"features": [{**FEATURES[0], "embedding_dim": 8}, *FEATURES[1:]]},
            "feature 'user': embedding_dim 4 in the earlier run, 8 here",
        ),
        ({"data": {"null_values": ["?"]}}, "null_values"),
        ({"init_optimizer": "carry", "optimizer": {"name": "sgd"}}, "carry needs"),
    ],
)
def test_what_differs_is_named(days: Path, parent: Path, change: dict, match: str) -> None:
    cfg = _cfg(days, "day2.parquet", "bad", init_from=str(parent), **change)
    with pytest.raises(ConfigError, match=match):
        WarmStart(cfg, load_run(parent))


def test_changing_min_count_and_the_source_column_is_allowed(days: Path, parent: Path) -> None:
    feats = [{**FEATURES[0], "min_count": 2}, *FEATURES[1:]]
    WarmStart(
        _cfg(days, "day2.parquet", "ok", init_from=str(parent), features=feats), load_run(parent)
    )


def test_optimizer_state_is_carried_and_reindexed() -> None:
    pre, ds = tiny_dataset(120)
    cfg = TrainingConfig(epochs=1, batch_size=32, progress=False)
    old = build_model("mmoe", ds.schema, pre.table_sizes(), PARAMS["mmoe"])
    trainer = Trainer(old, ds.schema, config=cfg)
    trainer.fit(ds)
    # the first table ("user") grows: the next table's rows move in the fused weight
    sizes = {"user": pre.table_sizes()["user"] + 3, "item": pre.table_sizes()["item"] + 5}
    new = build_model("mmoe", ds.schema, sizes, PARAMS["mmoe"])
    plan = plan_remap(old, new)
    plan.apply_weights(new, old.state_dict())
    opt = build_optimizer(new, None, cfg.optimizer)
    materialize_state(opt)
    names = optimizer_param_names(trainer.optimizer, old, trainer.strategy)
    n = remap_optimizer_state(plan, trainer.optimizer.state_dict(), names, opt, new)
    assert n == len(list(new.parameters()))
    old_p, new_p = dict(old.named_parameters()), dict(new.named_parameters())
    for name, p in new_p.items():
        s_new, s_old = opt.state[p], trainer.optimizer.state[old_p[name]]
        assert float(s_new["step"]) == float(s_old["step"]) > 0
        for key in ("exp_avg", "exp_avg_sq"):
            if "tables." not in name:
                assert torch.equal(s_new[key], s_old[key]), (name, key)
                continue
            emb_old, emb_new = old.embedding, new.embedding
            for t in ("user", "item"):
                o, m = emb_old.table_offset[t], emb_new.table_offset[t]
                k_old, k_new = pre.table_sizes()[t], sizes[t]
                assert torch.equal(s_new[key][m : m + k_old], s_old[key][o : o + k_old])
                assert not s_new[key][m + k_old : m + k_new].any()  # new rows: zero moments
            assert emb_new.table_offset["item"] != emb_old.table_offset["item"]


def test_warm_start_with_carried_state_trains(days: Path, parent: Path) -> None:
    cfg = _cfg(days, "day2.parquet", "carry", init_from=str(parent), init_optimizer="carry")
    res = train_run(cfg, overwrite=True)
    assert res.init["warm_start"]["optimizer_state"] == "carry"
    assert np.isfinite(res.valid_metrics["click"]["auc"])


def test_strategy_state_is_carried(days: Path) -> None:
    p = train_run(_cfg(days, "day1.parquet", "unc", balancing="uncertainty"), overwrite=True).path
    cfg = _cfg(days, "day2.parquet", "unc2", balancing="uncertainty", init_from=str(p))
    warm = WarmStart(cfg, load_run(p))
    data = load_datasets(cfg, adapt=warm.grow)
    pre = data.preprocessor
    model = build_model("mmoe", pre.schema, pre.table_sizes(), PARAMS["mmoe"])
    strategy = build_weighting("uncertainty", model.loss_task_names, {})
    before = {k: v.clone() for k, v in strategy.state_dict().items()}
    assert warm.init_model(model, strategy, pre)["strategy_state"] == "carried"
    after = strategy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)
    for k, v in warm.strategy_state.items():
        assert torch.equal(after[k], v)


def test_lineage_records_parent_data_and_ancestors(days: Path, parent: Path) -> None:
    c2 = train_run(
        _cfg(
            days, "day2.parquet", "l2", init_from=str(parent), data={"vocab_counts": "cumulative"}
        ),
        overwrite=True,
    ).path
    c3 = train_run(  # the Python keyword, as training.init_from
        _cfg(days, "day3.parquet", "l3", data={"vocab_counts": "cumulative"}),
        overwrite=True,
        init_from=c2,
    ).path
    lin = json.loads((c3 / "lineage.json").read_text())
    assert lin["parent"]["run"] == str(c2.resolve())
    assert lin["parent"]["checkpoint"] == "best"
    fp = json.loads((c2 / "schema.json").read_text())
    from mtlrec.schema import Schema

    assert lin["parent"]["schema_fingerprint"] == Schema.model_validate(fp).fingerprint()
    train = next(e for e in lin["data"] if e["role"] == "train")
    st = (days / "day3.parquet").stat()
    assert train["path"] == str((days / "day3.parquet").resolve())
    assert (train["bytes"], train["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    assert [a["run"] for a in lin["ancestors"]] == [str(parent.resolve())]
    root = json.loads((parent / "lineage.json").read_text())
    assert root["parent"] is None and root["data"][0]["role"] == "train"
    # the counts handed on are cumulative over the three days
    from mtlrec.data.vocab_growth import read_counts

    counts = [read_counts(r / "vocab_counts.parquet")["user"] for r in (parent, c2, c3)]
    totals = [sum(c.column("c").to_pylist()) for c in counts]
    assert totals[0] < totals[1] < totals[2]


def test_a_resumed_warm_start_is_not_initialised_again(days: Path, parent: Path) -> None:
    cfg = _cfg(days, "day2.parquet", "resumed", init_from=str(parent))
    first = train_run(cfg, overwrite=True)
    assert first.init
    lineage = (first.path / "lineage.json").read_text()
    more = cfg.model_copy(update={"training": cfg.training.model_copy(update={"epochs": 2})})
    again = train_run(more)
    assert again.init == {} and again.fit.epochs_run == 2
    assert (first.path / "lineage.json").read_text() == lineage


def test_export_and_serve_take_a_warm_started_run(days: Path, parent: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from mtlrec.export import export_run
    from mtlrec.serve import Scorer, create_app

    run = train_run(_cfg(days, "day2.parquet", "served", init_from=str(parent)), overwrite=True)
    res = export_run(run.path, tmp_path / "export", format="torchscript", parity_rows=64)
    assert res.max_abs_diff <= 1e-5
    rows = _day(2, 20, new="n").drop(["click", "watch", "like"]).to_pylist()
    for r in rows:
        r["hist"] = [x for x in r["hist"].split("|") if x]
    client = TestClient(create_app(Scorer.load(run.path)))
    got = client.post("/score", json={"candidates": rows})
    assert got.status_code == 200, got.text
    loaded = load_run(run.path)
    table = _day(2, 20, new="n").drop(["click", "watch", "like"])
    want = loaded.trainer().predict(loaded.preprocessor.encode(table, targets=False))
    results = got.json()["results"]
    assert [r["index"] for r in results] == list(range(20))
    clicks = [r["predictions"]["click"] for r in results]
    assert np.allclose(clicks, want["click"], atol=1e-6)


def test_pretrained_vectors_reach_only_the_rows_the_earlier_run_lacked(
    days: Path, parent: Path
) -> None:
    new_items = ["ni1", "ni2", "ni4"]
    known = load_run(parent).preprocessor.tables["item"].vocab.to_pylist()[:2]
    vecs = pa.FixedSizeListArray.from_arrays(pa.array(np.full(20, 7.0, np.float32)), 4)
    pq.write_table(pa.table({"id": [*new_items, *known], "vector": vecs}), days / "vec.parquet")
    cfg = _cfg(
        days,
        "day2.parquet",
        "pre",
        init_from=str(parent),
        pretrained={"item": {"path": "vec.parquet"}},
    )
    pre, model, _, _, init = _start(cfg)
    rep = init["pretrained"]["item"]
    assert rep["written"] == 5 and rep["not_in_vocabulary"] == 0
    ids, _ = pre.tables["item"].lookup(pa.array(new_items))
    w = model.embedding.table_weight("item")
    assert (w[torch.from_numpy(ids.astype(np.int64))] == 7.0).all()
    old_w = load_run(parent).model.embedding.table_weight("item")
    assert torch.equal(w[: len(old_w)], old_w)  # the earlier run's rows win


def test_removing_a_task_keeps_the_others(days: Path) -> None:
    three = (CLICK, WATCH, LIKE)
    p = train_run(_cfg(days, "day1.parquet", "three1", tasks=three), overwrite=True).path
    cfg = _cfg(days, "day2.parquet", "two2", init_from=str(p), tasks=(CLICK, LIKE))
    _, model, _, _, init = _start(cfg)
    assert init["warm_start"]["removed_tasks"] == ["watch"]
    old = dict(load_run(p).model.named_parameters())
    for name, w in model.named_parameters():
        if "tables." not in name:
            assert torch.equal(w, old[name]), name
