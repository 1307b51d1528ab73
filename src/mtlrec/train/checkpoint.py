"""Checkpoints: one safetensors file, written atomically, loaded without unpickling.

A checkpoint holds the model's weights, the balancing strategy's state, the optimiser's state,
the torch RNG state and the trainer's position (epoch, batch within the epoch, best value so
far), with JSON metadata: format version, schema fingerprint and model name, so that a
checkpoint of another schema or version is refused with a clear message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim import Optimizer

from mtlrec.errors import CheckpointError
from mtlrec.utils.atomic import atomic_path

CHECKPOINT_VERSION = "1"


@dataclass
class Checkpoint:
    """A checkpoint's content, split by owner."""

    model: dict[str, torch.Tensor]
    strategy: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    rng: torch.Tensor | None
    meta: dict[str, Any]


def _optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    return tensors, meta


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def optimizer_param_names(
    optimizer: Optimizer, model: nn.Module, strategy: nn.Module | None = None
) -> list[str]:
    """The name of the parameter at each index of ``optimizer.state_dict()`` (the groups'
    parameters end to end): ``model.<name>`` or ``strategy.<name>`` (``?`` for others)."""
    names = {id(p): f"model.{n}" for n, p in model.named_parameters()}
    if strategy is not None:
        names.update({id(p): f"strategy.{n}" for n, p in strategy.named_parameters()})
    return [names.get(id(p), "?") for g in optimizer.param_groups for p in g["params"]]


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    strategy: nn.Module | None = None,
    optimizer: Optimizer | None = None,
    meta: dict[str, Any] | None = None,
    save_rng: bool = True,
) -> None:
    """Write a checkpoint atomically (temporary file, fsync, rename)."""
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()
    }
    if strategy is not None:
        tensors.update(
            {
                f"strategy.{k}": v.detach().cpu().contiguous()
                for k, v in strategy.state_dict().items()
            }
        )
    info: dict[str, Any] = {"version": CHECKPOINT_VERSION, **(meta or {})}
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer.state_dict())
        tensors.update(opt_tensors)
        # the name of the parameter behind each state index: a warm start carries the state
        # to another model by name (mtlrec.train.remap)
        opt_meta["param_names"] = optimizer_param_names(optimizer, model, strategy)
        info["optimizer"] = opt_meta
    if save_rng:
        tensors["rng.torch"] = torch.get_rng_state()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"mtlrec": json.dumps(info)})


def load_training_state(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """The balancing strategy's state, the optimiser's state and the metadata of a checkpoint
    (reads those tensors only, not the weights; no pickle): what a warm start carries over.

    Raises:
        CheckpointError: unreadable or not an mtlrec checkpoint.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("mtlrec", "{}"))
            keys = list(f.keys())
            strategy = {k[9:]: f.get_tensor(k) for k in keys if k.startswith("strategy.")}
            opt = {k: f.get_tensor(k) for k in keys if k.startswith("optim.")}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e})") from None
    optimizer = _optimizer_from_flat(opt, meta["optimizer"]) if "optimizer" in meta else None
    return strategy, optimizer, meta


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint (no pickle involved).

    Raises:
        CheckpointError: missing, truncated, corrupt, or not an mtlrec checkpoint; for a
            truncated or corrupt one the message says how to recover (the run folder's other
            checkpoint when it loads, else retraining).
    """
    p = Path(path)
    try:
        return _load(p)
    except _Unreadable as e:
        raise CheckpointError(f"{e}; {_recovery(p)}") from None


class _Unreadable(CheckpointError):
    """A checkpoint file that exists but cannot be read (truncated, corrupt)."""


_OTHER = {"best.safetensors": "last.safetensors", "last.safetensors": "best.safetensors"}


def _recovery(p: Path) -> str:
    """How to recover from an unreadable checkpoint ``p``: its run folder's other checkpoint
    if that one loads, else retraining."""
    run = p.parent.parent if p.parent.name == "checkpoints" else None
    if run is not None and (run / "config.yaml").is_file():
        retrain = f"retrain with: mtlrec train {run / 'config.yaml'} --output {run} --overwrite"
    else:
        retrain = "retrain with: mtlrec train CONFIG --overwrite"
    other = p.with_name(_OTHER[p.name]) if p.name in _OTHER else None
    if other is None or not other.is_file():
        return f"to recover, {retrain}"
    try:
        epoch = _load(other).meta.get("trainer", {}).get("epoch")
    except CheckpointError:
        return f"the other checkpoint, {other}, does not load either; to recover, {retrain}"
    after = f" (epoch {epoch})" if epoch is not None else ""
    if p.name == "best.safetensors":
        use = (
            f"{other} loads: the weights after the last epoch trained{after}, not the one "
            f"selected on validation; to score with them, copy it over {p}"
        )
    else:
        use = (
            f"{other} loads: the state after the best epoch{after}; to resume training from "
            f"that epoch, copy it over {p}"
        )
    return f"to recover: {use}; or {retrain}"


def _load(p: Path) -> Checkpoint:
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} not found")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            raw_meta = f.metadata() or {}
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _Unreadable(
            f"checkpoint {p} is corrupt or truncated ({str(e).splitlines()[0]})"
        ) from None
    if "mtlrec" not in raw_meta:
        raise CheckpointError(f"{p} is not an mtlrec checkpoint (no mtlrec metadata)")
    try:
        meta = json.loads(raw_meta["mtlrec"])
    except json.JSONDecodeError:
        raise _Unreadable(f"checkpoint {p} has corrupt metadata") from None
    if str(meta.get("version")) != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {p} has format version {meta.get('version')!r}; this mtlrec reads "
            f"version {CHECKPOINT_VERSION}"
        )
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    strategy = {k[9:]: v for k, v in tensors.items() if k.startswith("strategy.")}
    opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    optimizer = (
        _optimizer_from_flat(opt_tensors, meta["optimizer"]) if "optimizer" in meta else None
    )
    return Checkpoint(model, strategy, optimizer, tensors.get("rng.torch"), meta)


def restore_model(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load weights, refusing a mismatch with a message naming the first difference."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{source}: weights do not fit this model ({what})")
    for k, v in own.items():
        if v.shape != state[k].shape:
            raise CheckpointError(
                f"{source}: weight {k} has shape {tuple(state[k].shape)}, the model expects "
                f"{tuple(v.shape)} (another schema or vocabulary?)"
            )
    model.load_state_dict(state)
