"""All categorical fields embedded by one lookup into one fused table.

Tables of the same width are concatenated into one ``nn.Embedding``; every field adds its table's
row offset to its local ids, so the sparse fields of a batch are embedded by a single gather
(``weight[ids + offsets]``). Features naming the same table (e.g. the item id and the clicked-item
history) read the same rows. Sequences are pooled (mean / sum / max over the non-padding
positions) with ``embedding_bag`` or kept whole for sequence models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrec.batch import PAD_ID, Features
from mtlrec.schema import Schema


@dataclass(frozen=True)
class FieldSpec:
    name: str
    table: str
    dim: int


@dataclass(frozen=True)
class SequenceSpec:
    name: str
    table: str
    dim: int
    pooling: str
    max_len: int


@dataclass(frozen=True)
class FeatureLayout:
    """What a model needs to know of its inputs: fields, tables and their sizes.

    Built from a schema and the fitted encoders' table sizes; it fixes the model's input width.
    """

    sparse: tuple[FieldSpec, ...]
    sequences: tuple[SequenceSpec, ...]
    dense: tuple[str, ...]
    table_sizes: dict[str, int]
    table_dims: dict[str, int]
    #: which implementation holds the tables: ``torch`` (:class:`EmbeddingCollection`) or
    #: ``torchrec`` (:mod:`mtlrec.nn.torchrec_embedding`); read by ``make_embedding`` only
    backend: str = "torch"
    #: the schema's selection-bias features (``role: bias``), which are not part of this input:
    #: read only by a bias tower (:mod:`mtlrec.nn.bias`); None when the schema has none
    bias: FeatureLayout | None = None
    #: features whose encoded value needs no fitted encoder: pre-indexed ids (``vocab_size``:
    #: value ``v`` is id ``v + 2``) and untransformed numbers (``transform: none``)
    direct: frozenset[str] = frozenset()

    @classmethod
    def from_schema(cls, schema: Schema, table_sizes: dict[str, int]) -> FeatureLayout:
        missing = set(schema.tables()) - set(table_sizes)
        if missing:
            raise ValueError(f"no table size for {sorted(missing)}")
        if schema.bias_features:  # the main input without them; theirs apart
            bias = [f.model_copy(update={"role": "input"}) for f in schema.bias_features]
            main = [f for f in schema.features if f.role != "bias"]
            split = (schema.model_copy(update={"features": tuple(fs)}) for fs in (main, bias))
            lay_main, lay_bias = (cls.from_schema(s, table_sizes) for s in split)
            return dataclasses.replace(lay_main, bias=lay_bias)
        return cls(
            sparse=tuple(FieldSpec(f.name, f.table_name, f.embedding_dim) for f in schema.sparse),
            sequences=tuple(
                SequenceSpec(f.name, f.table_name, f.embedding_dim, f.pooling, f.max_len)
                for f in schema.sequences
            ),
            dense=tuple(f.name for f in schema.dense),
            table_sizes={k: int(table_sizes[k]) for k in schema.tables()},
            table_dims={k: v[0].embedding_dim for k, v in schema.tables().items()},
            direct=frozenset(
                f.name
                for f in schema.features
                if getattr(f, "vocab_size", None) is not None
                or getattr(f, "transform", None) == "none"
            ),
        )

    @property
    def flat_dim(self) -> int:
        """Width of the concatenated input: sparse embeddings, pooled sequences, dense values."""
        return (
            sum(f.dim for f in self.sparse) + sum(s.dim for s in self.sequences) + len(self.dense)
        )


@dataclass
class Embedded:
    """Embedded inputs of one batch.

    Shapes:
        flat: ``[B, out_dim]`` — sparse embeddings, pooled sequences and dense values side
            by side (the usual input of experts and bottoms), then zero padding up to
            ``out_dim``.
        fields: ``[B, F_sparse, E]`` when all sparse fields share one width, else None (for
            factorization-machine terms).
        dense: ``[B, F_dense]``.
    """

    flat: Tensor
    fields: Tensor | None
    dense: Tensor


class EmbeddingCollection(nn.Module):
    """Every embedding table of a schema, fused by width.

    Args:
        layout: the inputs (fields, tables, sizes).
        init_std: standard deviation of the normal initialisation of all tables.
        pad_to: round the flat width up to a multiple of this with zero columns (GEMMs with an
            inner dimension of a multiple of 8 run up to 30% faster on x86 BLAS; the zeros
            change no result). 1 disables.

    Example:
        >>> import torch
        >>> from mtlrec.nn.embedding import FeatureLayout, FieldSpec, EmbeddingCollection
        >>> lay = FeatureLayout((FieldSpec("a", "a", 4), FieldSpec("b", "b", 4)), (), ("x",),
        ...                     {"a": 5, "b": 7}, {"a": 4, "b": 4})
        >>> emb = EmbeddingCollection(lay)
        >>> from mtlrec.batch import Features
        >>> f = Features(torch.tensor([[2, 3]], dtype=torch.int32), torch.ones(1, 1))
        >>> emb(f).flat.shape  # 4 + 4 + 1 values, zero-padded to a multiple of 8
        torch.Size([1, 16])
    """

    def __init__(self, layout: FeatureLayout, *, init_std: float = 0.05, pad_to: int = 8) -> None:
        super().__init__()
        self.layout = layout
        dims = sorted(set(layout.table_dims.values()))
        self._dim_key = {d: f"d{d}" for d in dims}
        self.tables = nn.ModuleDict()
        table_offset: dict[str, int] = {}
        for d in dims:
            rows = 0
            for name, size in layout.table_sizes.items():
                if layout.table_dims[name] == d:
                    table_offset[name] = rows
                    rows += size
            emb = nn.Embedding(rows, d)
            nn.init.normal_(emb.weight, std=init_std)
            self.tables[self._dim_key[d]] = emb
        self.table_offset = table_offset
        # sparse fields grouped by width: column positions and row offsets per group
        self._groups: list[tuple[str, str]] = []
        for d in dims:
            cols = [i for i, f in enumerate(layout.sparse) if f.dim == d]
            if not cols:
                continue
            key = self._dim_key[d]
            self.register_buffer(f"_cols_{key}", torch.tensor(cols), persistent=False)
            offs = [table_offset[layout.sparse[i].table] for i in cols]
            self.register_buffer(
                f"_offs_{key}", torch.tensor(offs, dtype=torch.int32), persistent=False
            )
            self._groups.append((key, f"_cols_{key}"))
        self._single = len(self._groups) == 1 and len(layout.sparse) > 0
        self.sparse_grad = False  # set by the trainer (optimizer.sparse_embeddings)
        self.pad = -layout.flat_dim % pad_to
        self.out_dim = layout.flat_dim + self.pad

    def table_weight(self, table: str) -> Tensor:
        """The rows of one table (a view into its fused weight)."""
        d = self.layout.table_dims[table]
        off = self.table_offset[table]
        w: Tensor = self.tables[self._dim_key[d]].weight
        return w[off : off + self.layout.table_sizes[table]]

    def embed_ids(self, table: str, ids: Tensor) -> Tensor:
        """Rows of one table for local ids of any shape (``[...] -> [..., E]``), e.g. sampled
        negatives; gradients as for the batch's own lookups (sparse when the tables are)."""
        weight = self.tables[self._dim_key[self.layout.table_dims[table]]].weight
        return F.embedding(ids + self.table_offset[table], weight, sparse=self.sparse_grad)

    def embed_fields(self, features: Features) -> list[Tensor]:
        """Sparse fields embedded, one ``[B, F_group, E_group]`` tensor per width group."""
        out = []
        for key, cols_name in self._groups:
            offs: Tensor = getattr(self, f"_offs_{key}")
            ids = features.sparse if self._single else features.sparse[:, getattr(self, cols_name)]
            weight = self.tables[key].weight
            out.append(F.embedding(ids + offs, weight, sparse=self.sparse_grad))  # [B, F_g, E_g]
        return out

    def embed_sequence(self, features: Features, name: str) -> tuple[Tensor, Tensor]:
        """A sequence feature unpooled.

        Returns:
            ``(values [B, L, E], mask [B, L])``; mask is true on real (non-padding) positions.
        """
        spec = next(s for s in self.layout.sequences if s.name == name)
        ids = features.sequences[name]
        weight = self.tables[self._dim_key[spec.dim]].weight
        gids = ids + self.table_offset[spec.table]
        return F.embedding(gids, weight, sparse=self.sparse_grad), ids != PAD_ID

    def _pool(self, features: Features, spec: SequenceSpec) -> Tensor:
        ids = features.sequences[spec.name]  # [B, L]
        mask = ids != PAD_ID
        weight = self.tables[self._dim_key[spec.dim]].weight
        gids = ids + self.table_offset[spec.table]
        if spec.pooling == "max":
            vals = F.embedding(gids, weight, sparse=self.sparse_grad)
            vals = vals.masked_fill(~mask.unsqueeze(-1), float("-inf"))
            pooled = vals.amax(dim=1)  # [B, E]
            return torch.where(mask.any(1, keepdim=True), pooled, torch.zeros_like(pooled))
        w = mask.to(weight.dtype)
        if spec.pooling == "mean":
            w = w / mask.sum(1, keepdim=True).clamp_min(1).to(weight.dtype)
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            # ONNX has no embedding_bag (the exporter writes a loop over rows): the same
            # weighted sum as a gather and a reduction
            vals = F.embedding(gids, weight)  # [B, L, E]
            return (vals * w.unsqueeze(-1)).sum(1)  # [B, E]
        return F.embedding_bag(
            gids, weight, mode="sum", per_sample_weights=w, sparse=self.sparse_grad
        )  # [B, E]

    def forward(self, features: Features) -> Embedded:
        groups = self.embed_fields(features)
        parts = [g.flatten(1) for g in groups]  # [B, F_g * E_g]
        parts += [self._pool(features, s) for s in self.layout.sequences]
        if features.dense.shape[1]:
            parts.append(features.dense)
        if self.pad:
            # [B, pad] zeros shaped from a column of parts[0] (no batch size as a Python int):
            # traced and ONNX exports keep the batch size dynamic
            parts.append(torch.zeros_like(parts[0][:, :1]).expand(-1, self.pad))
        flat = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return Embedded(flat, groups[0] if self._single else None, features.dense)
