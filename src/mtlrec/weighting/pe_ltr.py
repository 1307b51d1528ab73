"""PE-LTR: Pareto-efficient weights with per-task lower bounds."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from mtlrec.errors import ConfigError
from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting._solvers import gram64, project_simplex
from mtlrec.weighting.base import GradParams, SharedUpdateWeighting

PAPER = (
    "Lin, Chen, Pei, Sun, Xiao, Sun, Zhang, Ou, Jiang. A Pareto-Efficient Algorithm for Multiple "
    "Objective Optimization in E-Commerce Recommendation. RecSys 2019"
)


class PELTRParams(GradParams):
    bounds: dict[str, float] = Field(
        default_factory=dict,
        description="task -> lower bound c_t of its weight (0 if not named); sum must be <= 1",
    )


@WEIGHTINGS.register("pe_ltr", params=PELTRParams, paper=PAPER)
class PELTR(SharedUpdateWeighting):
    """PE-LTR's Pareto-efficient weights (Lin et al., RecSys 2019, the PE-Solver).

    The KKT condition of Pareto stationarity with weight bounds is

        ``min_w ||sum_t w_t g_t||^2  s.t.  sum_t w_t = 1,  w_t >= c_t``.

    Step 1 (the relaxed problem): with ``w = c + v``, drop ``v >= 0`` and solve the equality-
    constrained quadratic programme in closed form from its KKT system
    ``[[G, 1], [1^T, 0]] [v; lambda] = [-G c; 1 - sum c]`` (``G = J J^T``, least squares when
    singular). Step 2: project ``v`` onto ``{v >= 0, sum v = 1 - sum c}`` (the non-negative
    least-squares step of the paper, here an exact Euclidean projection), so ``w = c + v`` meets
    every bound. Weights sum to 1, as in the paper. The Pareto condition concerns the shared
    parameters: their update is ``w @ J``, and task-specific parameters get their own task's
    gradient (a task with weight 0 still trains its tower). A task absent from a step (no valid
    row) is left out of the problem, with its bound: the others' bounds still hold.
    """

    needs_grads = True
    paper = PAPER

    def __init__(self, task_names: Sequence[str], params: PELTRParams) -> None:
        super().__init__(task_names)
        self.set_grad_options(params)
        self.init_shared_update()
        unknown = set(params.bounds) - set(self.task_names)
        if unknown:
            raise ConfigError(f"pe_ltr bounds name unknown tasks {sorted(unknown)}")
        c = [params.bounds.get(t, 0.0) for t in self.task_names]
        if min(c) < 0 or sum(c) > 1 + 1e-9:
            raise ConfigError(f"pe_ltr bounds must be >= 0 and sum to at most 1, got {c}")
        self.register_buffer("bounds", torch.tensor(c, dtype=torch.float64))

    def shared_weights(self, losses: Tensor, jacobian: Tensor) -> Tensor:
        """The weights ``alpha [T]`` of the task gradients in the shared update."""
        j = jacobian.detach()  # the present tasks' rows
        gram = gram64(j)
        t = j.shape[0]
        c = self.bounds[self.present] if t < self.num_tasks else self.bounds
        free = 1.0 - float(c.sum())
        kkt = torch.zeros(t + 1, t + 1, dtype=torch.float64, device=gram.device)
        kkt[:t, :t] = gram
        kkt[:t, t] = 1.0
        kkt[t, :t] = 1.0
        rhs = torch.cat([-(gram @ c), gram.new_tensor([free])])
        if bool(torch.isfinite(kkt).all()) and bool(torch.isfinite(rhs).all()):
            v = torch.linalg.lstsq(kkt, rhs[:, None]).solution[:t, 0]
        else:  # lstsq raises on them
            v = torch.full((t,), float("nan"), dtype=torch.float64, device=gram.device)
        if not bool(torch.isfinite(v).all()):
            v = torch.full((t,), free / t, dtype=torch.float64, device=gram.device)
        w = c + project_simplex(v, free)
        return w
