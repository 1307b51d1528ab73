"""Multi-process data-parallel training (``torch.distributed``; gloo on CPU).

How a step is made equal to one process's step on the whole global batch:

* **Data**: every process holds the same encoded data and takes its contiguous share of every
  global batch (:class:`RankShard`; :meth:`ColumnarDataset.batches` with ``rank`` and
  ``world_size``). The order of an epoch is one permutation drawn from ``(seed, epoch)``, so it
  does not depend on the number of processes, and a run can be resumed with another one.
* **Loss normalisation**: task t's loss is a mean over its valid rows of the *global* batch.
  Each process sums its rows' losses and divides by ``N_t / W`` where ``N_t`` is the all-reduced
  count of valid rows (:func:`global_count_reducer`), then gradients are averaged over the ``W``
  processes: ``(1/W) sum_r W S_r / N_t = S / N_t``, exactly the one-process loss. A per-process
  mean would give a shard with few valid rows the weight of one with many.
* **Loss values**: balancing strategies weigh tasks by the loss *values*; every process gets the
  global values (all-reduced) with its own gradient path (:class:`GlobalLossValues`), so the
  strategy computes the same weights everywhere and its own state evolves identically.
* **Gradients**: one all-reduce (average) of all gradients, flattened into one buffer, after
  backward and before clipping (:meth:`DistributedTrainer.sync_gradients`).
* **Metrics**: each process scores its contiguous share of the validation rows; predictions and
  labels are all-gathered (``MetricSet.compute(gather=...)``), so every process computes the
  metrics of the whole split and takes the same early-stopping decision.
* **Files**: only rank 0 writes (checkpoints, logs, run files); every save is followed by a
  barrier, so no process reads a checkpoint before it is complete.
* **Random masks**: the initial weights and the data order are the same in every process (rank
  0's weights are broadcast at the start; the order is drawn from ``(seed, epoch)``), but the
  dropout and gate-dropout masks must not be: with one seed everywhere, every process would drop
  the same units of its share of the batch. Rank 0 keeps the stream of ``training.seed`` (the
  one-process stream); rank ``r > 0`` re-seeds torch before every step from ``(seed, r, step)``
  (:func:`rank_seed`), so its masks are independent of rank 0's and a resumed run draws the same
  masks as an uninterrupted one (rank 0's generator state is in the checkpoint; the others' is a
  function of the step).

Strategies that need per-task gradients (``needs_grads``) or model outputs (``needs_outputs``)
would see only the local shard's; they are refused with a :class:`ConfigError`, as are sparse
embedding gradients (the all-reduce is dense).

Launch with ``mtlrec train CONFIG --nproc N`` (this module's :func:`launch` starts N local
processes) or ``torchrun --nproc_per_node N -m mtlrec.cli train CONFIG``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtlrec.batch import Batch
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.split import splitmix64
from mtlrec.errors import ConfigError
from mtlrec.losses import TaskLosses
from mtlrec.models.base import ModelOutput
from mtlrec.train.callbacks import Callback
from mtlrec.train.state import TrainState
from mtlrec.train.step import evaluate as evaluate_batches
from mtlrec.train.trainer import Trainer

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group."""

    rank: int
    world_size: int
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()


def env_world_size() -> int:
    """``WORLD_SIZE`` of the environment (1 when not launched by torchrun / ``--nproc``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(
            f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}"
        ) from None


def init_from_env(backend: str | None = None) -> DistContext | None:
    """Join the process group described by torchrun's environment variables.

    Returns None in a single process. The backend is gloo (the trainer computes on the CPU);
    ``MTLREC_DIST_BACKEND`` may name another one torch supports.
    """
    if env_world_size() <= 1:
        return None
    missing = [k for k in ENV_KEYS if k not in os.environ and k != "LOCAL_RANK"]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE > 1 but {missing} are not set; launch with torchrun or --nproc"
        )
    backend = backend or os.environ.get("MTLREC_DIST_BACKEND", "gloo")
    if not dist.is_initialized():
        import_dynamo_before_group()
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), backend)


def import_dynamo_before_group() -> None:
    """Import ``torch._dynamo`` now, before this process makes its process group.

    torch.optim imports it when the first optimizer is built. Imported while a group exists
    (torch 2.13), it keeps references to the default group, so ``destroy_process_group`` no
    longer frees it: the group's gloo threads run on until the interpreter's teardown, where
    one of them now and then aborts a process whose run succeeded ("terminate called without
    an active exception", exit status 1). Imported first, it sees no group to keep.
    """
    import torch._dynamo  # noqa: F401


def shutdown(*, synchronize: bool = False) -> None:
    """Leave the process group. With ``synchronize`` (after a run every process completed), a
    barrier first: a process that tears its connections down while another is still finishing
    its last collective makes gloo abort that one at exit ("terminate called without an active
    exception", exit status 1 from a run that succeeded). Never after an error: the others may
    not reach the barrier."""
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def global_count_reducer(world_size: int) -> Callable[[Tensor], Tensor]:
    """Local count of valid rows -> ``global count / world_size`` (see the module notes)."""

    def reduce(count: Tensor) -> Tensor:
        total = count.detach().to(torch.float64).clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return (total / world_size).to(count.dtype)

    return reduce


def comm_device(device: torch.device) -> torch.device:
    """Where the small tensors of collectives live: the GPU under nccl, else the CPU."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


@torch.no_grad()
def average_gradients(
    params: Sequence[nn.Parameter], world_size: int, device: torch.device | None = None
) -> None:
    """Average the gradients of ``params`` over the processes with one flat all-reduce.

    A parameter that no process has a gradient for is left alone; one that only some have gets
    zeros on the others; sparse gradients are made dense (the all-reduce is dense). ``device``
    holds the small presence vector (the GPU under nccl).
    """
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist(), strict=True) if h]
    if not live:
        return
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif p.grad.is_sparse:
            p.grad = p.grad.to_dense()
    flat = torch.cat([p.grad.reshape(-1) for p in live])  # type: ignore[union-attr]  # [P]
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for p in live:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))  # type: ignore[union-attr]
        offset += n


class GlobalLossValues(nn.Module):
    """Wraps the per-task loss so that each task's *value* is the global one (the mean over
    processes of the local terms) while its gradient stays the local term's."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, output: ModelOutput, batch: Batch) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = self.inner(output, batch)
        names = list(losses)
        local = torch.stack([losses[n].detach() for n in names]).to(torch.float64)
        total = local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        mean = total / dist.get_world_size()
        values = {
            n: losses[n] + (mean[i] - local[i]).to(losses[n].dtype) for i, n in enumerate(names)
        }
        # the valid-row counts are global already (count_reducer): every process sees the same
        # tasks present, so the balancing strategy's update is the same everywhere
        return TaskLosses(values, getattr(losses, "counts", {}))


@dataclass
class RankShard:
    """One process's contiguous share of every global batch of ``data`` (a BatchSource)."""

    data: ColumnarDataset
    rank: int
    world_size: int

    @property
    def has_targets(self) -> bool:
        return self.data.has_targets

    def __len__(self) -> int:
        return len(self.data)

    def num_batches(self, batch_size: int) -> int:
        return self.data.num_batches(batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
    ) -> Iterator[Batch]:
        return self.data.batches(
            batch_size,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            start=start,
            rank=self.rank,
            world_size=self.world_size,
        )


def check_supported(strategy: nn.Module, sparse_embeddings: bool) -> None:
    """Refuse what distributed training cannot do exactly (one clear line)."""
    name = type(strategy).__name__
    if getattr(strategy, "needs_grads", False):
        raise ConfigError(
            f"balancing strategy {name} needs per-task gradients, which multi-process training "
            "does not gather; train it in one process (no --nproc) or use a loss-based strategy"
        )
    if getattr(strategy, "needs_outputs", False):
        raise ConfigError(
            f"balancing strategy {name} reads the model outputs of the whole batch, which "
            "multi-process training does not gather; train it in one process (no --nproc)"
        )
    if sparse_embeddings:
        raise ConfigError(
            "training.optimizer.sparse_embeddings: multi-process training all-reduces dense "
            "gradients; set it to false or train in one process"
        )


def _all_gather_rows(a: np.ndarray) -> np.ndarray:
    """Concatenate, in rank order, the rows of ``a`` of every process (sizes may differ)."""
    world = dist.get_world_size()
    t = torch.from_numpy(np.ascontiguousarray(a))
    size = torch.tensor([t.shape[0]], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    top = max(counts)
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).numpy()


class _BroadcastStart(Callback):
    """At the start of fit (after seeding or resuming), every process takes rank 0's weights."""

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        with torch.no_grad():
            for module in (trainer.model, trainer.strategy):
                for t in module.state_dict().values():
                    if t.is_floating_point() or t.dtype in (torch.int64, torch.int32):
                        dist.broadcast(t, src=0)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of process ``rank`` for its random masks from ``step`` on: SplitMix64
    of ``(seed, rank, step)`` chained, so nearby seeds, ranks and steps give unrelated streams.

    Example:
        >>> rank_seed(0, 1, 5) == rank_seed(0, 1, 5), rank_seed(0, 1, 5) != rank_seed(0, 2, 5)
        (True, True)
    """
    h = int(splitmix64(np.array([seed % 2**64], dtype=np.uint64))[0])
    for v in (rank, step):
        h = int(splitmix64(np.array([h ^ (v % 2**64)], dtype=np.uint64))[0])
    return h >> 1  # torch seeds are below 2^63 here


class _RankRandomness(Callback):
    """Independent random masks per process (see the module notes): rank ``r > 0`` re-seeds
    torch from ``(seed, r, step)`` at the start of fit and after every step; rank 0 keeps the
    seeded (or resumed) stream of a one-process run."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def _reseed(self, trainer: Trainer, state: TrainState) -> None:
        if self.rank > 0:
            torch.manual_seed(rank_seed(trainer.config.seed, self.rank, state.step))

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        self._reseed(trainer, state)

    def on_step_end(self, trainer: Trainer, state: TrainState) -> None:
        self._reseed(trainer, state)


class DistributedTrainer(Trainer):
    """A :class:`Trainer` for one process of a data-parallel group (see the module notes).

    Takes the Trainer's arguments plus ``context``. Pass the training data as a
    :class:`RankShard` (or any BatchSource yielding this process's share of each global batch);
    validation data whole (each process scores its share of it).
    """

    def __init__(self, *args: Any, context: DistContext, **kwargs: Any) -> None:
        self.context = context
        config = kwargs.get("config")
        if config is not None and not context.is_main and config.progress:
            kwargs["config"] = config.model_copy(update={"progress": False})
        kwargs["count_reducer"] = global_count_reducer(context.world_size)
        kwargs["callbacks"] = [
            _BroadcastStart(),
            _RankRandomness(context.rank),
            *kwargs.get("callbacks", ()),
        ]
        super().__init__(*args, **kwargs)
        check_supported(self.strategy, self.config.optimizer.sparse_embeddings)
        self.loss_fn = GlobalLossValues(self.loss_fn)  # type: ignore[assignment]
        self.grad_sync = self.sync_gradients
        self._params = [p for p in self.model.parameters() if p.requires_grad] + [
            p for p in self.strategy.parameters() if p.requires_grad
        ]

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Average every gradient over the processes (one flat all-reduce)."""
        average_gradients(self._params, self.context.world_size, comm_device(self.device))

    def save(self, path: str | Path, state: TrainState) -> None:
        """Rank 0 writes; everyone waits until the file is complete."""
        if self.context.is_main:
            super().save(path, state)
        self.context.barrier()

    def evaluate(self, data: ColumnarDataset) -> dict[str, dict[str, float]]:
        """Metrics of the whole split: each process scores a contiguous share of its rows and
        the predictions and labels are all-gathered."""
        if not data.has_targets:
            raise ConfigError(f"{data.source}: no label columns to evaluate against")
        n, w, r = len(data), self.context.world_size, self.context.rank
        lo, hi = n * r // w, n * (r + 1) // w
        size = self.config.eval_batch_size
        batches = (data.take(slice(a, min(a + size, hi))) for a in range(lo, hi, size))
        evaluate_batches(
            self.model, batches, self.metrics, self.schema.tasks, self.config.inference_block_rows
        )
        return self.metrics.compute(gather=_all_gather_rows)


# -- launching -------------------------------------------------------------------------------
def host_store(world_size: int, host: str = "127.0.0.1", timeout: float = 1800.0) -> dist.TCPStore:
    """A TCPStore server for a local group of ``world_size`` processes, on a port the OS
    chose when binding it (``store.port``).

    The processes join it as clients when started with ``MASTER_PORT=store.port`` and
    ``TORCHELASTIC_USE_AGENT_STORE=True`` (then rank 0 does not bind a port of its own). A port
    chosen first and bound later by rank 0 could be taken in between by another process; this
    one is never free. Keep the store alive until the processes end.
    """
    from datetime import timedelta

    return dist.TCPStore(
        host,
        0,
        world_size=world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout),
    )


def launch(args: Sequence[str], nproc: int, *, poll: float = 0.05, grace: float = 5.0) -> int:
    """Run ``mtlrec <args>`` in ``nproc`` local processes of one group; return the exit code.

    Rank 0 prints to this terminal; the others' output goes to a temporary log, shown only if
    such a process fails alone. When any process fails, the others are stopped (they would wait
    for it forever in a collective).
    """
    # the launcher hosts the group's store on a port the OS gives it (bound at once, so no other
    # process can take it between a choice and a bind), and every process joins it as a client
    # (torch's agent-store mode, as torchrun does)
    store = host_store(nproc)
    port = store.port
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    with tempfile.TemporaryDirectory(prefix="mtlrec-ddp-") as tmp:
        for rank in range(nproc):
            env = dict(os.environ)
            env.update(
                {
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(nproc),
                    "LOCAL_WORLD_SIZE": str(nproc),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                    "TORCHELASTIC_USE_AGENT_STORE": "True",
                }
            )
            env.setdefault("OMP_NUM_THREADS", str(threads))
            cmd = [sys.executable, "-m", "mtlrec.cli", *args]
            if rank == 0:
                procs.append(subprocess.Popen(cmd, env=env))
            else:
                log = open(Path(tmp) / f"rank{rank}.log", "wb")  # noqa: SIM115
                logs.append(log)
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        try:
            while True:
                codes = [p.poll() for p in procs]
                failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
                if failed or all(c == 0 for c in codes):
                    break
                time.sleep(poll)
            if failed:  # the others usually fail on the same input: let them say so first
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                    time.sleep(poll)
        except KeyboardInterrupt:
            failed = [0]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        if not failed:
            return 0
        codes = [p.returncode for p in procs]
        if codes[0] not in (0, None) and codes[0] > 0:
            return codes[0]  # rank 0 printed its own error
        first = (
            next(i for i, c in enumerate(codes) if c not in (0, None) and c > 0)
            if any(c is not None and c > 0 for c in codes)
            else failed[0]
        )
        code = codes[first]
        if first == 0:  # rank 0 ended by a signal: its output is on the terminal
            return 1
        text = (Path(tmp) / f"rank{first}.log").read_text(errors="replace").strip()
        tail = text.splitlines()[-1] if text else f"exit status {code}"
        tail = tail.removeprefix("error: ")
        print(f"error: process {first} of {nproc} failed: {tail}", file=sys.stderr)
        return code if code and code > 0 else 1
