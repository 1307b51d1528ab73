"""The checkpoint remap of a warm start: an earlier model's weights (and optimiser state) put
into a new model whose tables grew and whose tasks may differ.

:func:`plan_remap` pairs every parameter of the new model with the earlier model's:

* **Shared parameters** (everything no task owns) pair in order, and must have the same shape,
  except embedding tables, whose rows may only grow.
* **A kept task's own parameters** (:meth:`~mtlrec.models.base.MultiTaskModel.
  task_group_parameters`: its tower, gates, task experts) pair in order, same shapes.
* **An added task's own parameters** start fresh (the new model's initialisation).
* A removed task's parameters are left behind.

Pairing by role rather than by name keeps positional names right: PLE's shared expert group is
``groups.2`` with two tasks and ``groups.3`` with three. A shape that differs anywhere else is
an architecture change and an error naming the parameter.

**Embedding tables** (:class:`~mtlrec.nn.embedding.EmbeddingCollection`: tables of equal width
fused into one weight with per-table row offsets): a grown vocabulary keeps every old value at
its id (:mod:`mtlrec.data.vocab_growth`), so a table's old rows are a prefix of its new rows.
Each table's old rows are copied to the table's new offset (the offsets of the tables after a
grown one move); the rows past them keep the new model's initialisation. Optimiser state
tensors shaped like a table are re-indexed the same way, with zeros in the new rows (fresh
Adam moments).

Example:
    >>> import torch
    >>> from mtlrec.testing import tiny_dataset
    >>> from mtlrec.models import build_model
    >>> pre, ds = tiny_dataset(40)
    >>> old = build_model("mmoe", ds.schema, pre.table_sizes(), {"expert_hidden": [8]})
    >>> sizes = {k: v + 3 for k, v in pre.table_sizes().items()}  # every table grew by 3
    >>> new = build_model("mmoe", ds.schema, sizes, {"expert_hidden": [8]})
    >>> plan = plan_remap(old, new)
    >>> plan.apply_weights(new, old.state_dict())
    >>> w_old, w_new = old.embedding.table_weight("user"), new.embedding.table_weight("user")
    >>> bool(torch.equal(w_new[: len(w_old)], w_old))
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mtlrec.errors import CheckpointError
from mtlrec.models.base import MultiTaskModel
from mtlrec.nn.embedding import EmbeddingCollection

SHARED = ""
"""The owner of shared parameters."""


@dataclass(frozen=True)
class Segment:
    """Rows of one table: ``rows`` rows at ``old`` in the earlier weight go to ``new``."""

    table: str
    old: int
    new: int
    rows: int


@dataclass(frozen=True)
class Pair:
    """A parameter of the new model and its earlier counterpart.

    ``segments`` is set for fused embedding weights (row copy), empty for a plain copy.
    """

    new: str
    old: str
    old_shape: tuple[int, ...]
    segments: tuple[Segment, ...] = ()

    def remap(self, old: Tensor, template: Tensor) -> Tensor:
        """``old`` (shaped like the earlier parameter) in the new parameter's shape: a copy, or
        for an embedding weight ``template`` (a clone) with the old rows put at their new
        offsets.

        Shapes:
            ``old``: ``old_shape``; ``template`` and the result: the new parameter's shape.
        """
        if not self.segments:
            return old.detach().clone().to(template.dtype)
        out = template.detach().clone()
        for s in self.segments:
            out[s.new : s.new + s.rows] = old[s.old : s.old + s.rows].to(out.dtype)
        return out


@dataclass
class RemapPlan:
    """How the new model's parameters come from the earlier model's.

    Attributes:
        pairs: new parameter name -> its :class:`Pair`.
        fresh: new parameters with no counterpart (an added task's own).
        left: earlier parameters with no counterpart (a removed task's own).
        added_tasks, removed_tasks, kept_tasks: the task sets compared.
        grown: table -> ``(rows before, rows after)`` for every table that grew.
    """

    pairs: dict[str, Pair] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    added_tasks: list[str] = field(default_factory=list)
    removed_tasks: list[str] = field(default_factory=list)
    kept_tasks: list[str] = field(default_factory=list)
    grown: dict[str, tuple[int, int]] = field(default_factory=dict)
    buffers: list[str] = field(default_factory=list)

    @torch.no_grad()
    def apply_weights(self, model: nn.Module, old_state: Mapping[str, Tensor]) -> None:
        """Copy the earlier weights (a ``state_dict``) into ``model`` in place; fresh
        parameters keep their values. Persistent buffers of the same name and shape are
        copied too."""
        params = dict(model.named_parameters())
        for name, pair in self.pairs.items():
            p = params[name]
            p.copy_(pair.remap(old_state[pair.old], p))
        for name in self.buffers:
            model.get_buffer(name).copy_(old_state[name])

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept_tasks": self.kept_tasks,
            "added_tasks": self.added_tasks,
            "removed_tasks": self.removed_tasks,
            "fresh_parameters": self.fresh,
            "left_parameters": self.left,
            "grown_tables": {k: list(v) for k, v in self.grown.items()},
        }


def _owners(model: MultiTaskModel) -> dict[str, list[str]]:
    """Owner (a task, or :data:`SHARED`) -> its parameter names in the model's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    owner: dict[str, str] = {}
    for t in model.task_names:
        for p in model.task_group_parameters(t):
            owner.setdefault(names[id(p)], t)
    out: dict[str, list[str]] = {SHARED: [], **{t: [] for t in model.task_names}}
    for n in names.values():
        out[owner.get(n, SHARED)].append(n)
    return out


def _tables(model: nn.Module) -> dict[str, tuple[EmbeddingCollection, str]]:
    """Fused embedding weight name -> (its collection, its width key)."""
    out: dict[str, tuple[EmbeddingCollection, str]] = {}
    for path, m in model.named_modules():
        if isinstance(m, EmbeddingCollection):
            for key in m.tables:
                out[f"{path}.tables.{key}.weight" if path else f"tables.{key}.weight"] = (m, key)
    return out


def _segments(
    old: tuple[EmbeddingCollection, str], new: tuple[EmbeddingCollection, str], name: str
) -> tuple[Segment, ...]:
    (oc, okey), (nc, nkey) = old, new
    dim = int(nkey[1:])
    want = [t for t, d in nc.layout.table_dims.items() if d == dim]
    have = [t for t, d in oc.layout.table_dims.items() if d == int(okey[1:])]
    if want != have:
        raise CheckpointError(
            f"embedding weight {name}: it holds tables {have} in the earlier run and {want} "
            "here (the features or their embedding_dim differ)"
        )
    segs = []
    for t in want:
        before, after = oc.layout.table_sizes[t], nc.layout.table_sizes[t]
        if after < before:
            raise CheckpointError(
                f"embedding table {t!r} has {after} rows here, fewer than the earlier run's "
                f"{before}: a warm start only grows vocabularies"
            )
        segs.append(Segment(t, oc.table_offset[t], nc.table_offset[t], before))
    return tuple(segs)


def _differs(what: str, name: str, a: Sequence[int], b: Sequence[int], hint: str) -> str:
    return (
        f"{what} {name} has shape {list(a)} in the earlier run and {list(b)} here: the "
        f"architecture differs{hint}"
    )


def plan_remap(old: MultiTaskModel, new: MultiTaskModel) -> RemapPlan:
    """Pair the new model's parameters with the earlier model's (see the module notes).

    Args:
        old: the earlier model (its parameter names and shapes; the values are not read).
        new: the model to start.

    Returns:
        The :class:`RemapPlan`.

    Raises:
        CheckpointError: another model class, or a parameter whose shape or count differs
            (naming it), or a table that shrank.
    """
    if type(old) is not type(new):
        raise CheckpointError(
            f"the earlier run's model is {type(old).__name__}, this one {type(new).__name__}"
        )
    plan = RemapPlan()
    plan.kept_tasks = [t for t in new.task_names if t in old.task_names]
    plan.added_tasks = [t for t in new.task_names if t not in old.task_names]
    plan.removed_tasks = [t for t in old.task_names if t not in new.task_names]
    hint = ""
    if plan.added_tasks or plan.removed_tasks:
        hint = (
            f" (tasks changed: {type(new).__name__}'s shared parameters depend on the tasks, "
            "so it cannot add or remove a task by warm start; models whose shared part does "
            "not, such as mmoe, can)"
        )
    o_own, n_own = _owners(old), _owners(new)
    o_params, n_params = dict(old.named_parameters()), dict(new.named_parameters())
    o_tab, n_tab = _tables(old), _tables(new)
    for owner in [SHARED, *plan.kept_tasks]:
        a, b = o_own[owner], n_own[owner]
        what = "shared parameter" if owner == SHARED else f"task {owner!r}'s parameter"
        if len(a) != len(b):
            raise CheckpointError(
                f"{'the shared part' if owner == SHARED else f'task {owner!r}'} has {len(a)} "
                f"parameters in the earlier run and {len(b)} here: the architecture "
                f"differs{hint}"
            )
        for on, nn_ in zip(a, b, strict=True):
            oshape, nshape = tuple(o_params[on].shape), tuple(n_params[nn_].shape)
            if (on in o_tab) != (nn_ in n_tab):
                raise CheckpointError(_differs(what, nn_, oshape, nshape, hint))
            if nn_ in n_tab:
                if oshape[1:] != nshape[1:]:
                    raise CheckpointError(_differs(what, nn_, oshape, nshape, hint))
                segs = _segments(o_tab[on], n_tab[nn_], nn_)
                for s in segs:
                    after = n_tab[nn_][0].layout.table_sizes[s.table]
                    if after != s.rows:
                        plan.grown[s.table] = (s.rows, after)
                plan.pairs[nn_] = Pair(nn_, on, oshape, segs)
            elif oshape != nshape:
                raise CheckpointError(_differs(what, nn_, oshape, nshape, hint))
            else:
                plan.pairs[nn_] = Pair(nn_, on, oshape)
    for t in plan.added_tasks:
        plan.fresh += n_own[t]
    for t in plan.removed_tasks:
        plan.left += o_own[t]
    o_buf = dict(old.state_dict(keep_vars=True))
    for name, buf in new.named_buffers():
        ob = o_buf.get(name)
        if name in new.state_dict() and ob is not None and ob.shape == buf.shape:
            plan.buffers.append(name)
    return plan


def remap_optimizer_state(
    plan: RemapPlan,
    old_state: Mapping[str, Any],
    old_names: Sequence[str],
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    strategy: nn.Module | None = None,
    *,
    carry_strategy: bool = False,
) -> int:
    """Load the earlier optimiser state into ``optimizer`` for the parameters of ``plan``.

    Args:
        plan: the weights' plan.
        old_state: the earlier ``optimizer.state_dict()`` (``state`` by index).
        old_names: the parameter name of each earlier index
            (:func:`mtlrec.train.checkpoint.optimizer_param_names`).
        optimizer: the new optimiser (its own state is kept for parameters not carried).
        model, strategy: the new model and balancing strategy.
        carry_strategy: also carry the state of the strategy's parameters (same tasks).

    Returns:
        The number of parameter states carried.
    """
    names = {id(p): f"model.{n}" for n, p in model.named_parameters()}
    shapes = {f"model.{n}": p for n, p in model.named_parameters()}
    if strategy is not None:
        names.update({id(p): f"strategy.{n}" for n, p in strategy.named_parameters()})
        shapes.update({f"strategy.{n}": p for n, p in strategy.named_parameters()})
    index: dict[tuple[str, int], int] = {}
    seen: dict[str, int] = {}
    for i, n in enumerate(old_names):
        index[(n, seen.get(n, 0))] = i
        seen[n] = seen.get(n, 0) + 1
    sd = optimizer.state_dict()
    state = dict(sd["state"])
    carried = 0
    seen = {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        name = names.get(id(p), "?")
        k = seen.get(name, 0)
        seen[name] = k + 1
        if name.startswith("model."):
            pair = plan.pairs.get(name[6:])
            if pair is None:
                continue
            old_name: str = f"model.{pair.old}"
        elif name.startswith("strategy.") and carry_strategy:
            pair, old_name = None, name
        else:
            continue
        j = index.get((old_name, k))
        old = old_state.get("state", {}).get(j) if j is not None else None
        if not old:
            continue
        new: dict[str, Any] = {}
        for key, v in old.items():
            if isinstance(v, Tensor) and pair is not None and tuple(v.shape) == pair.old_shape:
                new[key] = pair.remap(v, torch.zeros_like(shapes[name], dtype=v.dtype))
            elif isinstance(v, Tensor) and pair is None and v.shape == shapes[name].shape:
                new[key] = v.detach().clone()
            elif isinstance(v, Tensor) and v.dim() == 0:
                new[key] = v.detach().clone()  # step counters
            elif isinstance(v, Tensor):
                break  # a state shaped unlike its parameter: leave this one fresh
            else:
                new[key] = v
        else:
            state[i] = new
            carried += 1
    sd["state"] = state
    optimizer.load_state_dict(sd)
    return carried


def parameter_owners(model: MultiTaskModel) -> dict[str, str]:
    """Parameter name -> the task that owns it (its tower, gates, task experts) or ``""``
    (shared), in the model's order."""
    return {n: owner for owner, names in _owners(model).items() for n in names}
