"""Multi-process data-parallel training: two gloo processes on the CPU train exactly like one
process on the combined batch.

The masked task (``watch``, only rows with a click) has a different number of valid rows in the
two halves of most batches; only a loss divided by the *global* count of valid rows gives the
one-process gradient there (a per-process mean would weigh the halves equally).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mtlrec.config import TrainingConfig
from mtlrec.errors import ConfigError
from mtlrec.models import build_model
from mtlrec.testing import tiny_dataset
from mtlrec.train.trainer import Trainer
from mtlrec.utils.runtime import free_port

ROWS, BATCH, EPOCHS = 150, 32, 2  # 5 batches an epoch, the last one of 22 rows


def _config(**kw: Any) -> TrainingConfig:
    base = dict(epochs=EPOCHS, batch_size=BATCH, eval_batch_size=40, progress=False, seed=3)
    base.update(kw)
    return TrainingConfig(**base)


def _setup(grad_clip: float | None) -> tuple[Any, Any, Any]:
    pre, ds = tiny_dataset(n=ROWS, seed=5)
    torch.manual_seed(0)
    model = build_model(
        "mmoe", ds.schema, pre.table_sizes(), {"num_experts": 2, "expert_hidden": [8]}
    )
    return pre, ds, model


def _single(grad_clip: float | None) -> tuple[dict[str, torch.Tensor], Any]:
    _, ds, model = _setup(grad_clip)
    trainer = Trainer(model, ds.schema, config=_config(grad_clip=grad_clip))
    result = trainer.fit(ds, ds)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, result


def _worker(rank: int, world: int, port: int, out: str, grad_clip: float | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from mtlrec.train.distributed import DistContext, DistributedTrainer, RankShard

        _, ds, model = _setup(grad_clip)
        ctx = DistContext(rank, world)
        trainer = DistributedTrainer(
            model, ds.schema, config=_config(grad_clip=grad_clip), context=ctx
        )
        result = trainer.fit(RankShard(ds, rank, world), ds)
        if rank == 0:
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            meta = {"best_value": repr(result.best_value), "best_epoch": str(result.best_epoch)}
            save_file(state, out, metadata=meta)
    finally:
        dist.destroy_process_group()


def _distributed(tmp: Path, grad_clip: float | None) -> tuple[dict[str, torch.Tensor], dict]:
    out = str(tmp / "rank0.safetensors")
    mp.start_processes(
        _worker,
        args=(2, free_port(), out, grad_clip),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    from safetensors import safe_open

    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    return load_file(out), meta


def test_shards_have_different_numbers_of_valid_masked_rows() -> None:
    """The premise of the comparison: the halves of a batch differ in valid ``watch`` rows."""
    _, ds = tiny_dataset(n=ROWS, seed=5)
    diffs = []
    for b in range(ds.num_batches(BATCH)):
        counts = [
            int(
                next(ds.batches(BATCH, shuffle=True, seed=3, start=b, rank=r, world_size=2))
                .masks["watch"]
                .sum()
            )
            for r in range(2)
        ]
        diffs.append(counts[0] != counts[1])
    assert any(diffs)


@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_two_processes_equal_one_process_on_the_combined_batch(
    tmp_path: Path, grad_clip: float | None
) -> None:
    ref, ref_result = _single(grad_clip)
    got, meta = _distributed(tmp_path, grad_clip)
    assert set(got) == set(ref)
    moved = 0
    _, _, init = _setup(grad_clip)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=k)
        moved += int(not torch.equal(init.state_dict()[k], v))
    assert moved > len(ref) // 2  # training changed the weights
    # validation metrics from gathered predictions select the same epoch with the same value
    assert meta["best_epoch"] == str(ref_result.best_epoch)
    assert float(meta["best_value"]) == pytest.approx(ref_result.best_value, abs=1e-6)


def test_per_process_mean_would_differ() -> None:
    """Control: dividing by each shard's own count gives another gradient than the global
    count (so the test above can fail)."""
    from mtlrec.losses import MultiTaskLoss

    _, ds, model = _setup(None)
    batch = next(ds.batches(BATCH, shuffle=True, seed=3))
    halves = [next(ds.batches(BATCH, shuffle=True, seed=3, rank=r, world_size=2)) for r in range(2)]
    task = [ds.schema.task("watch")]
    loss = MultiTaskLoss(task)

    def grad(batches: list[Any], scale: float) -> torch.Tensor:
        model.zero_grad()
        total = sum(loss(model(b.features), b)["watch"] for b in batches) * scale
        total.backward()  # type: ignore[union-attr]
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

    whole = grad([batch], 1.0)
    per_process = grad(halves, 0.5)
    assert not torch.allclose(whole, per_process, atol=1e-6)


def test_strategies_that_need_per_task_gradients_are_refused() -> None:
    from mtlrec.train.distributed import check_supported
    from mtlrec.weighting.build import build_weighting

    static = build_weighting("static", ["click", "watch"])
    check_supported(static, sparse_embeddings=False)
    with pytest.raises(ConfigError, match="sparse_embeddings"):
        check_supported(static, sparse_embeddings=True)

    class NeedsGrads(torch.nn.Module):
        needs_grads = True

    with pytest.raises(ConfigError, match="per-task gradients"):
        check_supported(NeedsGrads(), sparse_embeddings=False)
