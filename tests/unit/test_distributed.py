"""Multi-process data-parallel training: two gloo processes on the CPU train exactly like one
process on the combined batch.

The masked task (``watch``, only rows with a click) has a different number of valid rows in the
two halves of most batches; only a loss divided by the *global* count of valid rows gives the
one-process gradient there (a per-process mean would weigh the halves equally).
"""

from __future__ import annotations

import json
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


def _join(rank: int, world: int, rendezvous: str) -> None:
    """Join a gloo group through a file (no port to choose, so none to lose to a race)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def _worker(rank: int, world: int, rendezvous: str, out: str, grad_clip: float | None) -> None:
    _join(rank, world, rendezvous)
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
        dist.barrier()  # nobody leaves while another finishes (see distributed.shutdown)
    finally:
        dist.destroy_process_group()


def _distributed(tmp: Path, grad_clip: float | None) -> tuple[dict[str, torch.Tensor], dict]:
    out = str(tmp / "rank0.safetensors")
    mp.start_processes(
        _worker,
        args=(2, str(tmp / "rendezvous"), out, grad_clip),
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


# -- random masks differ across processes (issue 12.14) ------------------------------------------
DROPOUT = {"num_experts": 4, "expert_hidden": [8], "dropout": 0.3, "gate_dropout": 0.5}


def _mask_worker(rank: int, world: int, rendezvous: str, folder: str) -> None:
    """Train with dropout and gate dropout; record, at every training forward, the gate-dropout
    pattern (weights dropped to exactly 0) and the initial weights."""
    _join(rank, world, rendezvous)
    try:
        from mtlrec.train.callbacks import Callback
        from mtlrec.train.distributed import DistContext, DistributedTrainer, RankShard

        pre, ds = tiny_dataset(n=ROWS, seed=5)
        torch.manual_seed(rank)  # different builds: the broadcast must make them equal
        model = build_model("mmoe", ds.schema, pre.table_sizes(), DROPOUT)
        record: dict[str, torch.Tensor] = {}
        steps: list[int] = []

        def hook(module: Any, args: Any, output: Any) -> None:
            if module.training:
                k = len(steps)
                steps.append(k)
                for name, w in output.gates.items():
                    record[f"gate.{name}.{k}"] = (w == 0).to(torch.uint8).contiguous()

        class InitialWeights(Callback):
            def on_fit_start(self, trainer: Any, state: Any) -> None:
                for key, v in trainer.model.state_dict().items():
                    record[f"init.{key}"] = v.detach().clone().contiguous()

        model.register_forward_hook(hook)
        trainer = DistributedTrainer(
            model,
            ds.schema,
            config=_config(),
            context=DistContext(rank, world),
            callbacks=[InitialWeights()],
        )
        trainer.fit(RankShard(ds, rank, world), ds)
        save_file(record, str(Path(folder) / f"rank{rank}.safetensors"))
        dist.barrier()  # nobody leaves while another finishes (see distributed.shutdown)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def mask_records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("masks")
    mp.start_processes(
        _mask_worker,
        args=(2, str(folder / "rendezvous"), str(folder)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    return [load_file(folder / f"rank{r}.safetensors") for r in range(2)]


def test_dropout_masks_differ_across_processes(mask_records: list[dict]) -> None:
    a, b = mask_records
    keys = sorted(k for k in a if k.startswith("gate."))
    assert keys == sorted(k for k in b if k.startswith("gate."))
    assert len(keys) == 2 * EPOCHS * 5  # two gates, every step of two epochs
    same = total = 0
    for k in keys:
        assert a[k].shape == b[k].shape
        assert not torch.equal(a[k], b[k]), f"{k}: both processes dropped the same experts"
        same += int((a[k] == b[k]).sum())
        total += a[k].numel()
    dropped = sum(int(a[k].sum()) for k in keys) / total
    assert 0.3 < dropped < 0.6  # gate dropout 0.5 (a row that loses every expert keeps them)
    # independent masks agree on p^2 + (1-p)^2 of the entries; equal masks on all of them
    expect = dropped**2 + (1 - dropped) ** 2
    assert abs(same / total - expect) < 0.06, (same / total, expect)


def test_initial_weights_are_the_same_in_every_process(mask_records: list[dict]) -> None:
    a, b = mask_records
    keys = [k for k in a if k.startswith("init.")]
    assert keys
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def test_rank_streams_are_a_function_of_seed_rank_and_step() -> None:
    """What makes a resumed run draw the masks of an uninterrupted one on every rank > 0: the
    stream after step k depends only on (seed, rank, k); rank 0 is left alone."""
    from mtlrec.train.distributed import _RankRandomness, rank_seed
    from mtlrec.train.state import TrainState

    class View:
        config = _config()

    def draw(rank: int, step: int) -> torch.Tensor:
        torch.manual_seed(123)
        _RankRandomness(rank).on_step_end(View(), TrainState(step=step))  # type: ignore[arg-type]
        return torch.rand(64)

    assert torch.equal(draw(1, 7), draw(1, 7))
    torch.manual_seed(123)
    seeded = torch.rand(64)
    assert torch.equal(draw(0, 7), seeded)  # rank 0: the seeded stream, untouched
    seeds = {rank_seed(s, r, k) for s in (0, 1, 3) for r in range(1, 5) for k in range(50)}
    assert len(seeds) == 3 * 4 * 50
    assert all(0 <= x < 2**63 for x in seeds)
    assert not torch.equal(draw(1, 7), draw(1, 8))
    assert not torch.equal(draw(1, 7), draw(2, 7))


# -- the launcher's port (issue 17.12) -----------------------------------------------------------
@pytest.mark.slow
def test_launch_survives_a_port_taken_by_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port chosen free and bound later may be taken in between. Simulated: every port
    chooser hands out a port this test holds; the launcher must still start its group (it
    hosts the store on a port the OS binds at once)."""
    import socket

    import pyarrow.parquet as pq
    import yaml

    import mtlrec.train.distributed as ddp
    import mtlrec.utils.runtime as runtime
    from mtlrec.testing import tiny_table

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        monkeypatch.setattr(runtime, "free_port", lambda: taken)
        monkeypatch.setattr(ddp, "free_port", lambda: taken, raising=False)
        pq.write_table(tiny_table(200, seed=1), tmp_path / "rows.parquet")
        cfg = {
            "data": {"train": "rows.parquet", "split": {"fractions": [0.7, 0.15, 0.15]}},
            "schema": {
                "features": [
                    {"type": "sparse", "name": "user", "embedding_dim": 4},
                    {"type": "dense", "name": "price"},
                ],
                "tasks": [{"name": "click", "kind": "binary"}],
            },
            "model": {"name": "shared_bottom", "params": {"bottom_hidden": [8]}},
            "training": {"epochs": 1, "batch_size": 64, "num_threads": 1},
            "output_dir": "run",
        }
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        monkeypatch.chdir(tmp_path)
        code = ddp.launch(["train", "c.yaml", "--no-progress"], 2)
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_run"] == 1


_GROUP_THREADS = """
import os, sys, torch
import torch.distributed as dist
from mtlrec.train import distributed as ddp

ddp.init_from_env()
torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])  # the first optimizer imports torch._dynamo
x = torch.ones(2)
dist.all_reduce(x)
ddp.shutdown(synchronize=True)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("gloo threads:", sorted(n for n in names if "gloo" in n), flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_shutdown_leaves_no_group_thread_running_after_an_optimizer_was_built(
    tmp_path: Path,
) -> None:
    """A process group still referenced after ``destroy_process_group`` keeps its gloo threads
    until the interpreter's teardown, where one of them can abort a run that succeeded
    ("terminate called without an active exception"). torch.optim imports torch._dynamo when
    the first optimizer is built, and that import, made while a group exists, keeps the group:
    after ``shutdown`` no gloo thread may be left."""
    import os
    import subprocess
    import sys

    import mtlrec.train.distributed as ddp

    store = ddp.host_store(2, timeout=60.0)
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(store.port),
            TORCHELASTIC_USE_AGENT_STORE="True",
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _GROUP_THREADS],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
        assert "gloo threads: []" in out, out
