"""The wide part of Wide & Deep: a linear model over sparse features and their crosses.

Cheng et al., "Wide & Deep Learning for Recommender Systems", DLRS 2016: the wide component is
``y = w^T [x, phi(x)] + b`` over the raw (one-hot) sparse features ``x`` and cross-product
transformations ``phi_k(x)``, each 1 exactly when every feature of cross ``k`` takes a given
value; its logit is added to the deep network's, and both are trained jointly (the paper: FTRL
with L1 on the wide side, AdaGrad on the deep side; here ``training.optimizer.groups`` with
``ftrl`` on ``wide.*``).

A feature's weights are rows of a table indexed by its ids; a cross's weights are rows of a
table of ``buckets`` rows indexed by a hash of its features' ids. The hash is computed here, in
the model, on the id tensors with integer multiplications and remainders (no strings, no Python
per row), so it runs the same in training, in ``predict``, in an exported ONNX / TorchScript
graph and in the scoring service, and it depends only on the features' names and ids.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.nn.embedding import EmbeddingCollection, FeatureLayout, FieldSpec

HASH_PRIME = 2_147_483_647
"""The Mersenne prime ``2^31 - 1``: the field the cross hash works in (every product of two
residues stays below ``2^62``, inside int64)."""
_STEP = 1_000_003


def cross_name(features: Sequence[str]) -> str:
    """The name of a cross: its features joined by ``*`` (``user*item``)."""
    return "*".join(features)


def _multiplier(cross: str, feature: str) -> int:
    """A constant in ``[1, HASH_PRIME)`` per (cross, feature), fixed by their names (CRC-32, so
    the same in every process and version of Python)."""
    return 1 + zlib.crc32(f"{cross}:{feature}".encode()) % (HASH_PRIME - 1)


def hash_cross(ids: Sequence[Tensor], multipliers: Sequence[int], buckets: int) -> Tensor:
    """The bucket of every row's combination of ids: a polynomial hash over ``GF(2^31 - 1)``.

    ``h = 0; for each feature j: h = (h * 1000003 + id_j * a_j) mod (2^31 - 1)``, then
    ``h mod buckets``. Integer ops only (int64), so export graphs keep it.

    Args:
        ids: one ``[B]`` integer tensor per feature of the cross (ids >= 0, below ``2^31``).
        multipliers: ``a_j`` per feature, in ``[1, 2^31 - 1)``.
        buckets: the size of the cross's table.

    Returns:
        ``[B]`` int64 bucket indices in ``[0, buckets)``.

    Example:
        >>> import torch
        >>> a, b = torch.tensor([2, 2, 3]), torch.tensor([5, 5, 5])
        >>> h = hash_cross([a, b], [7, 11], 1000)
        >>> bool(h[0] == h[1]), bool(h[0] == h[2])  # equal combinations, equal buckets
        (True, False)
    """
    h = torch.zeros_like(ids[0], dtype=torch.int64)
    for x, a in zip(ids, multipliers, strict=True):
        term = torch.remainder(x.to(torch.int64) * a, HASH_PRIME)  # [B], < 2^31
        h = torch.remainder(torch.remainder(h * _STEP, HASH_PRIME) + term, HASH_PRIME)
    return torch.remainder(h, buckets)  # [B]


class WideLinear(nn.Module):
    """A linear model per task over some sparse features and hashed crosses of them.

    Every wide feature and every cross is a field of one width-``T`` embedding collection
    (``T``: the number of tasks the wide part feeds), zero-initialised as in FTRL: one gather
    gives every task its own weight of every field; the sum over the fields plus a per-task
    bias is each task's wide logit. The tables follow ``optimizer.sparse_embeddings`` like the
    deep tables (sparse gradients, lazy updates).

    Args:
        layout: the model's inputs.
        tasks: the tasks whose logits get a wide term (one output column each).
        features: sparse features with a weight per id (their own tables, not the deep part's).
        crosses: tuples of two or more sparse features, each hashed into ``buckets`` rows.
        buckets: rows of every cross's table.

    Shapes:
        ``Features -> [B, T]``.

    Example:
        >>> import torch
        >>> from mtlrec.batch import Features
        >>> from mtlrec.nn.embedding import FeatureLayout, FieldSpec
        >>> lay = FeatureLayout((FieldSpec("user", "user", 4), FieldSpec("item", "item", 4)),
        ...                     (), (), {"user": 5, "item": 7}, {"user": 4, "item": 4})
        >>> wide = WideLinear(lay, ["click"], ["user"], [("user", "item")], buckets=64)
        >>> f = Features(torch.tensor([[2, 3], [4, 3]], dtype=torch.int32), torch.zeros(2, 0))
        >>> wide(f).shape
        torch.Size([2, 1])
    """

    def __init__(
        self,
        layout: FeatureLayout,
        tasks: Sequence[str],
        features: Sequence[str],
        crosses: Sequence[Sequence[str]],
        buckets: int,
    ) -> None:
        super().__init__()
        sparse = [f.name for f in layout.sparse]
        for name in [*features, *(f for c in crosses for f in c)]:
            if name not in sparse:
                raise ValueError(
                    f"wide part: {name!r} is not a sparse feature; the sparse features are {sparse}"
                )
        for c in crosses:
            if len(c) < 2 or len(set(c)) != len(c):
                raise ValueError(f"wide_crosses: {list(c)} must name two or more features")
        if not features and not crosses:
            raise ValueError("wide part: no feature and no cross")
        width = len(tasks)
        table = {f.name: f.table for f in layout.sparse}
        names = [cross_name(c) for c in crosses]
        fields = [FieldSpec(f, f"wide:{f}", width) for f in features]
        fields += [FieldSpec(f"cross:{n}", f"wide:cross:{n}", width) for n in names]
        sizes = {f"wide:{f}": layout.table_sizes[table[f]] for f in features}
        sizes |= {f"wide:cross:{n}": buckets for n in names}
        wide_layout = FeatureLayout(tuple(fields), (), (), sizes, {k: width for k in sizes})
        self.weights = EmbeddingCollection(wide_layout, pad_to=1)
        for p in self.weights.parameters():
            nn.init.zeros_(p)  # FTRL starts from w = 0
        self.bias = nn.Parameter(torch.zeros(width))
        self.tasks = tuple(tasks)
        self.buckets = buckets
        self.register_buffer(
            "_cols",
            torch.tensor([sparse.index(f) for f in features], dtype=torch.long),
            persistent=False,
        )
        self._crosses = [
            ([sparse.index(f) for f in c], [_multiplier(n, f) for f in c])
            for c, n in zip(crosses, names, strict=True)
        ]

    def field_ids(self, features: Features) -> Tensor:
        """The ids of every wide field: the features' own ids, then every cross's bucket.

        Shapes:
            ``[B, F_wide + C]`` int64.
        """
        cols = [features.sparse[:, self._cols].to(torch.int64)]  # [B, F_wide]
        for idx, mult in self._crosses:
            ids = [features.sparse[:, i] for i in idx]
            cols.append(hash_cross(ids, mult, self.buckets).unsqueeze(1))  # [B, 1]
        return torch.cat(cols, dim=1)  # [B, F_wide + C]

    def forward(self, features: Features) -> Tensor:
        ids = self.field_ids(features)
        b = ids.shape[0]
        wide = Features(ids, features.dense[:, :0])
        (w,) = self.weights.embed_fields(wide)  # [B, F_wide + C, T]: one width, one group
        return w.sum(dim=1).view(b, -1) + self.bias  # [B, T]
