"""Tests of mtlrec.train.checkpoint: round trips, atomic writes, corrupt files, no pickle."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.optim import Adam, AdamW

import mtlrec.train.checkpoint as ckpt_mod
from mtlrec.errors import CheckpointError
from mtlrec.train.checkpoint import (
    CHECKPOINT_VERSION,
    load_checkpoint,
    restore_model,
    save_checkpoint,
)
from mtlrec.weighting.build import build_weighting


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))


def _steps(model: nn.Module, opt: Adam, k: int) -> list[float]:
    """k training steps on data drawn from torch's global RNG (dropout uses it too)."""
    model.train()
    losses = []
    for _ in range(k):
        x, y = torch.randn(16, 6), torch.randn(16, 2)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_round_trip_of_model_strategy_optimizer_and_rng(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    model = _model(0)
    opt = Adam(model.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-7)
    strategy = build_weighting("static", ["a", "b"], {"weights": {"a": 2.0, "b": 0.5}})
    torch.manual_seed(1)
    _steps(model, opt, 3)
    save_checkpoint(path, model=model, strategy=strategy, optimizer=opt, meta={"k": [1, "x"]})
    rng_at_save = torch.get_rng_state()

    ck = load_checkpoint(path)
    assert set(ck.model) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model[k], v)
    assert set(ck.strategy) == {"fixed"}
    fresh = build_weighting("static", ["a", "b"])
    assert fresh.weights(torch.zeros(2)).tolist() == [1.0, 1.0]
    fresh.load_state_dict(ck.strategy)
    assert fresh.weights(torch.zeros(2)).tolist() == [2.0, 0.5]
    assert ck.rng is not None and torch.equal(ck.rng, rng_at_save)
    assert ck.meta["k"] == [1, "x"]
    assert ck.meta["version"] == CHECKPOINT_VERSION
    assert ck.optimizer is not None
    saved = opt.state_dict()
    assert ck.optimizer["param_groups"][0]["lr"] == 0.01
    assert tuple(ck.optimizer["param_groups"][0]["betas"]) == (0.8, 0.99)
    assert ck.optimizer["param_groups"][0]["params"] == saved["param_groups"][0]["params"]
    assert set(ck.optimizer["state"]) == set(saved["state"])
    for i, st in saved["state"].items():
        for name, v in st.items():
            assert torch.equal(ck.optimizer["state"][i][name], v), (i, name)


def test_resumed_optimizer_continues_bit_exactly(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    # run A: 3 steps, checkpoint, 4 more steps
    model_a = _model(0)
    opt_a = AdamW(model_a.parameters(), lr=0.01, weight_decay=0.01)
    torch.manual_seed(7)
    _steps(model_a, opt_a, 3)
    save_checkpoint(path, model=model_a, optimizer=opt_a)
    losses_a = _steps(model_a, opt_a, 4)

    # run B: other initial weights, a fresh optimiser and a scrambled RNG, then restore
    model_b = _model(123)
    opt_b = AdamW(model_b.parameters(), lr=0.5, weight_decay=0.01)
    torch.manual_seed(999)
    ck = load_checkpoint(path)
    restore_model(model_b, ck.model, source=str(path))
    assert ck.optimizer is not None and ck.rng is not None
    opt_b.load_state_dict(ck.optimizer)
    torch.set_rng_state(ck.rng)
    losses_b = _steps(model_b, opt_b, 4)

    assert losses_a == losses_b
    for pa, pb in zip(_params(model_a), _params(model_b), strict=True):
        assert torch.equal(pa, pb)


def test_without_the_optimizer_state_the_run_differs(tmp_path: Path) -> None:
    """Sanity check of the test above: Adam's moments do matter."""
    path = tmp_path / "c.safetensors"
    model_a = _model(0)
    opt_a = Adam(model_a.parameters(), lr=0.01)
    torch.manual_seed(7)
    _steps(model_a, opt_a, 3)
    save_checkpoint(path, model=model_a, optimizer=opt_a)
    _steps(model_a, opt_a, 2)
    model_b = _model(0)
    ck = load_checkpoint(path)
    restore_model(model_b, ck.model, source="x")
    torch.set_rng_state(ck.rng)
    _steps(model_b, Adam(model_b.parameters(), lr=0.01), 2)
    assert not all(
        torch.equal(a, b) for a, b in zip(_params(model_a), _params(model_b), strict=True)
    )


def test_checkpoint_without_optimizer_or_rng(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model=_model(0), save_rng=False)
    ck = load_checkpoint(path)
    assert ck.optimizer is None
    assert ck.rng is None
    assert ck.strategy == {}


# -- atomic writes -------------------------------------------------------------------------------
def test_failed_save_leaves_the_previous_checkpoint_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.safetensors"
    old_model = _model(0)
    save_checkpoint(path, model=old_model)
    before = path.read_bytes()
    real_save = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=_model(1))
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["last.safetensors"]
    assert path.read_bytes() == before
    ck = load_checkpoint(path)
    for k, v in old_model.state_dict().items():
        assert torch.equal(ck.model[k], v)


def test_keyboard_interrupt_during_save_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "new.safetensors", model=_model(0))
    assert os.listdir(tmp_path) == []


def test_save_creates_missing_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c.safetensors"
    save_checkpoint(path, model=_model(0))
    assert load_checkpoint(path).model


# -- corrupt and foreign files -------------------------------------------------------------------
def _assert_clean_error(path: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg
    for n in needles:
        assert n in msg, msg
    assert "\n" not in msg
    assert "Traceback" not in msg
    # raised "from None": no chained safetensors / OS exception shown to users
    assert e.value.__cause__ is None
    assert e.value.__context__ is None or e.value.__suppress_context__
    return msg


def test_missing_file(tmp_path: Path) -> None:
    _assert_clean_error(tmp_path / "nope.safetensors", "not found")


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model=_model(0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_clean_error(path, "corrupt or truncated")


@pytest.mark.parametrize("size", [0, 5, 8, 100, 4096])
def test_random_bytes(tmp_path: Path, size: int) -> None:
    path = tmp_path / "c.safetensors"
    g = torch.Generator().manual_seed(size)
    path.write_bytes(bytes(torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8).tolist()))
    _assert_clean_error(path)


def test_header_claiming_a_small_json_that_is_garbage(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\x00" * 16)
    _assert_clean_error(path)


def test_safetensors_file_without_mtlrec_metadata(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(path))
    _assert_clean_error(path, "not an mtlrec checkpoint")
    other = tmp_path / "other_meta.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(other), metadata={"format": "pt"})
    _assert_clean_error(other, "not an mtlrec checkpoint")


@pytest.mark.parametrize("version", ["2", "0", 2, None])
def test_wrong_version(tmp_path: Path, version: object) -> None:
    path = tmp_path / "c.safetensors"
    meta = {} if version is None else {"version": version}
    safetensors.torch.save_file(
        {"model.w": torch.zeros(3)}, str(path), metadata={"mtlrec": json.dumps(meta)}
    )
    msg = _assert_clean_error(path, "format version", f"version {CHECKPOINT_VERSION}")
    assert repr(version) in msg


def test_corrupt_metadata_json(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    safetensors.torch.save_file({"model.w": torch.zeros(3)}, str(path), metadata={"mtlrec": "{"})
    _assert_clean_error(path, "metadata")


def test_a_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "dir.safetensors")


# -- how to recover from an unreadable checkpoint ------------------------------------------------
def _run_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A run folder with config.yaml and both checkpoints (best after epoch 2, last after 3)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("version: 1\n")
    best, last = run / "checkpoints" / "best.safetensors", run / "checkpoints" / "last.safetensors"
    save_checkpoint(best, model=_model(0), meta={"trainer": {"epoch": 2}})
    save_checkpoint(last, model=_model(0), meta={"trainer": {"epoch": 3}})
    return run, best, last


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_best_points_to_last_and_to_retraining(tmp_path: Path) -> None:
    run, best, last = _run_folder(tmp_path)
    _truncate(best)
    msg = _assert_clean_error(best, "corrupt or truncated")
    assert f"{last} loads" in msg and "epoch 3" in msg and f"copy it over {best}" in msg
    assert f"mtlrec train {run / 'config.yaml'} --output {run} --overwrite" in msg
    assert "\n" not in msg


def test_truncated_last_points_to_best_to_resume_from(tmp_path: Path) -> None:
    _run, best, last = _run_folder(tmp_path)
    _truncate(last)
    msg = _assert_clean_error(last, "corrupt or truncated")
    assert f"{best} loads" in msg and "epoch 2" in msg and "resume" in msg
    assert "--overwrite" in msg


def test_both_checkpoints_unreadable_leaves_retraining(tmp_path: Path) -> None:
    _run, best, last = _run_folder(tmp_path)
    _truncate(best)
    last.write_bytes(b"\x00" * 64)
    msg = _assert_clean_error(best, "corrupt or truncated")
    assert "does not load either" in msg and "--overwrite" in msg


def test_corrupt_checkpoint_outside_a_run_folder_says_to_retrain(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model=_model(0))
    _truncate(path)
    _assert_clean_error(path, "corrupt or truncated", "to recover, retrain")


# -- restore_model -------------------------------------------------------------------------------
def test_restore_model_refuses_another_shape_naming_the_weight() -> None:
    small = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    big = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 1))
    before = [p.detach().clone() for p in small.parameters()]
    with pytest.raises(CheckpointError) as e:
        restore_model(small, big.state_dict(), source="run/best.safetensors")
    msg = str(e.value)
    assert "run/best.safetensors" in msg
    assert "0.weight" in msg
    assert "(5, 4)" in msg and "(3, 4)" in msg
    # nothing was loaded
    for p, b in zip(small.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_restore_model_refuses_missing_and_unexpected_weights() -> None:
    a = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    state = dict(a.state_dict())
    del state["1.bias"]
    with pytest.raises(CheckpointError, match=r"missing \['1.bias'\]"):
        restore_model(a, state, source="x")
    state = {**a.state_dict(), "2.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected \['2.weight'\]"):
        restore_model(a, state, source="x")


def test_restore_model_loads_matching_weights() -> None:
    a, b = _model(0), _model(1)
    restore_model(b, a.state_dict(), source="x")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


# -- no pickle -----------------------------------------------------------------------------------
def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.safetensors"
    model = _model(0)
    opt = Adam(model.parameters(), lr=0.01)
    _steps(model, opt, 2)
    save_checkpoint(
        path, model=model, optimizer=opt, strategy=build_weighting("static", ["a"]), meta={"m": 1}
    )

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling is not allowed while loading a checkpoint")

    class ForbiddenUnpickler:
        def __init__(self, *args, **kwargs) -> None:
            forbidden()

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    ck = load_checkpoint(path)
    model_b = _model(5)
    restore_model(model_b, ck.model, source=str(path))
    assert ck.optimizer is not None
    Adam(model_b.parameters(), lr=0.01).load_state_dict(ck.optimizer)
    assert ck.meta["m"] == 1
