"""Uncertainty weighting with learnable log-variances."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtlrec.errors import ConfigError
from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting.base import Weighting

PAPER = (
    "Kendall, Gal, Cipolla. Multi-Task Learning Using Uncertainty to Weigh Losses for Scene "
    "Geometry and Semantics. CVPR 2018"
)


class UncertaintyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    forms: dict[str, Literal["regression", "classification"]] = Field(
        default_factory=dict,
        description="task -> 'regression' (1/(2 sigma^2) L + log sigma) or 'classification' "
        "(1/sigma^2 L + log sigma); tasks not named use `default_form`",
    )
    default_form: Literal["regression", "classification"] = "regression"
    init_log_var: float = Field(default=0.0, description="initial s_t = log sigma_t^2")
    lr: float | None = Field(
        default=None, gt=0, description="learning rate of the log-variances (None: the optimiser's)"
    )


@WEIGHTINGS.register("uncertainty", params=UncertaintyParams, paper=PAPER)
class Uncertainty(Weighting):
    """Homoscedastic-uncertainty weights (Kendall et al., CVPR 2018), with ``s_t = log sigma_t^2``.

    Per task, with ``c_t = 1/2`` (regression form, eq. 7) or ``c_t = 1`` (classification form,
    eq. 10 with the approximation of eq. 12):

        ``c_t exp(-s_t) L_t + s_t / 2``   (``s_t / 2 = log sigma_t``)

    For a fixed loss the optimum is ``s_t = log(2 c_t L_t)``: ``log L_t`` (regression form),
    ``log 2 L_t`` (classification form). The log-variances are ``nn.Parameter``s of this module;
    the trainer gives them to the optimiser (the ``balancing`` group, no weight decay). The total
    may be negative (whenever ``s_t < 0``, i.e. small losses); it is not clipped, since clipping
    ``s_t`` at 0 changes the method. A task absent from a step (no valid row) contributes
    nothing: no ``s_t / 2`` term, no gradient to ``s_t``.
    """

    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: UncertaintyParams) -> None:
        super().__init__(task_names)
        unknown = set(params.forms) - set(self.task_names)
        if unknown:
            raise ConfigError(
                f"uncertainty forms name unknown tasks {sorted(unknown)}; tasks are "
                f"{list(self.task_names)}"
            )
        c = [
            0.5 if params.forms.get(t, params.default_form) == "regression" else 1.0
            for t in self.task_names
        ]
        self.param_lr = params.lr
        self.register_buffer("factor", torch.tensor(c, dtype=torch.float32))
        self.log_var = nn.Parameter(torch.full((self.num_tasks,), float(params.init_log_var)))

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        return (self.factor * torch.exp(-self.log_var)).detach().to(losses.dtype)

    def regularizer(self, losses: Tensor) -> Tensor:
        # the weighted-loss term's gradient w.r.t. s (its value is already in sum w L) plus s/2,
        # over the present tasks only: an absent task's s_t gets no gradient (its loss, 0, says
        # nothing about its variance)
        on = self.present.to(self.log_var.dtype)
        prec = self.factor * torch.exp(-self.log_var)
        grad_only = ((prec - prec.detach()) * losses.detach() * on).sum()
        return grad_only + 0.5 * (self.log_var * on).sum()
