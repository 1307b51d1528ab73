"""Adam, AdamW, Adagrad and SGD without ``torch.optim``.

Why not ``torch.optim``: its first optimiser imports ``torch._dynamo`` (and sympy, mpmath...),
about 70 MB of resident memory on a 2-core machine whose whole training run fits in 600 MB.
These classes run the same update rules, through the same fused CPU kernels that
``torch.optim`` uses (``torch._fused_adam_`` & co.), with a per-tensor fallback; a test checks
each against ``torch.optim`` step for step.

Sparse gradients (embedding tables with sparse updates) get lazy updates: only the rows a
batch touched move, and their moment estimates age only when touched (as ``SparseAdam``).

The state dict has ``torch.optim``'s shape: ``{"state": {index: {...}}, "param_groups":
[{..., "params": [index, ...]}]}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

ParamGroups = Iterable[nn.Parameter] | Iterable[dict[str, Any]]


class Optimizer(ABC):
    """A minimal optimiser: parameter groups, per-parameter state, zero_grad, step."""

    defaults: dict[str, Any]

    def __init__(self, params: ParamGroups, defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[nn.Parameter, dict[str, Tensor]] = {}
        seen: set[int] = set()
        for g in groups:
            group = {**self.defaults, **g, "params": list(g["params"])}
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError("a parameter appears in two groups")
                seen.add(id(p))
            self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none or (p.grad is not None and p.grad.is_sparse):
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def materialize(self) -> None:
        """Allocate every parameter's state (and a zero gradient) now, before training starts.

        Allocated lazily, they would land between the first step's temporary buffers and
        fragment the heap for the rest of the run.
        """
        for g in self.param_groups:
            for p in g["params"]:
                self._init(p)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    def _init(self, p: nn.Parameter) -> dict[str, Tensor]:
        return self.state.setdefault(p, {})

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            dense = [p for p in params if not p.grad.is_sparse]
            sparse = [p for p in params if p.grad.is_sparse]
            if dense:
                self._dense_update(g, dense)
            for p in sparse:
                self._sparse_update(g, p)

    @abstractmethod
    def _dense_update(self, group: dict[str, Any], params: list[nn.Parameter]) -> None:
        """Update parameters with dense gradients."""

    def _sparse_update(self, group: dict[str, Any], p: nn.Parameter) -> None:
        raise ValueError(f"{type(self).__name__} does not take sparse gradients")

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        index: dict[int, int] = {}
        groups = []
        for g in self.param_groups:
            ids = []
            for p in g["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        state = {index[id(p)]: dict(s) for p, s in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"])
            for a, b in zip(groups, self.param_groups, strict=True)
        ):
            raise ValueError("optimizer state does not match the parameter groups")
        by_index: dict[int, nn.Parameter] = {}
        for saved, own in zip(groups, self.param_groups, strict=True):
            for i, p in zip(saved["params"], own["params"], strict=True):
                by_index[int(i)] = p
            for k, v in saved.items():
                if k != "params":
                    own[k] = tuple(v) if k == "betas" else v
        self.state = {}
        for i, s in state_dict["state"].items():
            p = by_index[int(i)]
            self.state[p] = {
                k: v.to(
                    p.device,
                    p.dtype if v.is_floating_point() and k != "step" else v.dtype,
                    copy=True,
                )
                if isinstance(v, Tensor)
                else v
                for k, v in s.items()
            }


def _steps(states: list[dict[str, Tensor]]) -> list[Tensor]:
    return [s["step"] for s in states]


class Adam(Optimizer):
    """Adam (Kingma & Ba, ICLR 2015); ``weight_decay`` is L2 added to the gradient.

    With ``decoupled=True`` it is AdamW (Loshchilov & Hutter, ICLR 2019): the decay multiplies
    the weights directly.
    """

    def __init__(
        self,
        params: ParamGroups,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        super().__init__(
            params,
            {
                "lr": lr,
                "betas": tuple(betas),
                "eps": eps,
                "weight_decay": weight_decay,
                "decoupled": decoupled,
            },
        )

    def _init(self, p: nn.Parameter) -> dict[str, Tensor]:
        st = self.state.get(p)
        if st is None:
            st = self.state[p] = {
                "step": torch.zeros((), dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        return st

    def _dense_update(self, group: dict[str, Any], params: list[nn.Parameter]) -> None:
        states = [self._init(p) for p in params]
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for s in states:
            s["step"] += 1
        grads = [p.grad for p in params]
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        fused = torch._fused_adamw_ if group["decoupled"] else torch._fused_adam_
        if params[0].device.type == "cpu" and fused is not None:
            fused(
                params,
                grads,
                m,
                v,
                [],
                _steps(states),
                lr=lr,
                beta1=b1,
                beta2=b2,
                weight_decay=wd,
                eps=eps,
                amsgrad=False,
                maximize=False,
            )
            return
        for p, g, mi, vi, s in zip(params, grads, m, v, states, strict=True):
            self._formula(p, g, mi, vi, float(s["step"]), group)

    @staticmethod
    def _formula(
        p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: float, group: dict[str, Any]
    ) -> None:
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if wd:
            if group["decoupled"]:
                p.mul_(1 - lr * wd)
            else:
                g = g.add(p, alpha=wd)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        denom = (v / bc2).sqrt_().add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)

    def _sparse_update(self, group: dict[str, Any], p: nn.Parameter) -> None:
        st = self._init(p)
        st["step"] += 1
        grad = p.grad.coalesce()
        rows, values = grad.indices()[0], grad.values()  # [R], [R, D]
        b1, b2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        step = float(st["step"])
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m_rows = m.index_select(0, rows).lerp_(values, 1 - b1)
        v_rows = v.index_select(0, rows).mul_(b2).addcmul_(values, values, value=1 - b2)
        m.index_copy_(0, rows, m_rows)
        v.index_copy_(0, rows, v_rows)
        denom = (v_rows / (1 - b2**step)).sqrt_().add_(eps)
        p.index_add_(0, rows, m_rows.div_(denom), alpha=-lr / (1 - b1**step))


class Adagrad(Optimizer):
    """Adagrad (Duchi, Hazan & Singer, JMLR 2011)."""

    def __init__(
        self,
        params: ParamGroups,
        lr: float = 1e-2,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

    def _init(self, p: nn.Parameter) -> dict[str, Tensor]:
        st = self.state.get(p)
        if st is None:
            st = self.state[p] = {
                "step": torch.zeros((), dtype=torch.float32),
                "sum": torch.zeros_like(p),
            }
        return st

    def _dense_update(self, group: dict[str, Any], params: list[nn.Parameter]) -> None:
        states = [self._init(p) for p in params]
        for s in states:
            s["step"] += 1
        grads = [p.grad for p in params]
        sums = [s["sum"] for s in states]
        if params[0].device.type == "cpu" and torch._fused_adagrad_ is not None:
            torch._fused_adagrad_(
                params,
                grads,
                sums,
                _steps(states),
                lr=group["lr"],
                lr_decay=0.0,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
            return
        for p, g, s in zip(params, grads, sums, strict=True):
            if group["weight_decay"]:
                g = g.add(p, alpha=group["weight_decay"])
            s.addcmul_(g, g)
            p.addcdiv_(g, s.sqrt().add_(group["eps"]), value=-group["lr"])

    def _sparse_update(self, group: dict[str, Any], p: nn.Parameter) -> None:
        st = self._init(p)
        st["step"] += 1
        grad = p.grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        s_rows = st["sum"].index_select(0, rows).addcmul_(values, values)
        st["sum"].index_copy_(0, rows, s_rows)
        p.index_add_(0, rows, values / s_rows.sqrt_().add_(group["eps"]), alpha=-group["lr"])


class SGD(Optimizer):
    """Stochastic gradient descent with optional (heavy-ball) momentum and L2 weight decay."""

    def __init__(
        self,
        params: ParamGroups,
        lr: float = 1e-2,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def _dense_update(self, group: dict[str, Any], params: list[nn.Parameter]) -> None:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in params:
            g = p.grad
            if wd:
                g = g.add(p, alpha=wd)
            if mom:
                st = self._init(p)
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = g.detach().clone()
                else:
                    buf.mul_(mom).add_(g)
                g = buf
            p.add_(g, alpha=-lr)

    def _sparse_update(self, group: dict[str, Any], p: nn.Parameter) -> None:
        if group["momentum"] or group["weight_decay"]:
            raise ValueError("SGD with sparse gradients takes no momentum or weight decay")
        p.add_(p.grad, alpha=-group["lr"])
