"""Tests of mtlrec.train: the trainer's loops, optimisers, clipping, NaN guard, model selection,
early stopping, exact resumption, scoring, and whole runs (train_run / load_run)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pcsv
import pytest
import torch
from safetensors.torch import load_file

import mtlrec.train.trainer as trainer_mod
from mtlrec.config import EarlyStoppingConfig, ExperimentConfig, TrainingConfig
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.loading import load_datasets
from mtlrec.errors import CheckpointError, ConfigError, TrainingError
from mtlrec.metrics import auc
from mtlrec.models import build_model
from mtlrec.models.base import ModelOutput
from mtlrec.testing import tiny_dataset, tiny_schema, tiny_table
from mtlrec.train.callbacks import Callback
from mtlrec.train.checkpoint import save_checkpoint
from mtlrec.train.run import load_run, train_run
from mtlrec.train.step import clip_grad_norm
from mtlrec.train.trainer import Trainer, TrainState

SB = {"bottom_hidden": [16], "tower_hidden": [8]}
MMOE = {"num_experts": 2, "expert_hidden": [16], "tower_hidden": [8]}


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny matrices: one intra-op thread is much faster (and immune to a busy machine).

    ``release_memory`` (a full ``gc.collect`` plus ``malloc_trim``, ~0.2 s per call in a test
    process) only returns freed pages to the OS between phases; it changes no result, and
    the trainer calls it at every evaluation, so it is skipped here.
    """
    monkeypatch.setattr(trainer_mod, "release_memory", lambda: None)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data300() -> tuple[Any, ColumnarDataset]:
    return tiny_dataset(n=300, seed=1)


def _model(pre, ds: ColumnarDataset, name: str = "shared_bottom", seed: int = 0, **kw):
    torch.manual_seed(seed)
    params = {**(SB if name == "shared_bottom" else MMOE), **kw}
    return build_model(name, ds.schema, pre.table_sizes(), params)


def _cfg(**kw: Any) -> TrainingConfig:
    opt = kw.pop("optimizer", {"lr": 0.01})
    base: dict[str, Any] = {"epochs": 2, "batch_size": 64, "progress": False}
    return TrainingConfig.model_validate({**base, **kw, "optimizer": opt})


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _inverted(ds: ColumnarDataset) -> ColumnarDataset:
    """The same rows with the click labels flipped (a validation set that rewards bad models)."""
    assert ds.labels is not None
    labels = ds.labels.clone()
    labels[:, 0] = 1.0 - labels[:, 0]
    return dataclasses.replace(ds, labels=labels)


# -- learning ------------------------------------------------------------------------------------
def test_fit_learns_click() -> None:
    pre, ds = tiny_dataset(n=2000, seed=0)
    model = _model(pre, ds, "mmoe")
    trainer = Trainer(model, ds.schema, config=_cfg(epochs=4, batch_size=128))
    before = trainer.evaluate(ds)["click"]["auc"]
    fit = trainer.fit(ds)
    after = trainer.evaluate(ds)["click"]["auc"]
    assert before < 0.7
    assert after > 0.8, (before, after)
    assert fit.epochs_run == 4
    assert len(fit.history) == 4
    assert fit.best_epoch is None  # no validation data: nothing selected
    losses = [h["train_loss"]["click"] for h in fit.history]
    assert losses[-1] < losses[0]
    # predictions agree with the metric
    assert ds.labels is not None
    probs = trainer.predict(ds)["click"]
    assert auc(probs, ds.labels[:, 0].numpy()) == pytest.approx(after, abs=1e-9)


def test_fit_refuses_unlabelled_training_data(data300) -> None:
    pre, ds = data300
    unlabelled = dataclasses.replace(ds, labels=None, masks=None, weights=None)
    trainer = Trainer(_model(pre, ds), ds.schema, config=_cfg())
    with pytest.raises(ConfigError, match="no label"):
        trainer.fit(unlabelled)
    with pytest.raises(ConfigError, match="no label"):
        trainer.evaluate(unlabelled)
    assert len(trainer.predict(unlabelled)["click"]) == len(ds)


# -- optimisers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("name", ["adam", "adamw", "adagrad", "sgd"])
def test_every_optimizer_trains(data300, name: str, sparse: bool) -> None:
    pre, ds = data300
    model = _model(pre, ds)
    opt = {"name": name, "lr": 0.05, "sparse_embeddings": sparse}
    if name == "adamw":
        opt["weight_decay"] = 0.01
    trainer = Trainer(model, ds.schema, config=_cfg(epochs=1, optimizer=opt))
    emb = model.embedding_parameters()
    assert emb
    seen: list[bool] = []
    real_step = trainer.optimizer.step

    def spy() -> None:
        seen.extend(p.grad.is_sparse for p in emb if p.grad is not None)
        real_step()

    trainer.optimizer.step = spy  # type: ignore[method-assign]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit = trainer.fit(ds)
    assert seen, "the embedding tables got no gradient"
    assert all(s == sparse for s in seen)
    for n, p in model.named_parameters():
        assert not torch.equal(before[n], p), f"{n} did not move"
        assert bool(torch.isfinite(p).all()), n
    for h in fit.history:
        assert all(math.isfinite(v) for v in h["train_loss"].values())


def test_sgd_with_momentum_trains(data300) -> None:
    pre, ds = data300
    model = _model(pre, ds)
    before = _flat(model)
    cfg = _cfg(epochs=1, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})
    fit = Trainer(model, ds.schema, config=cfg).fit(ds)
    assert fit.epochs_run == 1
    assert not torch.equal(_flat(model), before)


def test_sparse_embeddings_only_move_looked_up_rows(data300) -> None:
    pre, ds = data300
    model = _model(pre, ds)
    cfg = _cfg(epochs=1, batch_size=len(ds), optimizer={"lr": 0.05, "sparse_embeddings": True})
    trainer = Trainer(model, ds.schema, config=cfg)
    table = model.embedding_parameters()[0]
    before = table.detach().clone()
    # ids no row of a small batch looks up do not move (lazy updates)
    trainer.fit(ds.subset(torch.arange(3)))
    moved = (table.detach() != before).any(dim=1)
    assert 0 < int(moved.sum()) < table.shape[0]


# -- clipping ------------------------------------------------------------------------------------
def test_grad_clip_bounds_the_update(data300) -> None:
    pre, ds = data300
    lr, clip = 0.1, 1e-4

    def one_step(grad_clip: float | None) -> float:
        model = _model(pre, ds)
        before = _flat(model)
        cfg = _cfg(
            epochs=1, batch_size=len(ds), grad_clip=grad_clip, optimizer={"name": "sgd", "lr": lr}
        )
        Trainer(model, ds.schema, config=cfg).fit(ds)  # one step of plain SGD
        return float((_flat(model) - before).norm())

    clipped, free = one_step(clip), one_step(None)
    assert clipped <= lr * clip * (1 + 1e-3)
    assert clipped == pytest.approx(lr * clip, rel=1e-2)  # the gradient norm exceeded clip
    assert free > 100 * clipped


def test_clip_grad_norm_dense_and_sparse() -> None:
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(3, 1))
    c = torch.nn.Parameter(torch.zeros(4))  # no gradient: ignored
    a.grad = torch.tensor([3.0, 4.0])
    # row 1 appears twice (uncoalesced): 5 + 7 = 12
    b.grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 1]]), torch.tensor([[5.0], [7.0]]), (3, 1), check_invariants=True
    )
    norm = clip_grad_norm([a, b, c], max_norm=1.3)
    assert norm == pytest.approx(13.0, rel=1e-6)  # sqrt(3^2 + 4^2 + 12^2): pre-clip norm
    scale = 1.3 / 13.0
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]) * scale, rtol=1e-5, atol=0)
    assert b.grad.is_sparse
    torch.testing.assert_close(
        b.grad.to_dense(), torch.tensor([[0.0], [12.0], [0.0]]) * scale, rtol=1e-5, atol=0
    )
    after = math.sqrt(float(a.grad.square().sum()) + float(b.grad.to_dense().square().sum()))
    assert after <= 1.3 * (1 + 1e-6)
    assert c.grad is None


def test_clip_grad_norm_leaves_small_gradients_alone() -> None:
    a = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([0.3, 0.4])
    assert clip_grad_norm([a], max_norm=1.0) == pytest.approx(0.5)
    assert torch.equal(a.grad, torch.tensor([0.3, 0.4]))
    assert clip_grad_norm([torch.nn.Parameter(torch.zeros(1))], max_norm=1.0) == 0.0


def test_clip_grad_norm_returns_a_non_finite_norm_without_scaling() -> None:
    a = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([float("inf"), 1.0])
    assert math.isinf(clip_grad_norm([a], max_norm=1.0))
    assert a.grad[1].item() == 1.0


# -- NaN guard -----------------------------------------------------------------------------------
def test_nan_output_of_one_task_raises_naming_the_task_and_position(
    data300, monkeypatch: pytest.MonkeyPatch
) -> None:
    pre, ds = data300
    model = _model(pre, ds)
    real_forward = model.forward
    calls = {"train": 0}

    def poisoned(features) -> ModelOutput:
        out = real_forward(features)
        if model.training:
            calls["train"] += 1
            if calls["train"] == 7:  # 5 batches per epoch: epoch 2, batch 2
                out.logits["watch"] = out.logits["watch"] * float("nan")
        return out

    monkeypatch.setattr(model, "forward", poisoned)
    trainer = Trainer(model, ds.schema, config=_cfg(epochs=3))
    with pytest.raises(TrainingError) as e:
        trainer.fit(ds)
    msg = str(e.value)
    assert "'watch'" in msg
    assert "'click'" not in msg.split("(losses")[0]
    assert "epoch 2, batch 2" in msg


def test_nan_dense_feature_raises_training_error(data300) -> None:
    pre, ds = data300
    dense = ds.dense.clone()
    dense[0, 0] = float("nan")
    bad = dataclasses.replace(ds, dense=dense)
    trainer = Trainer(_model(pre, ds), ds.schema, config=_cfg(epochs=1, batch_size=len(ds)))
    with pytest.raises(
        TrainingError, match=r"non-finite loss for task 'click' at epoch 1, batch 1"
    ):
        trainer.fit(bad)


# -- model selection and early stopping -----------------------------------------------------------
@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "run_dir"])
def test_best_epoch_is_selected_on_the_validation_set_passed(
    data300, tmp_path: Path, on_disk: bool
) -> None:
    pre, ds = data300
    valid = _inverted(ds)
    model = _model(pre, ds)
    trainer = Trainer(
        model,
        ds.schema,
        config=_cfg(epochs=5, optimizer={"lr": 0.03}),
        run_dir=tmp_path if on_disk else None,
    )
    fit = trainer.fit(ds, valid)
    logged = [h["valid"]["click"]["auc"] for h in fit.history]
    assert [h["monitor"]["value"] for h in fit.history] == logged
    assert fit.monitor == "click/auc"
    assert fit.best_epoch == int(np.argmax(logged)) + 1
    assert fit.best_value == max(logged)
    # the run learnt (train auc up, inverted auc down): the best epoch is not the last one
    assert fit.best_epoch < fit.epochs_run
    # (valid holds the training rows with flipped labels: train auc = 1 - valid auc)
    assert trainer.evaluate(ds)["click"]["auc"] == pytest.approx(1 - fit.best_value, abs=1e-9)
    # the weights in the model are the best epoch's
    assert trainer.evaluate(valid)["click"]["auc"] == fit.best_value
    if on_disk:
        assert (tmp_path / "checkpoints" / "best.safetensors").is_file()


def test_monitor_for_a_lower_is_better_metric(data300) -> None:
    pre, ds = data300
    trainer = Trainer(_model(pre, ds), ds.schema, config=_cfg(epochs=3), monitor=("watch", "mse"))
    fit = trainer.fit(ds, ds)
    logged = [h["valid"]["watch"]["mse"] for h in fit.history]
    assert fit.best_epoch == int(np.argmin(logged)) + 1
    assert trainer.evaluate(ds)["watch"]["mse"] == fit.best_value


def test_early_stopping_after_patience_epochs_without_improvement(data300) -> None:
    pre, ds = data300
    cfg = _cfg(
        epochs=10,
        optimizer={"lr": 1e-9},
        early_stopping={"patience": 2, "min_delta": 0.01},
    )
    trainer = Trainer(_model(pre, ds), ds.schema, config=cfg)
    fit = trainer.fit(ds, ds)
    assert fit.best_epoch == 1
    assert fit.epochs_run == 3  # best epoch + patience
    assert len(fit.history) == 3
    assert "early stopping" in fit.stop_reason
    assert "click/auc" in fit.stop_reason and "2 epochs" in fit.stop_reason


def test_early_stopping_on_the_inverted_validation_set(data300) -> None:
    pre, ds = data300
    cfg = _cfg(epochs=10, optimizer={"lr": 0.03}, early_stopping=EarlyStoppingConfig(patience=3))
    fit = Trainer(_model(pre, ds), ds.schema, config=cfg).fit(ds, _inverted(ds))
    assert fit.best_epoch is not None
    assert fit.epochs_run == fit.best_epoch + 3 < 10
    assert fit.stop_reason.startswith("early stopping")


def test_no_early_stop_reason_when_all_epochs_run(data300) -> None:
    pre, ds = data300
    fit = Trainer(_model(pre, ds), ds.schema, config=_cfg(epochs=2)).fit(ds, ds)
    assert fit.epochs_run == 2
    assert fit.stop_reason == ""


# -- exact resumption ----------------------------------------------------------------------------
class _InterruptAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer, state: TrainState) -> None:
        if state.step == self.step:
            raise KeyboardInterrupt


class _CountSteps(Callback):
    def __init__(self) -> None:
        self.steps = 0
        self.trainer: Trainer | None = None

    def on_step_end(self, trainer: Trainer, state: TrainState) -> None:
        self.steps += 1

    def on_fit_end(self, trainer: Trainer, state: TrainState) -> None:
        self.trainer = trainer


def _strip(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k not in ("seconds", "samples_per_s")} for h in history]


@pytest.mark.parametrize(
    "interrupt",
    ["step 7", "step 10", "validation 2"],  # mid epoch 2; its last batch; its evaluation
)
def test_resume_is_bit_exact(data300, tmp_path: Path, interrupt: str) -> None:
    pre, ds = data300
    valid = pre.encode(tiny_table(120, seed=5))
    cfg = _cfg(epochs=3, checkpoint_every_steps=1, optimizer={"lr": 0.02})

    def make(run_dir: Path, callbacks=()) -> Trainer:
        model = _model(pre, ds, dropout=0.2)  # dropout: the RNG state matters too
        return Trainer(model, ds.schema, config=cfg, run_dir=run_dir, callbacks=callbacks)

    a = make(tmp_path / "a")
    fit_a = a.fit(ds, valid)
    assert fit_a.epochs_run == 3

    kind, at = interrupt.split()
    if kind == "step":
        b = make(tmp_path / "b", [_InterruptAt(int(at))])
        done = int(at)  # the checkpointer runs first: step `at` was saved before the interrupt
    else:
        b = make(tmp_path / "b")
        real_evaluate, calls = b.evaluate, []

        def evaluate(data):
            calls.append(1)
            if len(calls) == int(at):
                raise KeyboardInterrupt
            return real_evaluate(data)

        b.evaluate = evaluate  # type: ignore[method-assign]
        done = 5 * int(at)  # every step of epoch 2 was checkpointed
    with pytest.raises(KeyboardInterrupt):
        b.fit(ds, valid)
    last = load_file(str(tmp_path / "b" / "checkpoints" / "last.safetensors"))
    assert any(  # b stopped early: its last checkpoint is not a's end
        not torch.equal(last[f"model.{k}"], v) for k, v in a.model.state_dict().items()
    )

    counter = _CountSteps()
    b2 = make(tmp_path / "b", [counter])
    for p in b2.model.parameters():  # resumption must not depend on the fresh weights
        torch.nn.init.normal_(p)
    fit_b = b2.fit(ds, valid, resume=True)
    assert counter.steps == 15 - done

    for (na, pa), (_, pb) in zip(
        a.model.named_parameters(), b2.model.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb), na
    last_a = load_file(str(tmp_path / "a" / "checkpoints" / "last.safetensors"))
    last_b = load_file(str(tmp_path / "b" / "checkpoints" / "last.safetensors"))
    assert set(last_a) == set(last_b)
    for k in last_a:
        assert torch.equal(last_a[k], last_b[k]), k
    assert len(fit_b.history) == len(fit_a.history) == 3
    assert _strip(fit_b.history) == _strip(fit_a.history)
    assert (fit_b.best_epoch, fit_b.best_value) == (fit_a.best_epoch, fit_a.best_value)


def test_resume_with_another_schema_fingerprint_is_refused(data300, tmp_path: Path) -> None:
    pre, ds = data300
    fp = tiny_schema().fingerprint()
    other = tiny_schema(dim=8).fingerprint()
    assert fp != other
    meta = {"schema_fingerprint": fp, "model": "shared_bottom"}
    Trainer(_model(pre, ds), ds.schema, config=_cfg(epochs=1), run_dir=tmp_path, meta=meta).fit(ds)
    bad = {"schema_fingerprint": other, "model": "shared_bottom"}
    t = Trainer(_model(pre, ds), ds.schema, config=_cfg(epochs=2), run_dir=tmp_path, meta=bad)
    with pytest.raises(CheckpointError, match="schema_fingerprint") as e:
        t.fit(ds, resume=True)
    assert fp in str(e.value) and other in str(e.value)
    # and the same fingerprint resumes
    ok = Trainer(_model(pre, ds), ds.schema, config=_cfg(epochs=2), run_dir=tmp_path, meta=meta)
    assert ok.fit(ds, resume=True).epochs_run == 2


def test_resume_from_a_checkpoint_without_trainer_state_is_a_checkpoint_error(
    data300, tmp_path: Path
) -> None:
    pre, ds = data300
    model = _model(pre, ds)
    save_checkpoint(tmp_path / "checkpoints" / "last.safetensors", model=model)
    trainer = Trainer(model, ds.schema, config=_cfg(epochs=1), run_dir=tmp_path)
    with pytest.raises(CheckpointError):
        trainer.fit(ds, resume=True)


def test_resume_with_another_model_is_refused(data300, tmp_path: Path) -> None:
    pre, ds = data300
    Trainer(_model(pre, ds), ds.schema, config=_cfg(epochs=1), run_dir=tmp_path).fit(ds)
    other = _model(pre, ds, "mmoe")
    with pytest.raises(CheckpointError):
        Trainer(other, ds.schema, config=_cfg(epochs=2), run_dir=tmp_path).fit(ds, resume=True)


# -- scoring -------------------------------------------------------------------------------------
def test_evaluate_twice_gives_identical_metrics(data300) -> None:
    pre, ds = data300
    trainer = Trainer(_model(pre, ds, "mmoe"), ds.schema, config=_cfg(epochs=1))
    trainer.fit(ds)
    first = trainer.evaluate(ds)
    second = trainer.evaluate(ds)
    assert first == second
    assert first["click"]["count"] == len(ds)
    assert ds.masks is not None
    assert first["watch"]["count"] == int(ds.masks[:, 1].sum())
    # a different data set in between does not leak into the next evaluation
    half = ds.subset(torch.arange(100))
    assert trainer.evaluate(half)["click"]["count"] == 100
    assert trainer.evaluate(ds) == first


def test_predict_shapes_and_ranges(data300) -> None:
    pre, ds = data300
    trainer = Trainer(_model(pre, ds, "mmoe"), ds.schema, config=_cfg(epochs=1))
    trainer.fit(ds)
    preds = trainer.predict(ds)
    assert set(preds) == {"click", "watch"}
    for v in preds.values():
        assert isinstance(v, np.ndarray)
        assert v.shape == (len(ds),)
        assert np.isfinite(v).all()
    assert ((preds["click"] >= 0) & (preds["click"] <= 1)).all()


def test_scoring_does_not_depend_on_batch_or_block_size(data300) -> None:
    pre, ds = data300
    model = _model(pre, ds, "mmoe")
    Trainer(model, ds.schema, config=_cfg(epochs=1)).fit(ds)

    def scored(batch: int, block: int):
        cfg = _cfg(eval_batch_size=batch, inference_block_rows=block)
        t = Trainer(model, ds.schema, config=cfg)
        return t.predict(ds), t.evaluate(ds)

    small_p, small_m = scored(7, 3)
    big_p, big_m = scored(1000, 1000)
    mid_p, _ = scored(1000, 7)
    for k in big_p:
        # the same rows in the same order; equal up to float32 rounding of batched matmuls
        np.testing.assert_allclose(small_p[k], big_p[k], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mid_p[k], big_p[k], rtol=1e-6, atol=1e-6)
    for task, ms in big_m.items():
        for name, v in ms.items():
            assert small_m[task][name] == pytest.approx(v, rel=1e-5, abs=1e-6), (task, name)
    # the direct forward of the whole data set agrees
    model.eval()
    with torch.no_grad():
        direct = model(ds.features_at(slice(None))).predictions(ds.schema.tasks)
    np.testing.assert_allclose(big_p["click"], direct["click"].numpy(), rtol=1e-6, atol=1e-6)


# -- whole runs ----------------------------------------------------------------------------------
def _run_config(tmp_path: Path, **training: Any) -> ExperimentConfig:
    csv = tmp_path / "rows.csv"
    if not csv.exists():
        pcsv.write_csv(tiny_table(500, seed=3), csv)
    return ExperimentConfig.from_dict(
        {
            "data": {"train": "rows.csv", "split": {"fractions": [0.6, 0.2, 0.2], "seed": 1}},
            "schema": tiny_schema().model_dump(mode="json"),
            "model": {"name": "shared_bottom", "params": SB},
            "training": {
                "epochs": 2,
                "batch_size": 64,
                "progress": False,
                "optimizer": {"lr": 0.02},
                **training,
            },
            "output_dir": str(tmp_path / "run"),
        },
        base_dir=str(tmp_path),
    )


def test_train_run_writes_resumes_and_reloads(tmp_path: Path) -> None:
    cfg = _run_config(tmp_path)
    out = tmp_path / "run"
    counter = _CountSteps()
    res = train_run(cfg, callbacks=[counter])
    assert counter.steps > 0
    assert res.path == out
    for f in (
        "config.yaml",
        "schema.json",
        "encoders.json",
        "model.json",
        "checkpoints/best.safetensors",
        "checkpoints/last.safetensors",
        "metrics.jsonl",
        "summary.json",
    ):
        assert (out / f).is_file(), f
    assert not [p for p in out.rglob("*.tmp")]

    saved = ExperimentConfig.load(out / "config.yaml")
    assert saved.model_dump(exclude={"base_dir"}) == cfg.model_dump(exclude={"base_dir"})
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines, start=1):
        rec = json.loads(line)
        assert rec["epoch"] == i
        assert set(rec["train_loss"]) == {"click", "watch"}
        assert all(math.isfinite(v) for v in rec["train_loss"].values())
        assert 0.0 <= rec["valid"]["click"]["auc"] <= 1.0
        assert "mse" in rec["valid"]["watch"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 2
    assert summary["best_epoch"] == res.fit.best_epoch
    assert summary["monitor"] == "click/auc"
    assert summary["test"] == res.test_metrics
    assert summary["valid"] == res.valid_metrics
    assert res.test_metrics is not None and res.test_metrics["click"]["count"] > 0
    model_info = json.loads((out / "model.json").read_text())
    assert model_info["name"] == "shared_bottom"

    # load_run: the same model
    trained = counter.trainer
    assert trained is not None
    loaded = load_run(out)
    assert loaded.model_name == "shared_bottom"
    assert loaded.schema == tiny_schema()
    data = load_datasets(
        loaded.config.model_copy(update={"base_dir": str(tmp_path)}), loaded.preprocessor
    )
    assert data.test is not None
    mine = trained.predict(data.test)
    theirs = loaded.trainer().predict(data.test)
    for k in mine:
        assert np.array_equal(mine[k], theirs[k]), k
    assert loaded.trainer().evaluate(data.test) == res.test_metrics
    for (n, p), q in zip(trained.model.named_parameters(), loaded.model.parameters(), strict=True):
        assert torch.equal(p, q), n

    # the same command again resumes: no new step, the same results
    again_counter = _CountSteps()
    again = train_run(cfg, callbacks=[again_counter])
    assert again_counter.steps == 0
    assert again.fit.epochs_run == 2
    assert again.test_metrics == res.test_metrics
    assert again.fit.best_epoch == res.fit.best_epoch
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    summary2 = json.loads((out / "summary.json").read_text())
    assert summary2["test"] == summary["test"]

    # more epochs may be asked of the same run: it continues from where it stopped
    more_counter = _CountSteps()
    more = train_run(_run_config(tmp_path, epochs=3), callbacks=[more_counter])
    assert more.fit.epochs_run == 3
    assert 0 < more_counter.steps < counter.steps
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_run_saved_before_a_config_key_existed_is_the_same_run(tmp_path: Path) -> None:
    import yaml

    cfg = _run_config(tmp_path, epochs=1)
    out = tmp_path / "run"
    train_run(cfg)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["data"]["prefetch"]  # as written by a version without the key (default value)
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    again = train_run(_run_config(tmp_path, epochs=1))  # read back, not refused
    assert again.fit.epochs_run == 1


def test_train_run_refuses_a_changed_config_unless_overwritten(tmp_path: Path) -> None:
    cfg = _run_config(tmp_path, epochs=1)
    out = tmp_path / "run"
    first = train_run(cfg)
    changed = _run_config(tmp_path, epochs=1, optimizer={"lr": 0.05})
    with pytest.raises(ConfigError, match="another config") as e:
        train_run(changed)
    assert str(out) in str(e.value)
    # nothing was touched
    assert ExperimentConfig.load(out / "config.yaml").training.optimizer.lr == 0.02
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    counter = _CountSteps()
    fresh = train_run(changed, overwrite=True, callbacks=[counter])
    assert counter.steps > 0
    assert fresh.fit.epochs_run == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert ExperimentConfig.load(out / "config.yaml").training.optimizer.lr == 0.05
    assert fresh.test_metrics != first.test_metrics


def test_load_run_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not an mtlrec run folder"):
        load_run(tmp_path)


def test_load_run_refuses_a_checkpoint_of_another_schema(tmp_path: Path) -> None:
    cfg = _run_config(tmp_path, epochs=1)
    out = tmp_path / "run"
    train_run(cfg)
    other = tiny_schema(dim=8)
    (out / "schema.json").write_text(other.to_json())
    with pytest.raises(CheckpointError):
        load_run(out)


def test_interrupted_checkpoint_write_does_not_duplicate_metrics_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _run_config(tmp_path)
    real_save, calls = trainer_mod.save_checkpoint, []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # Ctrl-C while the first checkpoint (epoch 1) is written
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "save_checkpoint", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg)
    res = train_run(cfg)
    assert res.fit.epochs_run == 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
