"""Where the trainer computes and in which precision (``training.device``,
``training.precision``).

The trainer owns placement: it resolves the device once (:func:`resolve_device`), moves the
model there once and every batch as it comes (:func:`move_batch`: pinned host memory and a
non-blocking copy to a GPU); the forward pass runs under :func:`autocast` in one place
(:mod:`mtlrec.train.step`) and its outputs are brought back to float32
(:func:`float_output`) before losses and metrics. Nothing else in mtlrec calls ``.cuda()`` or
reads a device from a global. Checkpoints are written from CPU copies and loaded on the CPU, and
metrics are computed on CPU tensors, so a run trained on a GPU evaluates, exports and serves on
a machine without one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import torch
from torch import Tensor

from mtlrec.batch import Batch, Features
from mtlrec.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """The device of ``training.device``.

    ``auto``: CUDA when torch sees a GPU, else the CPU. ``cuda`` selects the GPU of this
    process's ``LOCAL_RANK`` (0 in one process).

    Raises:
        ConfigError: ``cuda`` asked for on a machine where torch sees no GPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ConfigError(f"training.device: {name!r} is not auto, cpu or cuda")
    if not torch.cuda.is_available():
        raise ConfigError(
            "training.device: cuda, but torch sees no GPU here (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use "
            "device: auto or cpu"
        )
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def dist_backend(device: torch.device) -> str:
    """The collective backend for a device: nccl for GPUs, gloo for the CPU (overridden by
    ``MTLREC_DIST_BACKEND``)."""
    return os.environ.get("MTLREC_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse a precision the device's autocast does not offer.

    Raises:
        ConfigError: an unknown precision.
    """
    if precision not in ("fp32", *_DTYPES):
        raise ConfigError(f"training.precision: {precision!r} is not fp32, bf16 or fp16")
    if precision != "fp32" and not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"training.precision: {precision}: no autocast on {device.type}")


def autocast(device: torch.device | None, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's autocast context (a no-op for fp32).

    Example:
        >>> import torch
        >>> with autocast(torch.device("cpu"), "bf16"):
        ...     y = torch.nn.Linear(4, 2)(torch.ones(1, 4))
        >>> y.dtype
        torch.bfloat16
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    kind = device.type if device is not None else "cpu"
    return torch.autocast(kind, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16's loss scaler (None for fp32 and bf16, whose range needs none)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def _move(t: Tensor, device: torch.device) -> Tensor:
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def move_features(features: Features, device: torch.device | None) -> Features:
    """Features on ``device`` (pinned host memory, non-blocking copies to a GPU); the same
    object when it is there already."""
    if device is None or features.sparse.device == device:
        return features
    return Features(
        _move(features.sparse, device),
        _move(features.dense, device),
        {k: _move(v, device) for k, v in features.sequences.items()},
        features.sparse_names,
        features.dense_names,
    )


def move_batch(batch: Batch, device: torch.device | None) -> Batch:
    """A batch on ``device`` (see :func:`move_features`)."""
    if device is None or batch.features.sparse.device == device:
        return batch
    return Batch(
        move_features(batch.features, device),
        {k: _move(v, device) for k, v in batch.labels.items()},
        {k: _move(v, device) for k, v in batch.masks.items()},
        {k: _move(v, device) for k, v in batch.weights.items()},
        None if batch.groups is None else _move(batch.groups, device),
    )


def float_output(output: Any, *, cpu: bool = False) -> Any:
    """A :class:`~mtlrec.models.base.ModelOutput` with its floating tensors in float32 (and on
    the CPU with ``cpu``), for losses and metrics after an autocast forward. A tensor shared by
    several entries (one representation read by every tower) stays shared."""
    seen: dict[int, Tensor] = {}

    def conv(t: Tensor) -> Tensor:
        if id(t) not in seen:
            u = t.float() if t.is_floating_point() else t
            seen[id(t)] = u.cpu() if cpu else u
        return seen[id(t)]

    def conv_all(d: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: conv(v) for k, v in d.items()}

    return dataclasses.replace(
        output,
        logits=conv_all(output.logits),
        log_probs=conv_all(output.log_probs),
        gates=conv_all(output.gates),
        tower_inputs={} if cpu else conv_all(output.tower_inputs),
        aux_losses=conv_all(output.aux_losses),
    )


def needs_float(device: torch.device | None, precision: str) -> bool:
    """Whether outputs must be converted (:func:`float_output`) before losses or metrics."""
    return precision != "fp32" or (device is not None and device.type != "cpu")
