"""Train ``R`` independent runs of one model side by side, as one vectorised computation.

The ``R`` models' parameters are stacked along a leading "run" dimension
(:func:`torch.func.stack_module_state`); one step computes every run's losses with
:func:`torch.func.vmap` over :func:`torch.func.functional_call`, the gradients with one ordinary
backward pass through the batched ops (the runs are independent, so the gradient of the summed
losses with respect to run ``r``'s parameters is run ``r``'s gradient), and updates all runs with
one Adam step on the stacked tensors. The result equals ``R`` separate
runs with the same initial weights and batches (a test checks it), at the cost of a few large
batched matmuls instead of ``R`` times as many small ones.

Scope: dense-only inputs and regression tasks with the mean squared error, equal task weights
(the MMoE paper's synthetic study); every row is in every task's sample space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.models.base import MultiTaskModel


class VectorizedRuns:
    """``R`` copies of one architecture (different initial weights), trained with Adam.

    Args:
        models: the ``R`` initialised models (same class and shapes).
        lr, betas, eps: Adam's settings (Kingma & Ba, 2015; the update of ``torch.optim.Adam``
            without weight decay).

    Shapes:
        dense inputs: ``[R, B, d]`` (each run its own rows) or ``[B, d]`` (shared);
        labels: ``[R, B, T]`` or ``[B, T]`` in the models' task order.
    """

    def __init__(
        self,
        models: Sequence[MultiTaskModel],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if not models:
            raise ConfigError("VectorizedRuns needs at least one model")
        if any(t.kind != "regression" for t in models[0].tasks):
            raise ConfigError("VectorizedRuns trains regression tasks only (MSE)")
        self.base = models[0]
        self.tasks = models[0].task_names
        self.dense_names = tuple(models[0].layout.dense)
        params, buffers = stack_module_state(list(models))
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.buffers = {k: v.detach().clone() for k, v in buffers.items()}
        self.exp_avg = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.lr, self.betas, self.eps = lr, betas, eps
        self.steps = 0
        self.num_runs = len(models)
        self._eval = vmap(self._task_losses, in_dims=(0, 0, 0, 0))
        self._eval_shared = vmap(self._task_losses, in_dims=(0, 0, None, None))

    def _task_losses(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], dense: Tensor, labels: Tensor
    ) -> Tensor:
        feats = Features(
            sparse=torch.zeros(dense.shape[0], 0, dtype=torch.int32),
            dense=dense,
            dense_names=self.dense_names,
        )
        out = functional_call(self.base, (params, buffers), (feats,))
        return torch.stack(
            [((out.logits[t] - labels[:, j]) ** 2).mean() for j, t in enumerate(self.tasks)]
        )

    def step(self, dense: Tensor, labels: Tensor) -> Tensor:
        """One Adam step of every run; returns the batch's per-task losses ``[R, T]``."""
        self.base.train()
        # forward vmapped over the run dimension; backward by ordinary autograd through the
        # batched ops (the runs are independent, so d(sum of losses)/d(run r's parameters) is
        # run r's gradient); faster than vmap(grad(...)), which wraps every op twice
        fn = self._eval if dense.dim() == 3 else self._eval_shared
        leaves = {k: v.requires_grad_(True) for k, v in self.params.items()}
        losses = fn(leaves, self.buffers, dense, labels)  # [R, T]
        grads = dict(
            zip(
                leaves,
                torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True),
                strict=True,
            )
        )
        for k, v in self.params.items():
            v.requires_grad_(False)
            if grads[k] is None:
                grads[k] = torch.zeros_like(v)
        losses = losses.detach()
        self.steps += 1
        b1, b2 = self.betas
        bc1 = 1 - b1**self.steps
        bc2 = 1 - b2**self.steps
        with torch.no_grad():
            for k, p in self.params.items():
                g = grads[k]
                m, v = self.exp_avg[k], self.exp_avg_sq[k]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
                p.addcdiv_(m, denom, value=-self.lr / bc1)
        return losses

    @torch.no_grad()
    def evaluate(self, dense: Tensor, labels: Tensor, *, block: int = 8192) -> Tensor:
        """Per-task MSE of every run ``[R, T]`` (rows in blocks, weighted by block size)."""
        self.base.eval()
        shared = dense.dim() == 2
        n = dense.shape[-2]
        total = torch.zeros(self.num_runs, len(self.tasks), dtype=torch.float64)
        for lo in range(0, n, block):
            hi = min(lo + block, n)
            if shared:
                d, y = dense[lo:hi], labels[lo:hi]
                part = self._eval_shared(self.params, self.buffers, d, y)
            else:
                d, y = dense[:, lo:hi], labels[:, lo:hi]
                part = self._eval(self.params, self.buffers, d, y)
            total += part.to(torch.float64) * (hi - lo)
        return total / max(n, 1)

    def run_state(self, r: int) -> dict[str, Tensor]:
        """Run ``r``'s parameters, keyed as the model's ``state_dict``."""
        return {k: v[r].detach().clone() for k, v in self.params.items()}
