"""Log of each loss (the loss-scale part of DB-MTL)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting.base import Weighting

PAPER = (
    "Lin, Ye, Xu, Shi, Zhang, Kwok. Dual-Balancing for Multi-Task Learning. arXiv:2308.12029, "
    "2023 (loss-scale balancing by the logarithm)"
)


class LogLossParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    eps: float = Field(default=1e-8, gt=0, description="added to each loss before the log")


@WEIGHTINGS.register("log_loss", params=LogLossParams, paper=PAPER)
class LogLoss(Weighting):
    """Minimise ``sum_t log(L_t + eps)``: scale-invariant per task, no state, no extra cost.

    The gradient of ``log L_t`` is ``grad L_t / L_t``, so the weights are ``1 / (L_t + eps)``
    (treated as constants). This is DB-MTL's loss-scale balancing, without its gradient-magnitude
    part; the logged objective is ``sum_t w_t L_t`` (= T), not the sum of logs.
    """

    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: LogLossParams) -> None:
        super().__init__(task_names)
        self.eps = params.eps

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        return 1.0 / (losses.detach() + self.eps)
