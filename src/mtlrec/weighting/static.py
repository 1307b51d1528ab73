"""Fixed task weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtlrec.errors import ConfigError
from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting.base import Weighting


class StaticParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: dict[str, float] = Field(
        default_factory=dict, description="task -> weight; tasks not named get 1.0"
    )


@WEIGHTINGS.register("static", params=StaticParams)
class Static(Weighting):
    """Fixed weights: ``sum_t w_t L_t`` with user-given ``w_t`` (1 by default).

    The usual production choice: weights are a hyper-parameter tuned while watching every task
    (no paper; the baseline every balancing paper compares against).
    """

    def __init__(self, task_names: Sequence[str], params: StaticParams) -> None:
        super().__init__(task_names)
        unknown = set(params.weights) - set(self.task_names)
        if unknown:
            raise ConfigError(
                f"static weights name unknown tasks {sorted(unknown)}; tasks are "
                f"{list(self.task_names)}"
            )
        bad = {k: v for k, v in params.weights.items() if v < 0}
        if bad:
            raise ConfigError(f"static weights must be >= 0, got {bad}")
        w = [params.weights.get(t, 1.0) for t in self.task_names]
        self.register_buffer("fixed", torch.tensor(w, dtype=torch.float32))

    def weights(self, losses: Tensor, jacobian: Tensor | None = None) -> Tensor:
        return self.fixed.to(losses.dtype)
