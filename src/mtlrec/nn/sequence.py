"""Recurrent expert banks: K LSTMs or GRUs over one sequence, run as one batched recurrence.

The input projection of every expert and every time step is one GEMM; each step's recurrent
update of all K experts is one batched matmul ``[K, B, H] @ [K, H, G*H]``. The loop runs over
time steps (``max_len``), never over rows or experts. Padding is masked: at a padding position
the state is carried over unchanged, so the final state is the state after the last real
element whatever the padding holds or where it sits; a row with no real element ends at zeros.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_GATES = {"lstm": 4, "gru": 3}


def _exporting() -> bool:
    """Whether the module is being captured for export (ONNX, torch.export, tracing)."""
    return bool(
        torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
    )


def _aten_rnn(
    cell: str, x: Tensor, weights: list[Tensor], *, training: bool, state: Tensor | None = None
) -> Tensor:
    """One layer of ATen's fused LSTM or GRU over batch-first ``x`` [B, L, D]: its states
    [B, L, H], from the initial state ``state`` [1, B, H] (zeros if None; an LSTM's cell
    starts at zero).

    ``weights`` are ``[W_ih, W_hh, b_ih, b_hh]`` as ATen takes them: [G*H, D], [G*H, H],
    [G*H], [G*H]. ATen's kernels do not check the state's shape (``torch.nn.LSTM`` checks it
    in Python before it calls them), and a state sized for another batch is read and written
    outside its memory: a crash, or wrong numbers with no error. So the state is checked here
    against the batch axis that the call reads, and the weights against the kernel's gates.
    """
    batch_first = True
    hidden = weights[1].shape[1]
    batch = x.shape[1 - int(batch_first)]  # the batch axis the call reads: 0, or 1 if time first
    if state is None:
        state = x.new_zeros(1, x.shape[0], hidden)
    if state.shape != (1, batch, hidden):
        raise RuntimeError(
            f"fused {cell} over a batch of {batch}: the initial state must be "
            f"{(1, batch, hidden)}, got {tuple(state.shape)}"
        )
    # each branch checks its own kernel's gates (not _GATES[cell]): a slip in the branch's test
    # then raises here instead of handing one cell's weights to the other's kernel
    if cell == "lstm":
        _check_gates(cell, weights, 4)
        hx = (state, torch.zeros_like(state))
        return torch._VF.lstm(x, hx, weights, True, 1, 0.0, training, False, batch_first)[0]
    _check_gates(cell, weights, 3)
    return torch._VF.gru(x, state, weights, True, 1, 0.0, training, False, batch_first)[0]


def _check_gates(cell: str, weights: list[Tensor], gates: int) -> None:
    """Raise unless each of ``weights`` has ``gates`` blocks of H rows, the kernel's layout (ATen
    does not check it: an LSTM kernel given a GRU's weights reads past their end)."""
    rows = weights[1].shape[1] * gates
    if any(w.shape[0] != rows for w in weights):
        raise RuntimeError(
            f"fused {cell} with a state of width {weights[1].shape[1]}: its weights need "
            f"{rows} rows ({gates} gates), got {[w.shape[0] for w in weights]}"
        )


class SequenceExpertBank(nn.Module):
    """K recurrent experts (``cell='lstm'`` or ``'gru'``) reading one sequence or one each.

    Args:
        num: number of experts K.
        in_dim: width of a sequence element.
        hidden: state width H of every expert.
        cell: ``lstm`` or ``gru`` (PyTorch's gate equations).
        shared_input: all experts read one ``[B, L, in_dim]`` sequence; otherwise expert k
            reads ``x[k]`` of ``[K, B, L, in_dim]``.

    Returns (forward):
        ``(states [K, B, L, H], final [K, B, H])``; ``states`` at padding positions repeat the
        previous state.

    Example:
        >>> import torch
        >>> bank = SequenceExpertBank(3, 4, 5)
        >>> x, mask = torch.randn(2, 6, 4), torch.ones(2, 6, dtype=torch.bool)
        >>> [tuple(t.shape) for t in bank(x, mask)]
        [(3, 2, 6, 5), (3, 2, 5)]
    """

    def __init__(
        self, num: int, in_dim: int, hidden: int, *, cell: str = "lstm", shared_input: bool = True
    ) -> None:
        super().__init__()
        if cell not in _GATES:
            raise ValueError(f"unknown recurrent cell {cell!r}; choose from {sorted(_GATES)}")
        g = _GATES[cell]
        self.num, self.hidden, self.cell, self.shared_input = num, hidden, cell, shared_input
        self.w_ih = nn.Parameter(torch.empty(num, in_dim, g * hidden))
        self.w_hh = nn.Parameter(torch.empty(num, hidden, g * hidden))
        self.b_ih = nn.Parameter(torch.empty(num, 1, g * hidden))
        self.b_hh = nn.Parameter(torch.empty(num, 1, g * hidden))
        bound = 1.0 / math.sqrt(hidden)
        for p in (self.w_ih, self.w_hh, self.b_ih, self.b_hh):
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if _exporting():  # graph capture: no branch on the mask's values (any mask works)
            return self._stepwise(x, mask)
        length = mask.shape[1]
        lengths = mask.sum(1)  # [B]
        prefix = bool((mask == (torch.arange(length, device=mask.device) < lengths[:, None])).all())
        if prefix and length > 0:  # ids first, padding after (how sequences are encoded)
            return self._fused(x, lengths)
        return self._stepwise(x, mask)

    def _fused(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Each expert's recurrence as one fused ATen RNN call (the time loop in C++, about
        6x faster and half the memory of :meth:`_stepwise`), for masks that are a prefix of
        each row; positions after a row's length then repeat its last state, as the
        step-wise recurrence does, by a gather.

        One call per expert: ATen's RNN kernels take one weight set, and recurrent experts
        cannot share a GEMM the way feed-forward ones do (their states differ).
        """
        k, h = self.num, self.hidden
        outs = []
        for e in range(k):
            xe = x if self.shared_input else x[e]  # [B, L, D]
            w = [self.w_ih[e].T, self.w_hh[e].T, self.b_ih[e, 0], self.b_hh[e, 0]]
            outs.append(_aten_rnn(self.cell, xe, w, training=self.training))
        states = torch.stack(outs)  # [K, B, L, H]
        bsz, length = states.shape[1], states.shape[2]
        last = (lengths - 1).clamp(min=0)  # [B]
        idx = torch.minimum(torch.arange(length, device=states.device)[None, :], last[:, None])
        states = states.gather(2, idx.view(1, bsz, length, 1).expand(k, -1, -1, h))
        empty = lengths == 0  # no element: the state stays at zero
        if bool(empty.any()):
            states = states.masked_fill(empty.view(1, bsz, 1, 1), 0.0)
        return states, states[:, :, -1]

    def _stepwise(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The recurrence step by step with a per-step mask (any mask: padding anywhere)."""
        k, h = self.num, self.hidden
        if self.shared_input:
            bsz, length, d = x.shape
            w = self.w_ih.permute(1, 0, 2).reshape(d, -1)  # [D, K*G*H]
            # [B, L, K, G*H], the last size given: none can be inferred from an empty input
            xi = (x.reshape(bsz * length, d) @ w).view(bsz, length, k, w.shape[1] // k)
            xi = xi.permute(2, 0, 1, 3) + self.b_ih.unsqueeze(1)  # [K, B, L, G*H]
        else:
            _, bsz, length, d = x.shape
            xi = torch.matmul(x, self.w_ih.unsqueeze(1)) + self.b_ih.unsqueeze(1)  # [K,B,L,G*H]
        state = x.new_zeros(k, bsz, h)
        cell = x.new_zeros(k, bsz, h)
        states = []
        for step in range(length):
            m = mask[:, step].view(1, bsz, 1)  # [1, B, 1]
            hh = torch.baddbmm(self.b_hh, state, self.w_hh)  # [K, B, G*H]
            xs = xi[:, :, step]  # [K, B, G*H]
            if self.cell == "lstm":
                i, f, c_in, o = (xs + hh).chunk(4, dim=-1)
                new_cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(c_in)
                new_state = torch.sigmoid(o) * torch.tanh(new_cell)
                cell = torch.where(m, new_cell, cell)
            else:
                xr, xz, xn = xs.chunk(3, dim=-1)
                hr, hz, hn = hh.chunk(3, dim=-1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                new_state = (1 - z) * n + z * state
            state = torch.where(m, new_state, state)  # padding keeps the state
            states.append(state)
        if not states:
            return x.new_zeros(k, bsz, 0, h), state
        return torch.stack(states, dim=2), state  # [K, B, L, H], [K, B, H]
