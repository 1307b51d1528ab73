"""GradNorm: weights that equalise the tasks' gradient norms on a shared layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from pydantic import Field
from torch import Tensor, nn

from mtlrec.errors import ConfigError
from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting.base import GradParams, Weighting

if TYPE_CHECKING:
    from mtlrec.models.base import MultiTaskModel

PAPER = (
    "Chen, Badrinarayanan, Lee, Rabinovich. GradNorm: Gradient Normalization for Adaptive Loss "
    "Balancing in Deep Multitask Networks. ICML 2018"
)


class GradNormParams(GradParams):
    alpha: float = Field(default=1.5, ge=0, description="asymmetry (paper: 0.12 to 3)")
    lr: float | None = Field(
        default=None, gt=0, description="learning rate of the weights (None: the optimiser's)"
    )
    layer: str = Field(
        default="last",
        description="the shared weights W the gradient norms are taken on: 'last' (the last "
        "shared layer's weight matrix, which every task's loss reaches, as the model declares "
        "it: MultiTaskModel.last_shared_layer; the paper's choice), 'all' (every shared dense "
        "parameter), or a parameter-name prefix (e.g. 'experts.')",
    )


@WEIGHTINGS.register("gradnorm", params=GradNormParams, paper=PAPER)
class GradNorm(Weighting):
    """GradNorm (Chen et al., ICML 2018).

    With ``G_t = ||grad_W (w_t L_t)|| = w_t ||grad_W L_t||``, ``Gbar = mean_t G_t``, the loss
    ratios ``Ltilde_t = L_t / L_t(0)`` and the relative inverse rates
    ``r_t = Ltilde_t / mean_j Ltilde_j``, the weights follow the gradient of

        ``L_grad = sum_t | G_t - [Gbar r_t^alpha] |``   (eq. 2; the bracket is a constant)

    and are then renormalised to sum to T. ``W`` is, by default, the last shared layer's weight
    matrix as the model declares it (``layer: last``,
    :meth:`~mtlrec.models.base.MultiTaskModel.last_shared_layer`: a layer every task's loss
    reaches, never a bias or a gate); ``layer: all`` uses every shared dense parameter, as
    LibMTL does, and ``grad_target: representation`` the shared features. Weights are
    ``T softmax(l)`` of a learnable ``l`` (always positive; renormalising after each step keeps
    ``sum w = T``). ``L_t(0)`` is the task's loss at the first step in which it has rows,
    recorded once (a buffer: resume keeps it). The weights learn only from ``L_grad`` (the task
    losses treat them as constants), and ``L_grad`` reaches only the weights (the gradients of
    W are detached).

    Absent tasks (no valid row in the batch): the weights are ``T_p softmax`` over the present
    tasks' logits, ``L_grad`` sums over the present tasks (an absent task's logit gets no
    gradient) and nothing is recorded for the absent task (its ``L_t(0)`` waits for a batch
    with rows).
    """

    needs_grads = True
    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: GradNormParams) -> None:
        super().__init__(task_names)
        self.set_grad_options(params)
        self.alpha = params.alpha
        self.param_lr = params.lr
        self.layer = params.layer
        self.logits = nn.Parameter(torch.zeros(self.num_tasks))
        # L_t(0) per task; 0 = not recorded yet (a recorded loss is clamped to >= 1e-12)
        self.register_buffer("initial", torch.zeros(self.num_tasks))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))  # any recorded
        self._grad_loss: Tensor | None = None

    def current(self) -> Tensor:
        """The weights when every task is present, ``T softmax(l)``."""
        return self.num_tasks * torch.softmax(self.logits, dim=0)

    def grad_parameters(self, model: MultiTaskModel) -> list[nn.Parameter]:
        emb = {id(p) for p in model.embedding_parameters()}
        shared = {id(p) for p in model.shared_parameters() if p.requires_grad}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in shared]
        if self.layer == "all":
            return [p for n, p in named if self.include_embeddings or id(p) not in emb]
        if self.layer == "last":
            last = model.last_shared_layer()
            if last is None or not last.requires_grad:
                raise ConfigError(
                    f"gradnorm: model {type(model).__name__} declares no shared layer that every "
                    "task's loss reaches; use layer: all, a parameter-name prefix, or a "
                    "loss-based strategy"
                )
            return [last]
        chosen = [p for n, p in named if n.startswith(self.layer)]
        if not chosen:
            raise ConfigError(
                f"gradnorm layer {self.layer!r} matches no shared parameter; shared parameters "
                f"are {[n for n, _ in named][:20]}"
            )
        return chosen

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        if jacobian is None:
            raise ValueError("gradnorm needs the per-task gradients")
        on = self.present
        with torch.no_grad():
            first = on & (self.initial <= 0)
            if bool(first.any()):
                self.initial.copy_(
                    torch.where(first, losses.detach().float().clamp_min(1e-12), self.initial)
                )
                self.has_initial.fill_(True)
        idx = self.present_index()
        w = idx.numel() * torch.softmax(self.logits[idx], dim=0)  # [T_p]
        norms = jacobian.detach()[idx].norm(dim=1)  # [T_p] ||grad_W L_t||
        g = w * norms.to(w.dtype)  # G_t, differentiable in w only
        ratio = losses.detach()[idx].to(w.dtype) / self.initial[idx]
        rate = ratio / ratio.mean().clamp_min(1e-12)
        target = (g.mean() * rate.pow(self.alpha)).detach()
        self._grad_loss = (g - target).abs().sum()
        out = torch.zeros_like(losses)
        out[idx] = w.detach().to(losses.dtype)
        return out

    def regularizer(self, losses: Tensor) -> Tensor | None:
        gl, self._grad_loss = self._grad_loss, None
        if gl is None:
            return None
        return gl - gl.detach()  # gradient of L_grad for the weights, no value in the objective

    @torch.no_grad()
    def on_step_end(self, losses: Tensor) -> None:
        # renormalise so that sum w = T exactly (softmax already does; recentre the logits so
        # that they cannot drift): the present tasks' logits, an absent task's stays as it was
        idx = self.present_index()
        if idx.numel() > 0:
            self.logits[idx] -= self.logits[idx].mean()
        if not bool(torch.isfinite(self.logits).all()):
            self.logits.zero_()
