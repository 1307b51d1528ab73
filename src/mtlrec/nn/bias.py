"""Selection-bias features and the shallow bias tower.

Paper: Z. Zhao, L. Hong, L. Wei, J. Chen, A. Nath, S. Andrews, A. Kumthekar, M. Sathiamoorthy,
X. Yi, E. Chi, "Recommending What Video to Watch Next: A Multitask Ranking System", RecSys 2019,
Section 4.3 and Figure 4. Clicks depend on how relevant an item is and on where it was shown
(its position, the device...). A shallow tower reads only those selection-bias features and its
logit is added to the main model's logit of the chosen tasks in training, so the main model is
not asked to explain the bias; the bias features get feature drop-out in training (the paper:
10%) so that the main model does not lean on them; at serving the bias features are absent
and the shallow logit is dropped (or taken at a configured value), so scores are position-free.

The schema marks the bias features (``role: bias``); they are never part of the main model's
input (:class:`~mtlrec.nn.embedding.FeatureLayout` leaves them out, ``layout.bias`` holds them).
A batch's features are split by name (:func:`split_bias`) before the main model runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtlrec.batch import FIRST_ID, OOV_ID, PAD_ID, Features
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout
from mtlrec.nn.mlp import MLP


@dataclass(frozen=True, slots=True)
class MainFeatures(Features):
    """The main model's view of a batch: the features without the bias ones, which are kept
    apart in ``bias`` for the bias tower (None when the batch had none, e.g. at serving).

    Shapes:
        as :class:`~mtlrec.batch.Features`; ``bias`` holds the bias columns in the order of
        the bias layout.
    """

    bias: Features | None = None


def _columns(names: Sequence[str], wanted: Sequence[str]) -> list[int] | None:
    """Positions of ``wanted`` in ``names`` (None if none is there)."""
    at = {n: i for i, n in enumerate(names)}
    found = [at[w] for w in wanted if w in at]
    if not found:
        return None
    if len(found) != len(wanted):
        missing = [w for w in wanted if w not in at]
        raise ValueError(f"the batch holds some bias features but not {missing}")
    return found


def split_bias(features: Features, bias: FeatureLayout) -> MainFeatures:
    """Split a batch into the main model's features and the bias features (by name).

    Args:
        features: a batch, with or without the bias features (the column names tell).
        bias: the bias features' layout (``FeatureLayout.bias``).

    Returns:
        The features without the bias ones; ``bias`` holds those (None when the batch has
        none of them).

    Raises:
        ValueError: the batch holds some of the bias features but not all.

    Example:
        >>> import torch
        >>> from mtlrec.nn.embedding import FeatureLayout, FieldSpec
        >>> lay = FeatureLayout((FieldSpec("pos", "pos", 2),), (), (), {"pos": 5}, {"pos": 2})
        >>> f = Features(torch.tensor([[3, 4]], dtype=torch.int32), torch.zeros(1, 0),
        ...              sparse_names=("item", "pos"))
        >>> m = split_bias(f, lay)
        >>> m.sparse_names, m.sparse.tolist(), m.bias.sparse.tolist()
        (('item',), [[3]], [[4]])
    """
    if isinstance(features, MainFeatures):
        return features
    s_bias = [f.name for f in bias.sparse]
    q_bias = [s.name for s in bias.sequences]
    s_cols = _columns(features.sparse_names, s_bias) if s_bias else None
    d_cols = _columns(features.dense_names, bias.dense) if bias.dense else None
    q_have = [n for n in q_bias if n in features.sequences]
    if q_have and len(q_have) != len(q_bias):
        raise ValueError(f"the batch holds some bias sequences but not {set(q_bias) - set(q_have)}")
    # per kind of bias feature the layout has (sparse, dense, sequence): in the batch?
    kinds = ((s_bias, s_cols), (bias.dense, d_cols), (q_bias, q_have))
    present = [bool(found) for wanted, found in kinds if wanted]
    if not any(present):
        return MainFeatures(
            features.sparse,
            features.dense,
            features.sequences,
            features.sparse_names,
            features.dense_names,
        )
    if not all(present):
        raise ValueError("the batch holds some bias features but not all of them")
    s_keep = [i for i, n in enumerate(features.sparse_names) if n not in set(s_bias)]
    d_keep = [i for i, n in enumerate(features.dense_names) if n not in set(bias.dense)]
    b = features.batch_size
    sparse_b = features.sparse[:, s_cols] if s_cols else features.sparse.new_zeros(b, 0)
    dense_b = features.dense[:, d_cols] if d_cols else features.dense.new_zeros(b, 0)
    bias_feats = Features(
        sparse_b,  # [B, F_bias]
        dense_b,  # [B, D_bias]
        {n: features.sequences[n] for n in q_bias},
        tuple(s_bias),
        tuple(bias.dense),
    )
    return MainFeatures(
        features.sparse[:, s_keep],  # [B, F - F_bias]
        features.dense[:, d_keep],  # [B, D - D_bias]
        {k: v for k, v in features.sequences.items() if k not in set(q_bias)},
        tuple(features.sparse_names[i] for i in s_keep),
        tuple(features.dense_names[i] for i in d_keep),
        bias=bias_feats,
    )


class BiasTower(nn.Module):
    """A shallow tower over the selection-bias features: one logit per chosen task, added to
    the main model's logits in training (Zhao et al., RecSys 2019, Figure 4).

    Args:
        layout: the bias features (``FeatureLayout.bias``).
        tasks: the tasks whose logit gets the bias logit (one output each).
        hidden: hidden widths (empty: a linear model over the bias features).
        feature_dropout: in training, each bias feature of each row is replaced by "missing"
            with this probability (sparse: the OOV id; dense: 0; a sequence: empty).
        serve: what the tower adds outside training: None drops it (scores are the main
            model's alone); a mapping gives the bias features' values to score at (raw
            values of pre-indexed ids or untransformed numbers, see ``layout.direct``); the
            features it does not name are missing (``{}``: all missing, as the paper serves).
            Either way, scores do not depend on the row's own bias features.
        activation: of the hidden layers.
        init_std: standard deviation of the tables' initialisation.

    Shapes:
        ``Features`` of the bias columns ``[B, ...]`` -> ``[B, T]`` in training; ``[1, T]``
        (a constant per task) or None outside training.

    Example:
        >>> import torch
        >>> from mtlrec.nn.embedding import FeatureLayout, FieldSpec
        >>> lay = FeatureLayout((FieldSpec("pos", "pos", 2),), (), (), {"pos": 7}, {"pos": 2},
        ...                     direct=frozenset({"pos"}))
        >>> tower = BiasTower(lay, ["click"], serve={"pos": 0})
        >>> f = Features(torch.tensor([[2], [5]], dtype=torch.int32), torch.zeros(2, 0),
        ...              sparse_names=("pos",))
        >>> tower(f).shape, tower.eval()(None).shape
        (torch.Size([2, 1]), torch.Size([1, 1]))
    """

    def __init__(
        self,
        layout: FeatureLayout,
        tasks: Sequence[str],
        hidden: Sequence[int] = (16,),
        *,
        feature_dropout: float = 0.1,
        serve: Mapping[str, float] | None = None,
        activation: str = "relu",
        init_std: float = 0.05,
    ) -> None:
        super().__init__()
        if not 0.0 <= feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must be in [0, 1), got {feature_dropout}")
        self.layout = layout
        self.tasks = tuple(tasks)
        self.feature_dropout = feature_dropout
        self.embedding = EmbeddingCollection(layout, init_std=init_std, pad_to=1)
        self.mlp = MLP(
            self.embedding.out_dim,
            [*hidden, len(self.tasks)],
            activation=activation,
            last_activation=False,
        )
        self.serves = serve is not None
        sparse, dense = _serving_values(layout, dict(serve or {}))
        # the bias features scored at outside training (derived from the options: not saved)
        self.register_buffer("_serve_sparse", sparse, persistent=False)  # [1, F_bias]
        self.register_buffer("_serve_dense", dense, persistent=False)  # [1, D_bias]

    def logits(self, bias: Features) -> Tensor:
        """The tower's logits of some bias features, ``[B, T]``."""
        return self.mlp(self.embedding(bias).flat)  # [B, T]

    def drop_features(self, bias: Features) -> Features:
        """Feature drop-out: each bias feature of each row set to missing with probability
        ``feature_dropout`` (training only)."""
        p = self.feature_dropout
        if p == 0.0:
            return bias
        s = bias.sparse
        sparse = torch.where(torch.rand(s.shape, device=s.device) < p, OOV_ID, s)  # [B, F]
        d = bias.dense
        dense = torch.where(torch.rand(d.shape, device=d.device) < p, 0.0, d)  # [B, D]
        seqs = {
            k: torch.where(torch.rand(v.shape[0], 1, device=v.device) < p, PAD_ID, v)  # [B, L]
            for k, v in bias.sequences.items()
        }
        return Features(sparse, dense, seqs, bias.sparse_names, bias.dense_names)

    def serving_features(self) -> Features:
        """The one row of bias features scored outside training."""
        seqs = {
            s.name: torch.full(
                (1, s.max_len), PAD_ID, dtype=torch.int32, device=self._serve_sparse.device
            )
            for s in self.layout.sequences
        }
        return Features(
            self._serve_sparse,
            self._serve_dense,
            seqs,
            tuple(f.name for f in self.layout.sparse),
            self.layout.dense,
        )

    def forward(self, bias: Features | None) -> Tensor | None:
        if self.training:
            if bias is None:
                raise ValueError(
                    "the bias tower needs the bias features "
                    f"{[f.name for f in self.layout.sparse] + list(self.layout.dense)} "
                    "in training (role: bias columns of the training data)"
                )
            return self.logits(self.drop_features(bias))  # [B, T]
        if not self.serves:
            return None
        return self.logits(self.serving_features())  # [1, T]


def _serving_values(layout: FeatureLayout, values: dict[str, float]) -> tuple[Tensor, Tensor]:
    """The encoded bias features of the serving row: ``[1, F]`` ids, ``[1, D]`` values."""
    sparse_names = [f.name for f in layout.sparse]
    known = set(sparse_names) | set(layout.dense)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"serve_as names {unknown}: not sparse or dense bias features "
            f"(bias features: {sorted(known)})"
        )
    indirect = sorted(n for n in values if n not in layout.direct)
    if indirect:
        raise ValueError(
            f"serve_as {indirect[0]!r}: only pre-indexed ids (vocab_size) and untransformed "
            "numbers (transform: none) can be given as values (the model holds no encoders); "
            "use serve_as: drop or missing for the others"
        )
    ids = torch.full((1, len(sparse_names)), OOV_ID, dtype=torch.int32)
    for j, f in enumerate(layout.sparse):
        if f.name in values:
            v = values[f.name]
            rows = layout.table_sizes[f.table] - FIRST_ID
            if v != int(v) or not 0 <= int(v) < rows:
                raise ValueError(f"serve_as {f.name}: {v} is not an id in [0, {rows})")
            ids[0, j] = int(v) + FIRST_ID
    dense = torch.zeros(1, len(layout.dense))
    for j, n in enumerate(layout.dense):
        if n in values:
            dense[0, j] = float(values[n])
    return ids, dense
