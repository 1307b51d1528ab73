"""The training step's non-finite gradient guard (issue 12.4): every step, with or without
gradient clipping, naming the parameter and the task (or the combination) behind the value."""

from __future__ import annotations

import pytest
import torch

from mtlrec.errors import TrainingError
from mtlrec.losses import MultiTaskLoss
from mtlrec.models import build_model
from mtlrec.models.base import ModelOutput
from mtlrec.testing import tiny_dataset
from mtlrec.train.step import StepContext, gradients_finite, train_step
from mtlrec.weighting import build_weighting


class _NaNGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss with a broken derivative)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad * float("nan")


def _setup(grad_clip: float | None = None, poison: str | None = None):
    pre, ds = tiny_dataset(n=64)
    torch.manual_seed(0)
    model = build_model(
        "shared_bottom", ds.schema, pre.table_sizes(), {"bottom_hidden": [8], "tower_hidden": [4]}
    )
    if poison is not None:

        def hook(module: torch.nn.Module, args: tuple, out: ModelOutput) -> ModelOutput:
            out.logits = {**out.logits, poison: _NaNGradient.apply(out.logits[poison])}
            return out

        model.register_forward_hook(hook)
    strategy = build_weighting("static", model.loss_task_names)
    ctx = StepContext(
        model,
        MultiTaskLoss(ds.schema.tasks),
        strategy,
        torch.optim.SGD(model.parameters(), lr=0.01),  # type: ignore[arg-type]
        grad_clip=grad_clip,
    )
    return model, ctx, ds.take(slice(0, 64))


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_nonfinite_gradient_of_one_task_is_caught_and_named(grad_clip: float | None) -> None:
    model, ctx, batch = _setup(grad_clip, poison="watch")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainingError) as e:
        train_step(ctx, batch, where="at epoch 3, batch 7")
    msg = str(e.value)
    assert "non-finite gradient at epoch 3, batch 7" in msg
    assert "task 'watch' alone" in msg and "'click'" not in msg.split("(losses")[0], msg
    names = [n for n, _ in model.named_parameters()]
    assert any(f"'{n}'" in msg for n in names), msg
    assert "'heads.towers.click" not in msg  # the click tower's gradient is finite
    assert "inputs" not in msg  # the data is not to blame: its loss is finite
    # nothing was updated with the broken gradient
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)


def test_nonfinite_gradient_from_the_combination_blames_the_strategy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, ctx, batch = _setup()

    def nan_weights(losses: torch.Tensor, jacobian: torch.Tensor | None = None) -> torch.Tensor:
        return torch.full_like(losses, float("nan"))

    monkeypatch.setattr(ctx.strategy, "weights", nan_weights)
    with pytest.raises(TrainingError) as e:
        train_step(ctx, batch, where="at step 1")
    msg = str(e.value)
    assert "non-finite gradient at step 1" in msg
    assert "every task's own gradient is finite" in msg and "Static" in msg, msg


def test_a_finite_step_passes_the_guard() -> None:
    model, ctx, batch = _setup(poison=None)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(ctx, batch)
    assert any(
        not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True)
    )


def test_gradients_finite_is_exact_for_dense_and_sparse() -> None:
    big = torch.tensor([3e38, -3e38, 1.0])  # finite, though its sum or L2 norm overflows
    assert gradients_finite([big, torch.ones(2, 2, dtype=torch.float64)])
    assert gradients_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not gradients_finite([torch.ones(3), torch.tensor([0.0, bad])])
        sparse = torch.sparse_coo_tensor(
            torch.tensor([[0, 2]]),
            torch.tensor([[1.0, 2.0], [bad, 0.0]]),
            (4, 2),
            check_invariants=True,
        )
        assert not gradients_finite([torch.ones(3), sparse])
    ok = torch.sparse_coo_tensor(
        torch.tensor([[1]]), torch.tensor([[1.0, 2.0]]), (4, 2), check_invariants=True
    )
    assert gradients_finite([ok])
