"""Devices and precision (``training.device``, ``training.precision``) on the CPU: ``auto``
picks the CPU here, ``cuda`` without a GPU is one clear error, bf16 autocast trains with losses
that track fp32's (within 0.01 per epoch), fp16 trains through a gradient scaler whose state is
checkpointed, and bf16 scoring of a run is allowed only when its task AUCs stay within 0.001."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _serving_runs import make_run

from mtlrec.config import TrainingConfig
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.testing import tiny_dataset
from mtlrec.train.placement import float_output, move_batch, resolve_device
from mtlrec.train.trainer import Trainer

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
LOSS_TOLERANCE = 0.01  # bf16 vs fp32, per task and epoch (mean training loss)


def _fit(precision: str, **kw: Any) -> tuple[Trainer, Any, Any]:
    pre, ds = tiny_dataset(n=600, seed=1)
    torch.manual_seed(0)
    model = build_model(
        "mmoe", ds.schema, pre.table_sizes(), {"num_experts": 3, "expert_hidden": [16]}
    )
    cfg = TrainingConfig(
        epochs=4, batch_size=64, progress=False, precision=precision, optimizer={"lr": 0.01}
    )
    trainer = Trainer(model, ds.schema, config=cfg, **kw)
    return trainer, trainer.fit(ds, ds), ds


@no_gpu
def test_auto_picks_the_cpu_here() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@no_gpu
def test_cuda_without_a_gpu_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="torch sees no GPU"):
        resolve_device("cuda")
    pre, ds = tiny_dataset(n=20)
    model = build_model("mmoe", ds.schema, pre.table_sizes(), {"num_experts": 2})
    with pytest.raises(ConfigError, match=r"training\.device: cuda"):
        Trainer(model, ds.schema, config=TrainingConfig(device="cuda", progress=False))


def test_unknown_device_or_precision_is_refused_by_the_config() -> None:
    from mtlrec.config import ExperimentConfig

    base = {"data": {"dataset": "census-income"}, "model": {"name": "mmoe"}}
    for key, value in (("device", "tpu"), ("precision", "fp8")):
        with pytest.raises(ConfigError, match=f"training.{key}"):
            ExperimentConfig.from_dict({**base, "training": {key: value}})


def test_bf16_training_tracks_fp32() -> None:
    _, ref, _ = _fit("fp32")
    trainer, got, ds = _fit("bf16")
    assert trainer.scaler is None
    diffs = [
        abs(a["train_loss"][t] - b["train_loss"][t])
        for a, b in zip(ref.history, got.history, strict=True)
        for t in a["train_loss"]
    ]
    assert max(diffs) <= LOSS_TOLERANCE, diffs
    assert max(diffs) > 0  # autocast did run the forward in bf16
    assert got.history[-1]["train_loss"]["click"] < got.history[0]["train_loss"]["click"]
    assert got.best_value == pytest.approx(ref.best_value, abs=0.02)
    preds = trainer.predict(ds)
    assert all(v.dtype == np.float32 for v in preds.values())


def test_fp16_trains_through_a_gradient_scaler(tmp_path: Path) -> None:
    trainer, got, _ = _fit("fp16", run_dir=tmp_path)
    assert trainer.scaler is not None
    assert got.history[-1]["train_loss"]["click"] < got.history[0]["train_loss"]["click"]
    from mtlrec.train.checkpoint import load_checkpoint

    meta = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors").meta
    assert meta["grad_scaler"]["scale"] == trainer.scaler.get_scale()


def test_fp16_refuses_gradient_based_balancing() -> None:
    from mtlrec.weighting.build import build_weighting

    with pytest.raises(ConfigError, match="fp16"):
        _fit("fp16", strategy=build_weighting("pcgrad", ["click", "watch"], {}))


def test_moves_and_conversions() -> None:
    from mtlrec.models.base import ModelOutput

    _, ds = tiny_dataset(n=8)
    batch = ds.take(slice(0, 8))
    assert move_batch(batch, torch.device("cpu")) is batch  # already there: no copy
    shared = torch.ones(2, 3, dtype=torch.bfloat16)
    out = ModelOutput(
        {"a": torch.zeros(2, dtype=torch.bfloat16)}, tower_inputs={"a": shared, "b": shared}
    )
    conv = float_output(out)
    assert conv.logits["a"].dtype == torch.float32
    assert conv.tower_inputs["a"] is conv.tower_inputs["b"]  # one representation stays one


def test_bf16_scoring_of_a_run_is_checked(tmp_path: Path, monkeypatch: Any) -> None:
    """The check measures both AUCs on the run's validation split, saves them in the run
    folder and refuses above the tolerance. (This barely trained run's scores are nearly tied,
    and bf16 rounding reorders them: its AUC moves by ~0.02, so the real tolerance refuses.)"""
    from mtlrec.serve.scorer import Scorer
    from mtlrec.train import precision_check
    from mtlrec.train.run import load_run

    run = make_run(tmp_path)
    with pytest.raises(ConfigError, match="task 'click'"):
        precision_check.require_precision(load_run(run), "bf16")
    saved = json.loads((run / precision_check.CHECK_FILE).read_text())
    assert not saved["ok"] and saved["deltas"]["click"] > precision_check.AUC_TOLERANCE
    with pytest.raises(ConfigError, match="AUC moves"):  # the saved check is reused
        Scorer.load(run, precision="bf16")
    # within the tolerance: allowed, and the service scores under autocast
    monkeypatch.setattr(precision_check, "AUC_TOLERANCE", 1.0)
    check = precision_check.require_precision(load_run(run), "bf16")
    assert check is not None and check.ok
    assert Scorer.load(run, precision="bf16").backend == "torch"
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="export runs in fp32"):
        Scorer.load(export, precision="bf16")
