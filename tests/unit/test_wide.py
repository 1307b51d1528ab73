"""The wide part (Wide & Deep, Cheng et al. 2016) that any model can add: its logit reaches only
the chosen tasks, crosses hash deterministically, every registered model trains with it, it
exports with parity, and a Wide & Deep run (FTRL on ``wide.*``) trains and resumes exactly."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from _serving_runs import FEATURES, TASKS
from _serving_runs import small_params as serving_small_params

from mtlrec.config import ExperimentConfig
from mtlrec.errors import ConfigError
from mtlrec.losses import MultiTaskLoss
from mtlrec.models import build_model
from mtlrec.nn.wide import HASH_PRIME, WideLinear, hash_cross
from mtlrec.registry import MODELS
from mtlrec.testing import tiny_dataset, tiny_funnel_dataset, tiny_table
from mtlrec.train.callbacks import Callback
from mtlrec.train.ftrl import FTRL
from mtlrec.train.run import load_run, train_run
from mtlrec.train.step import StepContext, train_step
from mtlrec.weighting import build_weighting

WIDE = {"wide_tasks": ["click"], "wide_features": ["user"], "wide_crosses": [["user", "item"]]}


def _mmoe(**wide: Any):
    pre, ds = tiny_dataset(n=64)
    torch.manual_seed(0)
    params = {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4], **wide}
    return ds, build_model("mmoe", pre.schema, pre.table_sizes(), params)


def test_the_wide_logit_is_added_to_the_chosen_tasks_only() -> None:
    ds, model = _mmoe(**WIDE, wide_buckets=101)
    f = ds.features_at(slice(0, 9))
    model.eval()
    with torch.no_grad():
        base = model(f)
        for p in model.wide.parameters():
            p.normal_()
        term = model.wide(f)[:, 0]  # [B]
        out = model(f)
    assert term.abs().min() > 0
    torch.testing.assert_close(out.logits["click"], base.logits["click"] + term)
    assert torch.equal(out.logits["watch"], base.logits["watch"])
    names = [n for n, _ in model.named_parameters() if n.startswith("wide.")]
    assert names == ["wide.bias", "wide.weights.tables.d1.weight"]
    # the table: user's rows, then the cross's 101 buckets; one weight column per wide task
    rows = model.layout.table_sizes["user"] + 101
    assert model.wide.weights.tables["d1"].weight.shape == (rows, 1)


def test_each_wide_task_has_its_own_weights() -> None:
    ds, model = _mmoe(wide_tasks=["click", "watch"], wide_features=["user", "item"])
    assert model.wide.bias.shape == (2,)
    f = ds.features_at(slice(0, 5))
    with torch.no_grad():
        model.wide.bias.copy_(torch.tensor([1.0, -2.0]))
        out = model(f)
        model.wide.bias.zero_()
        zero = model(f)
    torch.testing.assert_close(out.logits["click"] - zero.logits["click"], torch.ones(5))
    torch.testing.assert_close(out.logits["watch"] - zero.logits["watch"], -2 * torch.ones(5))


def test_wide_features_default_to_every_sparse_feature() -> None:
    ds, model = _mmoe(wide_tasks=["click"], wide_crosses=[["user", "item"]], wide_buckets=7)
    f = ds.features_at(slice(0, 6))
    ids = model.wide.field_ids(f)  # [B, user, item, cross]
    assert ids.shape == (6, 3)
    assert torch.equal(ids[:, :2], f.sparse.to(torch.int64))
    _, crosses_only = _mmoe(wide_tasks=["click"], wide_features=[], wide_crosses=[["user", "item"]])
    assert crosses_only.wide.field_ids(f).shape == (6, 1)


def _python_hash(ids: list[int], names: list[str], cross: str, buckets: int) -> int:
    """The documented hash, in Python integers."""
    h = 0
    for x, f in zip(ids, names, strict=True):
        a = 1 + zlib.crc32(f"{cross}:{f}".encode()) % (HASH_PRIME - 1)
        h = (h * 1_000_003 + x * a) % HASH_PRIME
    return h % buckets


def test_crosses_hash_deterministically_and_spread_over_the_buckets() -> None:
    ds, model = _mmoe(
        wide_tasks=["click"], wide_features=[], wide_crosses=[["user", "item"]], wide_buckets=97
    )
    f = ds.features_at(slice(0, 40))
    ids = model.wide.field_ids(f)[:, 0]
    user = f.sparse_column("user").tolist()
    item = f.sparse_column("item").tolist()
    want = [
        _python_hash([u, i], ["user", "item"], "user*item", 97)
        for u, i in zip(user, item, strict=True)
    ]
    assert ids.tolist() == want
    # equal combinations, equal buckets; another order is another cross
    a = torch.tensor([5, 5, 7, 123456789])
    b = torch.tensor([9, 9, 9, 2**31 - 1])
    h = hash_cross([a, b], [3, 11], 1000)
    assert h[0] == h[1] and h[0] != h[2]
    assert (
        h[3] == (((123456789 * 3) % HASH_PRIME) * 1_000_003 + (2**31 - 1) * 11) % HASH_PRIME % 1000
    )
    # 100 x 100 combinations over 4096 buckets: about as many distinct buckets as uniform
    # hashing fills (4096 * (1 - exp(-10000 / 4096)) = 3734) or more
    u, v = torch.meshgrid(torch.arange(100), torch.arange(100), indexing="ij")
    used = hash_cross([u.flatten(), v.flatten()], [17, 29], 4096).unique().numel()
    assert used >= 3650
    # and a degenerate hash (the ids' sum) would not
    assert (u + v).unique().numel() < 200


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"wide_tasks": ["click"], "wide_features": ["hist"]}, "'hist' is not a sparse feature"),
        ({"wide_tasks": ["click"], "wide_crosses": [["user"]]}, "two or more"),
        ({"wide_features": ["user"]}, "need wide_tasks"),
        ({"wide_tasks": ["nope"]}, "'nope' is not a binary or regression task"),
    ],
)
def test_bad_wide_options_are_config_errors(params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _mmoe(**params)


def test_wide_options_are_listed_for_every_model() -> None:
    for name in MODELS.names():
        assert {"wide_tasks", "wide_features", "wide_crosses", "wide_buckets"} <= set(
            MODELS.param_names(name)
        ), name


# -- every registered model trains with a wide part --------------------------------------------
def _tiny_for(name: str):
    """The tiny data set the model can be built on (two-task or funnel), else skip."""
    for make in (tiny_dataset, tiny_funnel_dataset):
        pre, ds = make(n=64)
        try:
            build_model(name, pre.schema, pre.table_sizes(), {})
        except ConfigError:
            continue
        return pre, ds
    pytest.skip(f"{name} cannot be built on the tiny schemas")


@pytest.mark.parametrize("name", MODELS.names())
def test_every_parameter_of_a_model_with_a_wide_part_gets_a_gradient(name: str) -> None:
    pre, ds = _tiny_for(name)
    first = pre.schema.tasks[0].name
    params = {**WIDE, "wide_tasks": [first]}  # the model's default widths: no dead towers
    torch.manual_seed(0)
    try:
        model = build_model(name, pre.schema, pre.table_sizes(), params)
    except ConfigError as e:  # ESMM: ctr/cvr feed pCTCVR, a term added after would bypass it
        assert "wide_tasks" in str(e)
        return
    tasks = [t for t in pre.schema.tasks if t.name in model.loss_task_names]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ctx = StepContext(
        model, MultiTaskLoss(tasks), build_weighting("static", [t.name for t in tasks]), opt
    )
    batch = ds.take(slice(0, len(ds)))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = [float(train_step(ctx, batch).objective) for _ in range(3)]
    assert all(np.isfinite(losses))
    assert any(n.startswith("wide.") for n, _ in model.named_parameters())
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {pname} no gradient"
        assert not torch.equal(p.detach(), before[pname]), f"{name}: {pname} not updated"


# -- runs: export parity, Wide & Deep with FTRL, resume ---------------------------------------
def _config(folder: Path, model: str, epochs: int = 2, **training: Any) -> ExperimentConfig:
    data = folder / "tiny.parquet"
    if not data.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(tiny_table(300), data)
    params = {**serving_small_params(model), **WIDE, "wide_buckets": 512}
    return ExperimentConfig.from_dict(
        {
            "data": {"train": str(data), "split": {"fractions": [0.7, 0.15, 0.15], "seed": 0}},
            "schema": {"features": FEATURES, "tasks": TASKS},
            "model": {"name": model, "params": params},
            "training": {
                "epochs": epochs,
                "batch_size": 64,
                "progress": False,
                "num_threads": 1,
                "optimizer": {
                    "name": "adagrad",
                    "lr": 0.05,
                    "groups": [{"params": ["wide.*"], "name": "ftrl", "lr": 0.1, "l1": 0.05}],
                },
                **training,
            },
            "output_dir": str(folder / f"run-{model}"),
        }
    )


class _Interrupt(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, trainer, state) -> None:
        if state.step == self.at_step:
            raise KeyboardInterrupt


def test_wide_and_deep_with_ftrl_trains_and_resumes_identically(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "mmoe", epochs=3, checkpoint_every_steps=1)
    whole = train_run(cfg, output_dir=tmp_path / "whole")
    assert whole.test_metrics is not None and whole.test_metrics["click"]["auc"] > 0.5
    with pytest.raises(KeyboardInterrupt):  # killed mid-way through the second epoch
        train_run(cfg, output_dir=tmp_path / "cut", callbacks=[_Interrupt(5)])
    resumed = train_run(cfg, output_dir=tmp_path / "cut")
    a, b = load_run(tmp_path / "whole"), load_run(tmp_path / "cut")
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert resumed.test_metrics == whole.test_metrics
    # FTRL with L1 left exact zeros in the wide table; the deep side is Adagrad
    table = a.model.wide.weights.tables["d1"].weight
    assert 0 < int((table == 0).sum()) < table.numel()
    trainer = a.trainer()
    groups = {g["name"]: type(m) for m in trainer.optimizer.members for g in m.param_groups}
    assert groups["group:0"] is FTRL and groups["dense"] is torch.optim.Adagrad


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=pytest.mark.slow)])
def test_a_model_with_a_wide_part_exports_with_parity(tmp_path: Path, fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    from mtlrec.export import ExportedModel, export_run

    run = train_run(_config(tmp_path, "mmoe", epochs=1)).path
    res = export_run(run, tmp_path / fmt, format=fmt)
    assert res.max_abs_diff <= 1e-5
    loaded = load_run(run)
    assert loaded.model.wide.weights.tables["d1"].weight.abs().sum() > 0  # a trained wide part
    rows = tiny_table(80, seed=3).drop(["click", "watch"])
    want = loaded.trainer().predict(loaded.preprocessor.encode(rows, targets=False))
    got = ExportedModel.load(tmp_path / fmt).score_raw(rows)
    for task in ("click", "watch"):
        np.testing.assert_allclose(got[task], want[task], atol=1e-5, rtol=0)
    # the wide part matters: without it the click scores differ
    with torch.no_grad():
        loaded.model.wide.weights.tables["d1"].weight.zero_()
        loaded.model.wide.bias.zero_()
    plain = loaded.trainer().predict(loaded.preprocessor.encode(rows, targets=False))
    assert np.abs(plain["click"] - got["click"]).max() > 1e-4
    np.testing.assert_allclose(plain["watch"], got["watch"], atol=1e-5, rtol=0)


def test_wide_linear_checks_its_inputs_without_a_model() -> None:
    pre, _ = tiny_dataset(n=20)
    from mtlrec.nn.embedding import FeatureLayout

    lay = FeatureLayout.from_schema(pre.schema, pre.table_sizes())
    with pytest.raises(ValueError, match="no feature and no cross"):
        WideLinear(lay, ["click"], [], [], 8)
