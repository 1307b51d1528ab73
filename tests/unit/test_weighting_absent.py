"""A task with no valid row in a batch is absent for that step, for every strategy (issue 12.5).

Its loss is exactly 0 by design (``mtlrec.losses``), which must not steer any strategy: the
step of a strategy over tasks (a, b, c) on batches where c has no row must equal, parameter for
parameter and weight for weight, the step of the same strategy over (a, b) alone, and nothing
may be recorded for c (every per-task entry of the strategy's state stays at its initial value).
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from mtlrec.batch import Batch
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.preprocess import Preprocessor
from mtlrec.losses import MultiTaskLoss
from mtlrec.models import build_model
from mtlrec.models.base import MultiTaskModel
from mtlrec.registry import WEIGHTINGS
from mtlrec.schema import DenseFeature, Schema, SparseFeature, TaskSpec
from mtlrec.train.step import StepContext, train_step
from mtlrec.weighting import build_weighting
from mtlrec.weighting.base import Weighting

TASKS3 = ("a", "b", "c")  # c is masked by a: a batch with a == 0 everywhere has no c row
TASKS2 = ("a", "b")
MODEL = {"num_experts": 3, "expert_hidden": (8, 6), "tower_hidden": (4,)}

# per-strategy options for the (a, b, c) strategy; the (a, b) one gets the same without c
PARAMS: dict[str, dict[str, Any]] = {
    "static": {"weights": {"a": 2.0, "b": 0.5, "c": 3.0}},
    "pe_ltr": {"bounds": {"a": 0.2, "b": 0.1, "c": 0.3}},
    "dwa": {"unit": "steps"},  # windows close every step: the weights use the history
    "mgda": {"scale": "num_tasks"},
}
CASES = [(n, PARAMS.get(n, {})) for n in WEIGHTINGS.names()]
CASES += [("famo", {"update": "next_batch"}), ("mgda", {"normalization": "loss+"})]


def without_c(params: dict[str, Any]) -> dict[str, Any]:
    return {
        k: ({t: v for t, v in val.items() if t != "c"} if isinstance(val, dict) else val)
        for k, val in params.items()
    }


@cache
def data() -> tuple[Preprocessor, ColumnarDataset]:
    rng = np.random.default_rng(0)
    n = 160
    user, item, price = rng.integers(0, 10, n), rng.integers(0, 12, n), rng.normal(size=n)
    a = (rng.random(n) < 0.5).astype(np.int64)
    table = pa.table(
        {
            "user": pa.array([f"u{u}" for u in user]),
            "item": pa.array([f"i{i}" for i in item]),
            "price": pa.array(price),
            "a": pa.array(a),
            "b": pa.array((price + 0.3 * rng.normal(size=n) > 0).astype(np.int64)),
            "c": pa.array(a * (item % 2)),
        }
    )
    schema = Schema(
        features=(
            SparseFeature(name="user", embedding_dim=4),
            SparseFeature(name="item", embedding_dim=4),
            DenseFeature(name="price"),
        ),
        tasks=(
            TaskSpec(name="a", kind="binary"),
            TaskSpec(name="b", kind="binary"),
            TaskSpec(name="c", kind="binary", mask="a"),
        ),
    )
    pre = Preprocessor.fit(schema, table)
    return pre, pre.encode(table)


def batches_without_c(k: int = 4, rows: int = 16) -> list[Batch]:
    _, ds = data()
    no_a = torch.nonzero(ds.take(slice(0, len(ds))).labels["a"] == 0).squeeze(1)
    out = [ds.take(no_a[i * rows : (i + 1) * rows]) for i in range(k)]
    for b in out:  # the premise: c has no valid row, a and b have every row
        assert not bool(b.masks["c"].any()) and bool(b.masks["a"].all())
    return out


def context(
    model: MultiTaskModel, name: str, tasks: tuple[str, ...], params: dict[str, Any]
) -> StepContext:
    specs = [t for t in data()[0].schema.tasks if t.name in tasks]
    strategy = build_weighting(name, tasks, params)
    groups = [{"params": list(model.parameters())}]
    own = [p for p in strategy.parameters() if p.requires_grad]
    if own:
        groups.append({"params": own})
    return StepContext(model, MultiTaskLoss(specs), strategy, torch.optim.SGD(groups, lr=0.05))


def model3() -> MultiTaskModel:
    pre, _ = data()
    torch.manual_seed(0)
    return build_model("mmoe", pre.schema, pre.table_sizes(), MODEL)


def per_task_state(strategy: Weighting, task: int) -> dict[str, torch.Tensor]:
    """Every entry of the strategy's state with a task axis (the last), at task ``task``."""
    t = strategy.num_tasks
    return {
        k: v[..., task].detach().clone()
        for k, v in strategy.state_dict().items()
        if v.dim() >= 1 and v.shape[-1] == t
    }


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_a_step_without_rows_of_a_task_equals_the_step_without_that_task(
    name: str, params: dict[str, Any]
) -> None:
    m3 = model3()
    m2 = copy.deepcopy(m3)
    ctx3 = context(m3, name, TASKS3, params)
    ctx2 = context(m2, name, TASKS2, without_c(params))
    fresh_c = per_task_state(ctx3.strategy, 2)
    for step, batch in enumerate(batches_without_c()):
        r3 = train_step(ctx3, batch)
        r2 = train_step(ctx2, batch)
        assert r3.present is not None and r3.present.tolist() == [True, True, False]
        assert float(r3.weights[2]) == 0.0, f"{name}: the absent task has a weight"
        torch.testing.assert_close(
            r3.weights[:2], r2.weights, rtol=1e-5, atol=1e-6, msg=f"{name}: weights, {step}"
        )
        for (k, p3), p2 in zip(m3.named_parameters(), m2.parameters(), strict=True):
            torch.testing.assert_close(
                p3, p2, rtol=1e-5, atol=1e-6, msg=f"{name}: {k} after step {step}"
            )
    # nothing recorded for c: every per-task entry of the state is still the initial one
    for k, v in per_task_state(ctx3.strategy, 2).items():
        torch.testing.assert_close(v, fresh_c[k], rtol=0, atol=0, msg=f"{name}: {k}[c] moved")


def test_gradnorm_records_the_initial_loss_of_a_task_at_its_first_batch_with_rows() -> None:
    ctx = context(model3(), "gradnorm", TASKS3, {})
    first = batches_without_c(1)[0]
    train_step(ctx, first)
    initial = ctx.strategy.initial.clone()  # type: ignore[union-attr]
    assert float(initial[2]) == 0.0 and bool((initial[:2] > 0).all())
    _, ds = data()
    with_c = ds.take(slice(0, 32))
    assert bool(with_c.masks["c"].any())
    res = train_step(ctx, with_c)
    after = ctx.strategy.initial  # type: ignore[union-attr]
    torch.testing.assert_close(after[:2], initial[:2], rtol=0, atol=0)  # recorded once
    assert float(after[2]) == pytest.approx(float(res.losses[2]), rel=1e-6)
    assert float(after[2]) > 1e-3  # a real loss, not the 1e-12 of an empty batch


def test_no_task_present_trains_nothing_and_records_nothing() -> None:
    _, ds = data()
    empty = ds.take(slice(0, 8))
    for t in TASKS3:
        empty.masks[t] = torch.zeros_like(empty.masks[t])
    for name in ("famo", "gradnorm", "mgda", "dwa"):
        model = model3()
        before = [p.detach().clone() for p in model.parameters()]
        ctx = context(model, name, TASKS3, PARAMS.get(name, {}))
        state = {k: v.clone() for k, v in ctx.strategy.state_dict().items()}
        res = train_step(ctx, empty)
        assert res.weights.tolist() == [0.0, 0.0, 0.0]
        for p, b in zip(model.parameters(), before, strict=True):
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
        for k, v in ctx.strategy.state_dict().items():
            if k not in ("units", "adam_step", "step"):
                torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=f"{name}: {k}")


def test_checkpoints_of_the_scalar_state_layout_still_load() -> None:
    """DWA's step count and FAMO's has-previous flag became per task (so that an absent task's
    count and history stay apart); a state saved with the scalar forms loads into them."""
    dwa = build_weighting("dwa", TASKS3, {"unit": "steps"})
    for loss in ([1.0, 2.0, 3.0], [0.5, 1.0, 2.0], [0.4, 0.9, 1.0]):
        dwa.on_step_end(torch.tensor(loss))
    state = dwa.state_dict()
    old = {k: v for k, v in state.items() if k != "recorded"}
    old["count"] = torch.tensor(0)  # scalar, before per-task counts
    loaded = build_weighting("dwa", TASKS3, {"unit": "steps"})
    loaded.load_state_dict(old)
    assert loaded.count.tolist() == [0, 0, 0] and loaded.recorded.tolist() == [2, 2, 2]
    torch.testing.assert_close(loaded.weights(torch.ones(3)), dwa.weights(torch.ones(3)))
    famo = build_weighting("famo", TASKS3, {"update": "next_batch"})
    famo.on_step_end(torch.tensor([1.0, 2.0, 3.0]))
    old = dict(famo.state_dict())
    old["has_prev"] = torch.tensor(True)
    loaded = build_weighting("famo", TASKS3, {"update": "next_batch"})
    loaded.load_state_dict(old)
    assert loaded.has_prev.tolist() == [True, True, True]
