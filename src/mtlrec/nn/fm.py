"""Factorization-machine term: first- plus second-order interactions of the input fields.

``y_FM = w_0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j`` (Rendle, ICDM 2010); with one-hot
fields the pairwise sum is ``0.5 * sum_k ((sum_i v_ik)^2 - sum_i v_ik^2)``, computed in O(F E)
instead of O(F^2 E). DeepFM (Guo et al., IJCAI 2017) adds it to a deep network's logit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout, FieldSpec, SequenceSpec


def pairwise_interactions(v: Tensor) -> Tensor:
    """``sum_{i<j} <v_i, v_j>`` per row by the square-of-sum identity.

    Shapes:
        ``[B, F, E] -> [B]``.

    Example:
        >>> import torch
        >>> v = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.5, 0.0]]])
        >>> float(pairwise_interactions(v))  # 11 + 0.5 + 1.5
        13.0
    """
    s = v.sum(dim=1)  # [B, E]
    return 0.5 * (s.square() - v.square().sum(dim=1)).sum(dim=-1)  # [B]


def _layout_with_dim(layout: FeatureLayout, dim: int) -> FeatureLayout:
    return FeatureLayout(
        sparse=tuple(FieldSpec(f.name, f.table, dim) for f in layout.sparse),
        sequences=tuple(
            SequenceSpec(s.name, s.table, dim, "mean", s.max_len) for s in layout.sequences
        ),
        dense=layout.dense,
        table_sizes=dict(layout.table_sizes),
        table_dims={k: dim for k in layout.table_sizes},
    )


class FactorizationMachine(nn.Module):
    """First- and second-order FM term over every categorical field (sequences mean-pooled
    count as fields; dense values enter the first-order part linearly).

    The FM keeps its own tables (a width-1 one for the first order and a width-``dim`` one for
    the factors), so it can be added to any architecture whatever its embeddings.

    Args:
        layout: the model's inputs.
        dim: width of the factors ``v_i``.
        init_std: standard deviation of the tables' normal initialisation.

    Shapes:
        ``Features -> [B]``.
    """

    def __init__(self, layout: FeatureLayout, dim: int = 8, *, init_std: float = 0.01) -> None:
        super().__init__()
        self.n_cat = len(layout.sparse) + len(layout.sequences)
        self.first = EmbeddingCollection(_layout_with_dim(layout, 1), init_std=init_std, pad_to=1)
        self.factors = EmbeddingCollection(
            _layout_with_dim(layout, dim), init_std=init_std, pad_to=1
        )
        self.dense = nn.Linear(len(layout.dense), 1) if layout.dense else None
        self.bias = nn.Parameter(torch.zeros(()))
        self.dim = dim

    def field_vectors(self, features: Features) -> Tensor:
        """The factor vector of every categorical field, ``[B, F, dim]``."""
        flat = self.factors(features).flat  # [B, F*dim + dense]
        b = flat.shape[0]
        return flat[:, : self.n_cat * self.dim].view(b, self.n_cat, self.dim)  # [B, F, dim]

    def forward(self, features: Features) -> Tensor:
        first = self.first(features).flat[:, : self.n_cat].sum(dim=1)  # [B]
        if self.dense is not None:
            first = first + self.dense(features.dense).squeeze(-1)
        return self.bias + first + pairwise_interactions(self.field_vectors(features))  # [B]
