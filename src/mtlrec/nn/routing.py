"""Hard-concrete gates and sub-network routing (SNR).

The hard-concrete distribution (C. Louizos, M. Welling, D. P. Kingma, "Learning Sparse Neural
Networks through L0 Regularization", ICLR 2018, Section 4) stretches a binary concrete variable
to ``(gamma, zeta)`` and clips it to ``[0, 1]``, so a gate is exactly 0 or exactly 1 with
non-zero probability and differentiable in between:

* ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
* ``s_bar = s (zeta - gamma) + gamma``, ``z = min(1, max(0, s_bar))``;
* the CDF of ``s_bar`` is ``Q(s_bar <= x) = sigmoid(beta (log(x - gamma) - log(zeta - x)) -
  log_alpha)`` for ``gamma < x < zeta``, so ``P(z = 0) = Q(s_bar <= 0)``,
  ``P(z = 1) = 1 - Q(s_bar <= 1)`` and the L0 penalty (the expected number of non-zero gates)
  is ``sum_j P(z_j != 0) = sum_j sigmoid(log_alpha_j - beta log(-gamma / zeta))``;
* at test time the deterministic gate ``z_hat = min(1, max(0, sigmoid(log_alpha) (zeta - gamma)
  + gamma))``.

:class:`SubNetworkRouting` connects K lower sub-networks to M upper units with one such gate per
connection (J. Ma, Z. Zhao, J. Chen, A. Li, L. Hong, E. H. Chi, "SNR: Sub-Network Routing for
Flexible Parameter Sharing in Multi-Task Learning", AAAI 2019, Eqs. 1-2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

BETA = 2.0 / 3.0
"""Temperature of the hard-concrete distribution (Louizos et al.'s value)."""
GAMMA = -0.1
"""Lower end of the stretch interval (Louizos et al.'s value)."""
ZETA = 1.1
"""Upper end of the stretch interval (Louizos et al.'s value)."""
ROUTE_PREFIX = "route:"
"""A model reports routing connection ``s -> t`` as the gate ``route:s->t``: ``[B, 2]`` rows
``(P(open), P(closed))`` (read by :mod:`mtlrec.analysis.gates`)."""


def hard_concrete_cdf(
    x: Tensor | float,
    log_alpha: Tensor,
    beta: float = BETA,
    gamma: float = GAMMA,
    zeta: float = ZETA,
) -> Tensor:
    """``Q(s_bar <= x)``: the CDF of the stretched concrete variable, for ``gamma < x < zeta``.

    Paper: Louizos et al., ICLR 2018, Section 4 (the CDF behind Eq. 12).

    Args:
        x: the point (scalar or broadcastable to ``log_alpha``).
        log_alpha: location parameters, any shape.
        beta, gamma, zeta: temperature and stretch interval.

    Returns:
        The probabilities, shaped like ``log_alpha``.

    Example:
        >>> import torch
        >>> round(float(hard_concrete_cdf(0.5, torch.tensor(0.0))), 6)  # symmetric at log_alpha 0
        0.5
    """
    x = torch.as_tensor(x, dtype=log_alpha.dtype)
    return torch.sigmoid(beta * (torch.log(x - gamma) - torch.log(zeta - x)) - log_alpha)


def prob_nonzero(
    log_alpha: Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA
) -> Tensor:
    """``P(z != 0) = 1 - Q(s_bar <= 0) = sigmoid(log_alpha - beta log(-gamma / zeta))``, the
    per-gate term of the L0 penalty (Louizos et al., ICLR 2018, Eq. 12).

    Shapes:
        like ``log_alpha``.
    """
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def prob_one(
    log_alpha: Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA
) -> Tensor:
    """``P(z = 1) = 1 - Q(s_bar <= 1) = sigmoid(log_alpha - beta log((1 - gamma) / (zeta - 1)))``.

    Shapes:
        like ``log_alpha``.
    """
    return torch.sigmoid(log_alpha - beta * math.log((1.0 - gamma) / (zeta - 1.0)))


def sample_hard_concrete(
    log_alpha: Tensor,
    u: Tensor | None = None,
    beta: float = BETA,
    gamma: float = GAMMA,
    zeta: float = ZETA,
) -> Tensor:
    """One draw of hard-concrete gates (reparameterised: differentiable in ``log_alpha``).

    Args:
        log_alpha: location parameters, any shape.
        u: uniform noise shaped like ``log_alpha`` (default: drawn here from torch's RNG).
        beta, gamma, zeta: temperature and stretch interval.

    Returns:
        ``z`` in ``[0, 1]``, exactly 0 or 1 with non-zero probability.

    Example:
        >>> import torch
        >>> z = sample_hard_concrete(torch.zeros(1000))
        >>> bool(((z >= 0) & (z <= 1)).all()), bool((z == 0).any()), bool((z == 1).any())
        (True, True, True)
    """
    if u is None:
        u = torch.rand_like(log_alpha)
    eps = torch.finfo(log_alpha.dtype).eps
    u = u.clamp(eps, 1.0 - eps)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def deterministic_gate(log_alpha: Tensor, gamma: float = GAMMA, zeta: float = ZETA) -> Tensor:
    """The test-time gate ``min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))``
    (Louizos et al., ICLR 2018, Eq. 13)."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


class HardConcrete(nn.Module):
    """A ``[rows, cols]`` matrix of hard-concrete gates, one parameter vector per row.

    Each row's ``log_alpha`` is a parameter of its own (so a row can belong to one owner, e.g.
    the connections into one task's tower). In training a forward pass draws one sample of
    every gate; in eval mode it returns the deterministic gate. Gates may be fixed: ``fixed``
    holds NaN for a learned gate, 0 for one fixed closed and 1 for one fixed open; a fixed gate
    is exactly that value, gets no gradient and is left out of the L0 penalty.

    Paper: Louizos et al., ICLR 2018 (see the module docstring for the formulas).

    Args:
        rows, cols: shape of the gate matrix.
        init_open: initial ``P(z != 0)`` of every learned gate (sets ``log_alpha``).
        beta, gamma, zeta: temperature and stretch interval.
        fixed: ``[rows, cols]`` NaN / 0 / 1, or None (all learned).

    Shapes:
        ``forward() -> [rows, cols]``.

    Example:
        >>> import torch
        >>> g = HardConcrete(2, 3, fixed=torch.tensor([[0.0, float("nan"), 1.0]] * 2))
        >>> z = g()
        >>> z[:, 0].tolist(), z[:, 2].tolist(), g.eval()().shape
        ([0.0, 0.0], [1.0, 1.0], torch.Size([2, 3]))
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        *,
        init_open: float = 0.9,
        beta: float = BETA,
        gamma: float = GAMMA,
        zeta: float = ZETA,
        fixed: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < init_open < 1.0:
            raise ValueError(f"init_open must be in (0, 1), got {init_open}")
        if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
            raise ValueError(f"need gamma < 0, zeta > 1, beta > 0; got {gamma}, {zeta}, {beta}")
        self.rows, self.cols = rows, cols
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        # P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)) = init_open
        la = math.log(init_open / (1.0 - init_open)) + beta * math.log(-gamma / zeta)
        self.log_alpha = nn.ParameterList(
            nn.Parameter(torch.full((cols,), la)) for _ in range(rows)
        )
        fixed = torch.full((rows, cols), math.nan) if fixed is None else fixed.float()
        if fixed.shape != (rows, cols):
            raise ValueError(f"fixed has shape {tuple(fixed.shape)}, expected {(rows, cols)}")
        if not bool((fixed.isnan() | (fixed == 0) | (fixed == 1)).all()):
            raise ValueError("fixed gates must be NaN (learned), 0 (closed) or 1 (open)")
        # z = learned * free + value: arithmetic only (exports as plain ops)
        self.register_buffer("free", fixed.isnan().float(), persistent=False)
        self.register_buffer("value", torch.nan_to_num(fixed, nan=0.0), persistent=False)

    def log_alphas(self) -> Tensor:
        """All rows' ``log_alpha`` stacked, ``[rows, cols]``."""
        return torch.stack(list(self.log_alpha))  # [rows, cols]

    def row_parameters(self, row: int) -> list[nn.Parameter]:
        """The parameter of one row of gates."""
        return [self.log_alpha[row]]  # type: ignore[list-item]

    def forward(self) -> Tensor:
        la = self.log_alphas()  # [rows, cols]
        if self.training:
            z = sample_hard_concrete(la, None, self.beta, self.gamma, self.zeta)
        else:
            z = deterministic_gate(la, self.gamma, self.zeta)
        return z * self.free + self.value  # [rows, cols]

    def open_probability(self) -> Tensor:
        """``P(z != 0)`` of every gate (1 or 0 for fixed ones), ``[rows, cols]``."""
        p = prob_nonzero(self.log_alphas(), self.beta, self.gamma, self.zeta)
        return p * self.free + self.value

    def l0_penalty(self) -> Tensor:
        """The expected number of non-zero learned gates (a scalar; fixed gates excluded)."""
        p = prob_nonzero(self.log_alphas(), self.beta, self.gamma, self.zeta)
        return (p * self.free).sum()


class SubNetworkRouting(nn.Module):
    """Routes the outputs of K lower sub-networks to the inputs of M upper units through
    hard-concrete connections.

    Paper: Ma et al., AAAI 2019. SNR-Trans (Eq. 1), ``v_j = sum_i z_ji W_ji u_i``, a transform
    per connection; SNR-Aver (Eq. 2), ``v_j = sum_i z_ji u_i`` (identity transforms: input and
    output widths agree). ``z`` are :class:`HardConcrete` gates (sampled in training,
    deterministic in eval). As in the paper's block form, SNR-Trans is one matrix product: the K
    lower outputs side by side, ``[B, K*in]``, times each upper unit's column of scaled blocks
    ``[K*in, out]``. The transforms have no bias (the upper layers have their own).

    Args:
        num_in: K, lower sub-networks.
        num_out: M, upper units (sub-networks, or task towers).
        in_dim: width of every lower output.
        out_dim: width of every upper input (must equal ``in_dim`` without ``transform``).
        transform: SNR-Trans (True) or SNR-Aver (False).
        init_open, beta, gamma, zeta, fixed: of the :class:`HardConcrete` gates ``[M, K]``.

    Shapes:
        ``u [K, B, in] -> (v [M, B, out], z [M, K])``.

    Example:
        >>> import torch
        >>> r = SubNetworkRouting(3, 2, 4, 5).eval()
        >>> v, z = r(torch.randn(3, 7, 4))
        >>> tuple(v.shape), tuple(z.shape)
        ((2, 7, 5), (2, 3))
    """

    def __init__(
        self,
        num_in: int,
        num_out: int,
        in_dim: int,
        out_dim: int,
        *,
        transform: bool = True,
        init_open: float = 0.9,
        beta: float = BETA,
        gamma: float = GAMMA,
        zeta: float = ZETA,
        fixed: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not transform and in_dim != out_dim:
            raise ValueError(f"SNR-Aver needs equal widths, got {in_dim} -> {out_dim}")
        self.num_in, self.num_out = num_in, num_out
        self.in_dim, self.out_dim = in_dim, out_dim
        self.transform = transform
        self.gate = HardConcrete(
            num_out, num_in, init_open=init_open, beta=beta, gamma=gamma, zeta=zeta, fixed=fixed
        )
        self.weights = nn.ParameterList()
        if transform:
            # fan-in of an upper input is K * in (the block row of Eq. 1)
            bound = 1.0 / math.sqrt(num_in * in_dim)
            for _ in range(num_out):
                w = torch.empty(num_in, in_dim, out_dim)
                nn.init.uniform_(w, -bound, bound)
                self.weights.append(nn.Parameter(w))

    def unit_parameters(self, unit: int) -> list[nn.Parameter]:
        """The parameters of the connections into upper unit ``unit`` (its gates' log_alpha
        and, for SNR-Trans, its transforms)."""
        own = self.gate.row_parameters(unit)
        return own + ([self.weights[unit]] if self.transform else [])  # type: ignore[list-item]

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        z = self.gate()  # [M, K]
        k, b, d = u.shape
        if not self.transform:
            return torch.einsum("mk,kbd->mbd", z, u), z  # [M, B, D]
        w = torch.stack(list(self.weights))  # [M, K, in, out]
        w = w * z[:, :, None, None]  # [M, K, in, out]: z_ji W_ji
        x = u.permute(1, 0, 2).reshape(b, k * d)  # [B, K*in]: lower outputs side by side
        v = torch.matmul(x, w.reshape(self.num_out, k * d, self.out_dim))  # [M, B, out]
        return v, z

    def open_probability(self) -> Tensor:
        """``P(z != 0)`` of every connection, ``[M, K]``."""
        return self.gate.open_probability()

    def l0_penalty(self) -> Tensor:
        """Expected number of open learned connections (scalar)."""
        return self.gate.l0_penalty()


def route_names(sources: Sequence[str], targets: Sequence[str]) -> list[list[str]]:
    """Connection names ``"<source>-><target>"``, ``[M][K]`` (target-major, as the gates)."""
    return [[f"{s}->{t}" for s in sources] for t in targets]
