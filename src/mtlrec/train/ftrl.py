"""FTRL-Proximal: per-coordinate Follow-The-Regularized-Leader with L1 and L2.

McMahan et al., "Ad Click Prediction: a View from the Trenches", KDD 2013, Algorithm 1. Every
coordinate ``i`` keeps two numbers, ``z_i`` (the accumulated gradient, less the proximal
corrections) and ``n_i`` (the sum of its squared gradients); its weight is a closed form of the
two, so an L1 strength ``lambda1`` sets a weight to exactly zero while ``|z_i| <= lambda1``::

    sigma_i = (sqrt(n_i + g_i^2) - sqrt(n_i)) / alpha      (= 1/eta_t,i - 1/eta_t-1,i)
    z_i    <- z_i + g_i - sigma_i * w_i
    n_i    <- n_i + g_i^2
    w_i    <- 0                                                    if |z_i| <= lambda1
              -(z_i - sgn(z_i) lambda1) / ((beta + sqrt(n_i)) / alpha + lambda2)   otherwise

The per-coordinate learning rate is ``alpha / (beta + sqrt(n_i))``: rarely seen coordinates
(the rows of a sparse feature that few examples touch) move fast, frequent ones slowly.

``alpha`` is the parameter group's ``lr``, so ``torch.optim.lr_scheduler`` schedules scale it.
``w_i`` in the ``z`` update is the parameter's current value (a weight set from outside, e.g.
a non-zero initialisation, is taken as it is); after a step the parameter holds the closed form.
Sparse gradients (``nn.Embedding(sparse=True)``) update only the rows they touch; a dense
gradient that is zero on a row leaves that row's ``z`` and ``n`` unchanged too, and its weight
at the closed form of them, so dense and sparse gradients give the same result once every row
has been touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


def ftrl_update(
    w: Tensor,
    g: Tensor,
    z: Tensor,
    n: Tensor,
    *,
    alpha: float,
    beta: float,
    l1: float,
    l2: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One FTRL-Proximal step of some coordinates (McMahan et al., KDD 2013, Algorithm 1).

    Args:
        w: the coordinates' current weights.
        g: their gradients (same shape).
        z: their ``z`` accumulators.
        n: their sums of squared gradients.
        alpha: the learning-rate scale.
        beta: the learning-rate offset (``alpha / (beta + sqrt(n))`` is the rate).
        l1: the L1 strength ``lambda1`` (exact zeros while ``|z| <= l1``).
        l2: the L2 strength ``lambda2``.

    Returns:
        ``(z, n, w)`` after the step (new tensors).

    Example:
        >>> import torch
        >>> one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        >>> z, n, w = ftrl_update(zero, one, zero, zero, alpha=1.0, beta=1.0, l1=0.0, l2=0.0)
        >>> z.item(), n.item(), w.item()  # w = -z / ((beta + sqrt(n)) / alpha)
        (1.0, 1.0, -0.5)
    """
    sqrt_n = n.sqrt()
    n_new = n + g * g
    sqrt_new = n_new.sqrt()
    sigma = (sqrt_new - sqrt_n) / alpha
    z_new = z + g - sigma * w
    shrunk = z_new - z_new.sign() * l1
    w_new = -shrunk / ((beta + sqrt_new) / alpha + l2)
    w_new = torch.where(z_new.abs() <= l1, torch.zeros_like(w_new), w_new)
    return z_new, n_new, w_new


class FTRL(Optimizer):
    """FTRL-Proximal with per-coordinate learning rates, L1 and L2 (McMahan et al., KDD 2013).

    Args:
        params: parameters or parameter groups (as every ``torch.optim`` optimiser).
        lr: ``alpha``, the learning-rate scale (the paper's experiments: about 0.05 to 0.1).
        beta: the learning-rate offset (the paper: 1.0 is usually good enough).
        l1: ``lambda1``, the L1 strength; weights whose ``|z|`` stays at most ``l1`` are
            exactly zero.
        l2: ``lambda2``, the L2 strength.

    State per parameter: ``z`` and ``n`` (its shape each), in ``state_dict``.

    Example:
        >>> import torch
        >>> table = torch.nn.Embedding(10, 1, sparse=True)
        >>> _ = torch.nn.init.zeros_(table.weight)  # the paper starts from w = 0
        >>> opt = FTRL(table.parameters(), lr=0.1, l1=0.01)
        >>> table(torch.tensor([3, 3, 5])).sum().backward()
        >>> opt.step()
        >>> sorted(int(i) for i in table.weight.squeeze(1).nonzero())  # the touched rows
        [3, 5]
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        beta: float = 1.0,
        l1: float = 0.0,
        l2: float = 0.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"FTRL: lr (alpha) must be > 0, got {lr}")
        if beta < 0 or l1 < 0 or l2 < 0:
            raise ValueError(f"FTRL: beta, l1 and l2 must be >= 0, got {beta}, {l1}, {l2}")
        super().__init__(params, {"lr": lr, "beta": beta, "l1": l1, "l2": l2})

    def _state_of(self, p: Tensor) -> tuple[Tensor, Tensor]:
        st = self.state[p]
        if not st:
            st["z"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["n"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st["z"], st["n"]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            alpha = float(group["lr"])
            if not alpha > 0:
                raise ValueError(f"FTRL: lr (alpha) must be > 0, got {alpha}")
            kw = {"alpha": alpha, "beta": group["beta"], "l1": group["l1"], "l2": group["l2"]}
            for p in group["params"]:
                if p.grad is None:
                    continue
                z, n = self._state_of(p)
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()  # duplicate rows summed: one g per coordinate
                    idx = tuple(grad.indices())  # sparse_dim index tensors, each [K]
                    g = grad.values()  # [K, *dense dims]
                    z_new, n_new, w_new = ftrl_update(p[idx], g, z[idx], n[idx], **kw)
                    z.index_put_(idx, z_new)
                    n.index_put_(idx, n_new)
                    p.index_put_(idx, w_new)
                else:
                    z_new, n_new, w_new = ftrl_update(p, grad, z, n, **kw)
                    z.copy_(z_new)
                    n.copy_(n_new)
                    p.copy_(w_new)
        return loss
