"""Gate analysis: expert utilisation per task, gate entropy over training, dead experts.

* **Expert utilisation** of a gate: the mean gate weight of each expert over a split (the PLE
  paper's expert-utilisation figure, Tang et al., RecSys 2020, Fig. 7). A row sums to 1.
* **Gate entropy**: ``H = -sum_e g_e log g_e`` of one row's gate weights (natural log),
  averaged over the rows. ``0`` is a one-hot gate, ``log E`` a uniform one.
  :class:`GateEntropyLogger` records it per gate and epoch, over the training batches, into
  the metrics log (``gate_entropy``, and ``gate_utilisation`` per expert).
* **Flags** (:func:`flag_experts`):
  - *dead expert*: its mean weight is below ``dead_fraction / E`` (default ``0.1 / E``: less
    than a tenth of its uniform share);
  - *collapsed gate*: one expert takes more than ``collapse_weight`` (default 0.9) of the mean
    weight, i.e. the gate is close to a fixed one-hot choice.
* **Routes** (SNR, Ma et al., AAAI 2019): a gate named ``route:<source>-><target>`` is one
  connection's ``(P(open), P(closed))``, ``P(open) = P(z != 0)`` of its hard-concrete variable.
  :func:`routing_matrices` gathers them into one matrix of open probabilities per routing layer
  (targets x sources); :func:`gate_flags` flags a route as closed instead of dead / collapsed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mtlrec.data.dataset import ColumnarDataset
from mtlrec.models.base import ModelOutput, MultiTaskModel
from mtlrec.nn.routing import ROUTE_PREFIX
from mtlrec.train.callbacks import Callback

if TYPE_CHECKING:
    from mtlrec.train.state import TrainState
    from mtlrec.train.trainer import Trainer

DEAD_FRACTION = 0.1
"""An expert is dead when its mean weight is below ``DEAD_FRACTION / num_experts``."""
COLLAPSE_WEIGHT = 0.9
"""A gate has collapsed when one expert's mean weight exceeds this."""


def gate_entropy(weights: Tensor) -> Tensor:
    """Entropy of each row of gate weights ``[B, E]`` (natural log; ``0 log 0 = 0``): ``[B]``."""
    w = weights.to(torch.float64)
    return -(torch.special.xlogy(w, w)).sum(dim=-1)


@torch.no_grad()
def expert_utilisation(
    model: MultiTaskModel, data: ColumnarDataset, *, batch_size: int = 8192
) -> dict[str, dict[str, Any]]:
    """Mean gate weight per expert, and mean gate entropy, of every gate over ``data``.

    Returns:
        gate name -> ``{"utilisation": [E floats, summing to 1], "entropy": float,
        "max_entropy": log E, "rows": N}``. Models without gates give ``{}``.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    ent: dict[str, float] = {}
    rows = 0
    try:
        for batch in data.batches(batch_size):
            out: ModelOutput = model(batch.features)
            for name, g in out.gates.items():
                g64 = g.detach().to(torch.float64)
                sums[name] = sums.get(name, torch.zeros(g.shape[-1], dtype=torch.float64))
                sums[name] += g64.sum(0)
                ent[name] = ent.get(name, 0.0) + float(gate_entropy(g64).sum())
            rows += len(batch)
    finally:
        model.train(was_training)
    if rows == 0:
        return {}
    return {
        name: {
            "utilisation": (s / rows).tolist(),
            "entropy": ent[name] / rows,
            "max_entropy": math.log(len(s)),
            "rows": rows,
        }
        for name, s in sums.items()
    }


def flag_experts(
    utilisation: list[float],
    *,
    dead_fraction: float = DEAD_FRACTION,
    collapse_weight: float = COLLAPSE_WEIGHT,
) -> dict[str, Any]:
    """Dead experts (indices) and whether the gate collapsed, from one gate's utilisation."""
    e = len(utilisation)
    if e == 0:
        return {"dead": [], "collapsed": False, "top": None}
    dead = [i for i, u in enumerate(utilisation) if u < dead_fraction / e]
    top = max(range(e), key=lambda i: utilisation[i])
    return {
        "dead": dead,
        "collapsed": bool(e > 1 and utilisation[top] > collapse_weight),
        "top": top,
        "dead_threshold": dead_fraction / e,
        "collapse_threshold": collapse_weight,
    }


CLOSED_PROBABILITY = 0.05
"""A route is reported closed when its mean ``P(open)`` is below this."""


def is_route(name: str) -> bool:
    """Whether gate ``name`` is a routing connection (``route:<source>-><target>``)."""
    return name.startswith(ROUTE_PREFIX) and "->" in name


def gate_flags(name: str, utilisation: list[float]) -> dict[str, Any]:
    """:func:`flag_experts` for an expert gate; for a route, its open probability and whether
    it is closed (``P(open) < CLOSED_PROBABILITY``), with no dead or collapsed flags."""
    if not is_route(name):
        return flag_experts(utilisation)
    p = float(utilisation[0])
    return {
        "dead": [],
        "collapsed": False,
        "top": None,
        "open": p,
        "closed": p < CLOSED_PROBABILITY,
    }


def routing_matrices(gates: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The routing gates of a gate summary as matrices of open probabilities.

    Args:
        gates: gate name -> ``{"utilisation": [P(open), P(closed)], ...}`` (as returned by
            :func:`expert_utilisation`, or a comparison's mean over seeds); other gates are
            ignored.

    Returns:
        One entry per routing layer, keyed ``"<source level> -> <target level>"`` (a source
        ``sub0.2`` is in level ``sub0``; tasks are the level ``towers``): ``{"sources": [...],
        "targets": [...], "open": [[P(open) or None per source] per target]}``. Empty without
        routing gates.

    Example:
        >>> g = {"route:sub0.0->a": {"utilisation": [0.9, 0.1]},
        ...      "route:sub0.1->a": {"utilisation": [0.2, 0.8]}}
        >>> routing_matrices(g)["sub0 -> towers"]["open"]
        [[0.9, 0.2]]
    """
    layers: dict[str, dict[tuple[str, str], float]] = {}
    for name, info in gates.items():
        if not is_route(name) or not info.get("utilisation"):
            continue
        src, dst = name[len(ROUTE_PREFIX) :].split("->", 1)
        level = src.rsplit(".", 1)[0]
        layers.setdefault(level, {})[(src, dst)] = float(info["utilisation"][0])
    out: dict[str, dict[str, Any]] = {}
    for level, conns in layers.items():
        sources = list(dict.fromkeys(s for s, _ in conns))
        targets = list(dict.fromkeys(t for _, t in conns))
        # targets in one level of sub-networks (sub1.0, sub1.1) or the task towers
        tl = {
            t.rsplit(".", 1)[0] if t.startswith("sub") and "." in t else "towers" for t in targets
        }
        out[f"{level} -> {tl.pop() if len(tl) == 1 else 'towers'}"] = {
            "sources": sources,
            "targets": targets,
            "open": [[conns.get((s, t)) for s in sources] for t in targets],
        }
    return out


class GateEntropyLogger(Callback):
    """Records, per epoch, the mean gate entropy and utilisation of every gate over the training
    batches, into the epoch's record (``gate_entropy``: gate -> float, ``gate_utilisation``:
    gate -> [E]), which the metrics log (``metrics.jsonl``) writes.

    It reads the model's outputs through a forward hook (training-mode calls only, so the
    validation pass is not counted); the cost is one entropy of ``[B, E]`` per gate and step.
    """

    def __init__(self) -> None:
        self._handle: Any = None
        self._ent: dict[str, float] = {}
        self._util: dict[str, Tensor] = {}
        self._rows: dict[str, int] = {}

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not module.training or not isinstance(output, ModelOutput):
            return
        for name, g in output.gates.items():
            g64 = g.detach().to(torch.float64)
            self._ent[name] = self._ent.get(name, 0.0) + float(gate_entropy(g64).sum())
            u = self._util.get(name)
            self._util[name] = g64.sum(0) if u is None else u + g64.sum(0)
            self._rows[name] = self._rows.get(name, 0) + g64.shape[0]

    def _reset(self) -> None:
        self._ent, self._util, self._rows = {}, {}, {}

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        self._reset()
        if self._handle is None:
            self._handle = trainer.model.register_forward_hook(self._hook)

    def on_epoch_start(self, trainer: Trainer, state: TrainState, num_batches: int) -> None:
        if state.batch_in_epoch == 0:
            self._reset()

    def on_epoch_record(self, trainer: Trainer, state: TrainState, record: dict[str, Any]) -> None:
        if self._rows:
            record["gate_entropy"] = {k: self._ent[k] / self._rows[k] for k in self._rows}
            record["gate_utilisation"] = {
                k: (self._util[k] / self._rows[k]).tolist() for k in self._rows
            }
        self._reset()

    def on_fit_end(self, trainer: Trainer, state: TrainState) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
