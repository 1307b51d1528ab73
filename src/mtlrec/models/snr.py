"""SNR: sub-networks connected by learned hard-concrete routes (SNR-Trans and SNR-Aver).

Paper: J. Ma, Z. Zhao, J. Chen, A. Li, L. Hong, E. H. Chi, "SNR: Sub-Network Routing for
Flexible Parameter Sharing in Multi-Task Learning", AAAI 2019.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.models.base import ModelOutput, MultiTaskModel, params_of
from mtlrec.models.options import ChainParams, heads_kwargs
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.nn.heads import TaskHeads
from mtlrec.nn.mlp import ParallelMLP
from mtlrec.nn.routing import BETA, GAMMA, ROUTE_PREFIX, ZETA, SubNetworkRouting, route_names
from mtlrec.registry import MODELS
from mtlrec.schema import TaskSpec


class SNRParams(ChainParams):
    subnetworks: tuple[int, ...] = Field(
        default=(3, 3), min_length=1, description="sub-networks per level, bottom first"
    )
    subnetwork_hidden: tuple[int, ...] = Field(
        default=(64,), min_length=1, description="layer widths of every sub-network"
    )
    tower_hidden: tuple[int, ...] = (32,)
    l0_weight: float = Field(default=1e-3, ge=0.0, description="lambda of the L0 penalty")
    init_open: float = Field(default=0.9, gt=0.0, lt=1.0, description="initial P(z != 0)")
    beta: float = Field(default=BETA, gt=0.0, description="hard-concrete temperature")
    gamma: float = Field(default=GAMMA, lt=0.0, description="stretch interval, lower end")
    zeta: float = Field(default=ZETA, gt=1.0, description="stretch interval, upper end")
    closed_routes: tuple[str, ...] = Field(
        default=(), description="connections fixed closed (z = 0), as 'sub0.1->task'"
    )
    open_routes: tuple[str, ...] = Field(default=(), description="connections fixed open (z = 1)")


class _SNR(MultiTaskModel):
    """Levels of sub-networks; hard-concrete routes between levels and into the towers."""

    Params = SNRParams
    transform: bool = True

    def __init__(self, layout: FeatureLayout, tasks: Sequence[TaskSpec], params: SNRParams) -> None:
        super().__init__(layout, tasks, params)
        p = params
        self.embedding = self.make_embedding()
        width = p.subnetwork_hidden[-1]
        units = [[f"sub{lv}.{j}" for j in range(k)] for lv, k in enumerate(p.subnetworks)]
        units.append(list(self.task_names))
        self.route_names = [route_names(a, b) for a, b in itertools.pairwise(units)]
        fixed = self._fixed_routes(p)
        self.levels = nn.ModuleList(
            ParallelMLP(
                k, self.embedding.out_dim if lv == 0 else width, p.subnetwork_hidden,
                shared_input=lv == 0, activation=p.activation, dropout=p.dropout,
            )
            for lv, k in enumerate(p.subnetworks)
        )  # fmt: skip
        self.routings = nn.ModuleList(
            SubNetworkRouting(
                len(a), len(b), width, width, transform=self.transform, init_open=p.init_open,
                beta=p.beta, gamma=p.gamma, zeta=p.zeta, fixed=f,
            )
            for (a, b), f in zip(itertools.pairwise(units), fixed, strict=True)
        )  # fmt: skip
        self.heads = TaskHeads(self.tasks, width, p.tower_hidden, **heads_kwargs(p))

    def _fixed_routes(self, p: SNRParams) -> list[torch.Tensor]:
        """Per routing layer ``[M, K]``: NaN (learned), 0 (closed_routes), 1 (open_routes)."""
        where = {n: (r, j, i) for r, rows in enumerate(self.route_names)
                 for j, row in enumerate(rows) for i, n in enumerate(row)}  # fmt: skip
        fixed = [torch.full((len(rows), len(rows[0])), math.nan) for rows in self.route_names]
        for value, names in ((0.0, p.closed_routes), (1.0, p.open_routes)):
            for n in names:
                if n not in where:
                    raise ConfigError(
                        f"{self._name()}: unknown route {n!r}; routes are "
                        f"'<source>-><target>', e.g. {sorted(where)[:6]}"
                    )
                r, j, i = where[n]
                if not math.isnan(float(fixed[r][j, i])):
                    raise ConfigError(
                        f"{self._name()}: route {n!r} is both in closed_routes and open_routes"
                    )
                fixed[r][j, i] = value
        return fixed

    def _name(self) -> str:
        return "snr_trans" if self.transform else "snr_aver"

    def forward(self, features: Features) -> ModelOutput:
        x = self.embedding(features).flat  # [B, D]
        b = x.shape[0]
        u = self.levels[0](x)  # [K_0, B, H]
        gates: dict[str, torch.Tensor] = {}
        for r, routing in enumerate(self.routings):
            v, _ = routing(u)  # [M, B, H]: M = next level's sub-networks, or the tasks
            p_open = routing.open_probability()  # [M, K]
            pair = torch.stack([p_open, 1.0 - p_open], dim=-1)  # [M, K, 2]: (open, closed)
            for j, row in enumerate(self.route_names[r]):
                for i, name in enumerate(row):
                    gates[ROUTE_PREFIX + name] = pair[j, i].expand(b, 2)  # [B, 2]
            u = self.levels[r + 1](v) if r + 1 < len(self.levels) else v  # [M, B, H]
        logits, read = self.heads.run(u)  # u: [T, B, H], one routed input per task
        aux = {}
        weight = self.params.l0_weight  # type: ignore[attr-defined]
        if self.training and weight > 0:
            aux["l0"] = weight * torch.stack([r.l0_penalty() for r in self.routings]).sum()
        return ModelOutput(logits, gates=gates, tower_inputs=read, aux_losses=aux)

    def expected_open_routes(self) -> float:
        """``sum P(z != 0)`` over every connection (fixed open ones count 1)."""
        with torch.no_grad():
            return float(sum(r.open_probability().sum() for r in self.routings))

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        # the connections into a task's tower and the tower are reached by its loss only
        k = self.task_names.index(task)
        return params_of(self.heads.towers[task]) + self.routings[-1].unit_parameters(k)

    def last_shared_layer(self) -> nn.Parameter:
        # the last layer of the top level's sub-networks ([K, in, out], or [in, K*out] when the
        # only level has one layer): every task's routes read them
        return self.levels[-1].weights[-1]


@MODELS.register("snr_trans", params=SNRParams, paper="Ma et al. AAAI 2019 (SNR-Trans)")
class SNRTrans(_SNR):
    """SNR-Trans: sub-networks joined by transform connections gated by hard-concrete ``z``.

    Paper: J. Ma, Z. Zhao, J. Chen, A. Li, L. Hong, E. H. Chi, "SNR: Sub-Network Routing for
    Flexible Parameter Sharing in Multi-Task Learning", AAAI 2019, Eq. 1:
    ``v_j = sum_i z_ij W_ij u_i`` between consecutive levels of sub-networks (``subnetworks``)
    and from the top level into every task's tower. ``z`` follows the hard-concrete
    distribution (Louizos et al., ICLR 2018) with ``log_alpha`` learned per connection; the
    objective adds ``l0_weight * sum_ij P(z_ij != 0)``, ``P(z != 0) = sigmoid(log_alpha - beta
    log(-gamma / zeta))`` (``aux_losses['l0']``, in training); evaluation uses the deterministic
    gate ``min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))``. Every connection's
    ``P(z != 0)`` is reported as a two-way gate ``route:<source>-><target>`` = (open, closed).
    """

    paper = "Ma et al., AAAI 2019 (SNR-Trans)"
    transform = True


@MODELS.register("snr_aver", params=SNRParams, paper="Ma et al. AAAI 2019 (SNR-Aver)")
class SNRAver(_SNR):
    """SNR-Aver: sub-networks joined by gated sums, ``v_j = sum_i z_ij u_i``.

    Paper: Ma et al., AAAI 2019, Eq. 2 (the transforms of SNR-Trans are identities, so every
    sub-network has the same output width). Gates, penalty and report as :class:`SNRTrans`.
    """

    paper = "Ma et al., AAAI 2019 (SNR-Aver)"
    transform = False
