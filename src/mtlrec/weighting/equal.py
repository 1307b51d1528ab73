"""Equal weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting.base import Weighting


class EqualParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@WEIGHTINGS.register("equal", params=EqualParams, paper="baseline (sum of the task losses)")
class Equal(Weighting):
    """Every task weight 1: the objective is ``sum_t L_t`` (the usual baseline)."""

    def __init__(self, task_names: Sequence[str], params: EqualParams | None = None) -> None:
        super().__init__(task_names)

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        return torch.ones_like(losses)
