"""Blocks of auxiliary losses: gradient reversal and next-behaviour prediction.

* Gradient reversal (Y. Ganin, V. Lempitsky, "Unsupervised Domain Adaptation by
  Backpropagation", ICML 2015, Section 3.2): the identity in the forward pass; in the backward
  pass the gradient times ``-lambda``. A head reading a shared representation through it learns
  to predict a domain label while the layers below learn to make the domain unpredictable.
* Next-behaviour prediction (G. Zhou, N. Mou, Y. Fan, Q. Pi, W. Bian, C. Zhou, X. Zhu, K. Gai,
  "Deep Interest Evolution Network for Click-Through Rate Prediction", AAAI 2019, Section 4.2,
  Eq. 1): a GRU runs over the embeddings of a behaviour sequence; its state at step ``t`` scores
  the item of step ``t + 1`` against sampled negatives,
  ``L_aux = -mean_(b,t) [log s(<h_t, e_(t+1)>) + sum_k log(1 - s(<h_t, e^-_(t+1),k>))]``,
  ``s`` the sigmoid, the mean over the valid positions of the batch (Eq. 1 averages over
  sequences and sums over steps; a mean over positions keeps the loss's scale independent of
  the sequence lengths).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrec.batch import FIRST_ID, PAD_ID, Features
from mtlrec.nn.embedding import EmbeddingCollection


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:  # type: ignore[override]
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return -ctx.lam * grad, None


def grad_reverse(x: Tensor, lam: float = 1.0) -> Tensor:
    """``x`` in the forward pass; ``-lam`` times the incoming gradient in the backward pass.

    Shapes:
        any -> the same.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> grad_reverse(x, 0.5).sum().backward()
        >>> x.grad.tolist()
        [-0.5, -0.5]
    """
    if not torch.is_grad_enabled():  # inference and export: the identity, no custom Function
        return x
    out: Tensor = _ReverseGradient.apply(x, lam)
    return out


class GradientReversal(nn.Module):
    """The gradient-reversal layer ``R_lambda`` (Ganin & Lempitsky, ICML 2015, Eq. 9-10).

    Args:
        lam: the factor ``lambda`` of the reversed gradient (>= 0).

    Shapes:
        any -> the same.

    Example:
        >>> grl = GradientReversal(2.0)
        >>> x = torch.ones(3, requires_grad=True)
        >>> (grl(x) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        >>> x.grad.tolist()
        [-2.0, -4.0, -6.0]
    """

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__()
        if lam < 0:
            raise ValueError(f"the reversal factor lambda must be >= 0, got {lam}")
        self.lam = float(lam)

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.lam)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"


def next_behaviour_loss(
    states: Tensor, positives: Tensor, negatives: Tensor, valid: Tensor
) -> Tensor:
    """DIEN's auxiliary loss (Zhou et al., AAAI 2019, Eq. 1) from states and item vectors.

    Args:
        states: ``h_t``, the recurrent state after step ``t``.
        positives: ``e_(t+1)``, the embedding of the item of step ``t + 1``.
        negatives: ``K`` sampled items per step.
        valid: the positions that count (a real step ``t`` and a real item at ``t + 1``).

    Returns:
        ``-mean over valid (b, t) of [log s(<h, e+>) + sum_k log(1 - s(<h, e-_k>))]``; 0 when
        no position is valid.

    Shapes:
        states, positives ``[B, L, E]``; negatives ``[B, L, K, E]``; valid ``[B, L]`` -> ``[]``.

    Example:
        >>> h = torch.tensor([[[1.0, 0.0]]])
        >>> pos, neg = torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[[0.0, 0.0]]]])
        >>> round(float(next_behaviour_loss(h, pos, neg, torch.tensor([[True]]))), 4)
        0.8201
    """
    pos = (states * positives).sum(-1)  # [B, L]
    neg = torch.einsum("ble,blke->blk", states, negatives)  # [B, L, K]
    per = F.logsigmoid(pos) + F.logsigmoid(-neg).sum(-1)  # log s(x) and log(1 - s(x)): [B, L]
    w = valid.to(per.dtype)
    return -(per * w).sum() / w.sum().clamp_min(1.0)


def sample_negatives(positives: Tensor, rows: int, k: int) -> Tensor:
    """``k`` ids per position drawn uniformly from a table's real ids (``FIRST_ID ..
    rows - 1``) other than the position's own item (from torch's generator: seeded by the
    trainer, saved in checkpoints).

    Shapes:
        ``[B, L]`` -> ``[B, L, k]`` (int64).

    Example:
        >>> torch.manual_seed(0) and None
        >>> ids = sample_negatives(torch.tensor([[2, 3]]), rows=4, k=5)
        >>> bool((ids != torch.tensor([[2, 3]]).unsqueeze(-1)).all()), ids.min() >= 2
        (True, tensor(True))
    """
    real = rows - FIRST_ID
    shape = (*positives.shape, k)
    if real < 2:  # nothing but the item itself to draw
        return torch.full(shape, FIRST_ID, dtype=torch.long, device=positives.device)
    draw = torch.randint(0, real - 1, shape, device=positives.device) + FIRST_ID  # [B, L, k]
    pos = positives.long().unsqueeze(-1)  # [B, L, 1]
    return draw + (draw >= pos).long()  # skip the positive: uniform over the other real ids


class NextBehaviourLoss(nn.Module):
    """DIEN's interest-extractor GRU and auxiliary loss over one sequence feature.

    The sequence's order is the behaviour order (oldest first, as written in the data); rows
    are right-padded. The item vectors are the model's own embeddings of the sequence (so the
    loss trains the shared item table); negatives come from the same table.

    Args:
        feature: the sequence feature.
        table: its embedding table.
        dim: the table's width (the GRU's state has the same, for the inner products).
        rows: the table's number of rows (padding and OOV included).
        negatives: sampled negatives per position.

    Shapes:
        ``(EmbeddingCollection, Features [B, L])`` -> ``[]``.
    """

    def __init__(self, feature: str, table: str, dim: int, rows: int, negatives: int = 1) -> None:
        super().__init__()
        if negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {negatives}")
        self.feature, self.table, self.rows, self.negatives = feature, table, rows, negatives
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def forward(self, embedding: EmbeddingCollection, features: Features) -> Tensor:
        values, mask = embedding.embed_sequence(features, self.feature)  # [B, L, E], [B, L]
        ids = features.sequences[self.feature]  # [B, L]
        states, _ = self.gru(values)  # [B, L, E]
        nxt = ids[:, 1:]  # [B, L-1]: the item after each step
        valid = mask[:, :-1] & (nxt != PAD_ID) & (nxt >= FIRST_ID)  # [B, L-1]
        neg_ids = sample_negatives(nxt, self.rows, self.negatives)  # [B, L-1, K]
        negatives = embedding.embed_ids(self.table, neg_ids)  # [B, L-1, K, E]
        return next_behaviour_loss(states[:, :-1], values[:, 1:], negatives, valid)
