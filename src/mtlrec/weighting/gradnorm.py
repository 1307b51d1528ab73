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
        "shared weight matrix of the model in registration order, the paper's choice), 'all' "
        "(every shared dense parameter), or a parameter-name prefix (e.g. 'experts.')",
    )


@WEIGHTINGS.register("gradnorm", params=GradNormParams, paper=PAPER)
class GradNorm(Weighting):
    """GradNorm (Chen et al., ICML 2018).

    With ``G_t = ||grad_W (w_t L_t)|| = w_t ||grad_W L_t||``, ``Gbar = mean_t G_t``, the loss
    ratios ``Ltilde_t = L_t / L_t(0)`` and the relative inverse rates
    ``r_t = Ltilde_t / mean_j Ltilde_j``, the weights follow the gradient of

        ``L_grad = sum_t | G_t - [Gbar r_t^alpha] |``   (eq. 2; the bracket is a constant)

    and are then renormalised to sum to T. ``W`` is, by default, the last shared weight matrix
    (``layer: last``; ``layer: all`` uses every shared dense parameter, as LibMTL does, and
    ``grad_target: representation`` the shared features). Weights are ``T softmax(l)`` of a
    learnable ``l`` (always positive; renormalising after each step keeps ``sum w = T``).
    ``L_t(0)`` is the first step's loss, recorded once (a buffer: resume keeps it). The weights
    learn only from ``L_grad`` (the task losses treat them as constants), and ``L_grad`` reaches
    only the weights (the gradients of W are detached).
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
        self.register_buffer("initial", torch.zeros(self.num_tasks))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))
        self._grad_loss: Tensor | None = None

    def current(self) -> Tensor:
        return self.num_tasks * torch.softmax(self.logits, dim=0)

    def grad_parameters(self, model: MultiTaskModel) -> list[nn.Parameter]:
        emb = {id(p) for p in model.embedding_parameters()}
        shared = {id(p) for p in model.shared_parameters() if p.requires_grad}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in shared]
        if self.layer == "all":
            return [p for n, p in named if self.include_embeddings or id(p) not in emb]
        if self.layer == "last":
            mats = [p for _, p in named if p.ndim >= 2 and id(p) not in emb]
            if not mats:
                raise ConfigError("gradnorm: the model has no shared weight matrix")
            return [mats[-1]]
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
        if not bool(self.has_initial):
            with torch.no_grad():
                self.initial.copy_(losses.detach().clamp_min(1e-12))
                self.has_initial.fill_(True)
        w = self.current()
        norms = jacobian.detach().norm(dim=1)  # [T] ||grad_W L_t||
        g = w * norms  # G_t, differentiable in w only
        ratio = losses.detach() / self.initial
        rate = ratio / ratio.mean().clamp_min(1e-12)
        target = (g.mean() * rate.pow(self.alpha)).detach()
        self._grad_loss = (g - target).abs().sum()
        return w.detach().to(losses.dtype)

    def regularizer(self, losses: Tensor) -> Tensor | None:
        gl, self._grad_loss = self._grad_loss, None
        if gl is None:
            return None
        return gl - gl.detach()  # gradient of L_grad for the weights, no value in the objective

    @torch.no_grad()
    def on_step_end(self, losses: Tensor) -> None:
        # renormalise so that sum w = T exactly (softmax already does; recentre the logits so
        # that they cannot drift)
        self.logits.sub_(self.logits.mean())
        if not bool(torch.isfinite(self.logits).all()):
            self.logits.zero_()
