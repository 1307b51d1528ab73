"""The TorchRec embedding backend: the same object as :class:`~mtlrec.nn.embedding.
EmbeddingCollection`, with the tables in a TorchRec ``EmbeddingBagCollection`` that can be
sharded across processes.

Chosen by ``model.embedding_backend: torchrec`` (:meth:`MultiTaskModel.make_embedding`); a model
reads ``self.embedding(features)`` (an :class:`~mtlrec.nn.embedding.Embedded`) and ``out_dim``
whichever backend it runs on. What differs:

* every table is one ``EmbeddingBagConfig`` (features naming the same table share it); each
  sparse field is a bag of one id, each sequence a bag of its non-padding ids, pooled by the bag
  (``sum`` or ``mean``, as the schema says). ``max`` pooling and unpooled sequences (MoSE's
  :meth:`embed_sequence`) need TorchRec's ``EmbeddingCollection`` and are refused;
* the tables are built on the ``meta`` device: no process ever allocates a whole table. They
  become real when :meth:`shard` places each table's shards on their processes (the trainer
  does it, :mod:`mtlrec.train.sharded`) and fills the local shards from :func:`initial_rows`,
  which depends only on ``(seed, module path, table, row)``: a one-process run and an N-process
  run of any plan start from the same weights;
* the tables are updated by a fused optimiser inside backward (FBGEMM's CPU or CUDA kernels),
  never by ``torch.optim``: they have no ``.grad``.

``torchrec`` is an optional dependency (``pip install mtlrec[torchrec]``; see the README for
the ``--no-deps`` install of torchrec and fbgemm-gpu-cpu); it is imported when such a module is
built, never by ``import mtlrec``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtlrec.batch import PAD_ID, Features
from mtlrec.errors import ConfigError
from mtlrec.nn.embedding import Embedded, FeatureLayout

#: rows drawn from one generator by :func:`initial_rows` (a shard boundary may fall anywhere)
INIT_BLOCK_ROWS = 65_536

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")


def require_torchrec() -> None:
    """Import torchrec and fbgemm_gpu, or raise a :class:`ConfigError` saying how to install
    them."""
    try:
        with warnings.catch_warnings():  # torch.jit deprecations raised by torchrec's imports
            warnings.simplefilter("ignore", DeprecationWarning)
            import fbgemm_gpu  # noqa: F401
            import torchrec  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "model.embedding_backend: torchrec needs torchrec and fbgemm-gpu-cpu (or fbgemm-gpu "
            "on CUDA), installed without their dependencies after torch: pip install --no-deps "
            "torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0 tensordict==0.15.3 torchmetrics==1.0.3 && "
            f"pip install 'mtlrec[torchrec]' ({e})"
        ) from None
    # torch.fx logs once that is_fx_tracing changed meaning; torchrec calls it on every
    # forward, and the line says nothing to a user of mtlrec
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence TorchRec's deprecation notices (ShardedTensor, apply_optimizer_in_backward)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Please use DTensor", FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchrec")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
        yield


def _mix(*values: int) -> int:
    """SplitMix64 of the values chained (a generator seed below 2^63)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v % 2**64)) & 0xFFFFFFFFFFFFFFFF
        h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h = z ^ (z >> 31)
    return h >> 1


def initial_rows(
    seed: int,
    key: str,
    rows: tuple[int, int],
    shape: tuple[int, int],
    std: float,
    cols: tuple[int, int] | None = None,
) -> Tensor:
    """Initial values of rows ``rows[0]:rows[1]`` (columns ``cols``) of a table of ``shape``:
    ``N(0, std^2)``, drawn in blocks of :data:`INIT_BLOCK_ROWS` rows (the last block shorter),
    block ``k`` whole from a generator seeded by ``(seed, key, k)``. A block is always drawn
    whole (torch's normal sampler fills a tensor in chunks, so a shorter draw would not be a
    prefix of a longer one): any shard of a table can be filled alone and equals the same
    slice of the whole table.

    Args:
        seed: the run's seed (``training.seed``).
        key: the table's identity (module path and table name).
        rows: first and end row.
        shape: the whole table's ``(rows, width)``.
        std: standard deviation (``embedding_init_std``).
        cols: first and end column (None: all).

    Returns:
        ``[rows[1] - rows[0], cols[1] - cols[0]]`` float32.

    Example:
        >>> whole = initial_rows(0, "t", (0, 70_011), (70_011, 4), 0.1)
        >>> part = initial_rows(0, "t", (70_001, 70_010), (70_011, 4), 0.1, (2, 4))
        >>> bool(torch.equal(whole[70_001:70_010, 2:4], part))
        True
    """
    lo, hi = rows
    total, dim = shape
    c0, c1 = cols if cols is not None else (0, dim)
    out = torch.empty(hi - lo, c1 - c0)
    key_hash = zlib.crc32(key.encode())
    at = lo
    while at < hi:
        block = at // INIT_BLOCK_ROWS
        b0 = block * INIT_BLOCK_ROWS
        b1 = min(b0 + INIT_BLOCK_ROWS, total)  # the whole block, whatever part is asked
        g = torch.Generator().manual_seed(_mix(seed, key_hash, block))
        vals = torch.randn(b1 - b0, dim, generator=g)  # [block rows, dim]
        end = min(b1, hi)
        out[at - lo : end - lo] = vals[at - b0 : end - b0, c0:c1] * std
        at = end
    return out


@dataclass(frozen=True)
class TableInfo:
    """One table of the collection: name, rows, width and the features that read it."""

    name: str
    rows: int
    dim: int
    features: tuple[str, ...]
    pooling: str  # "sum" or "mean"


def table_infos(layout: FeatureLayout) -> list[TableInfo]:
    """The layout's tables as TorchRec bags, in the layout's table order.

    Raises:
        ConfigError: a ``max``-pooled sequence, or sum- and mean-pooled sequences on one table.
    """
    feats: dict[str, list[str]] = {t: [] for t in layout.table_sizes}
    pools: dict[str, set[str]] = {t: set() for t in layout.table_sizes}
    for f in layout.sparse:
        feats[f.table].append(f.name)
    for s in layout.sequences:
        if s.pooling == "max":
            raise ConfigError(
                f"sequence feature {s.name!r}: max pooling is not available with "
                "model.embedding_backend: torchrec (its bags sum or average); use pooling: mean "
                "or sum, or the torch backend"
            )
        feats[s.table].append(s.name)
        pools[s.table].add(s.pooling)
    out = []
    for t, size in layout.table_sizes.items():
        if len(pools[t]) > 1:
            raise ConfigError(
                f"table {t!r}: its sequences are pooled by {sorted(pools[t])}; with "
                "model.embedding_backend: torchrec one table has one pooling (give them the "
                "same pooling, or separate tables)"
            )
        if not feats[t]:
            continue
        pooling = next(iter(pools[t])) if pools[t] else "sum"
        out.append(TableInfo(t, int(size), int(layout.table_dims[t]), tuple(feats[t]), pooling))
    return out


class TorchRecEmbeddingCollection(nn.Module):
    """Every embedding table of a schema in a TorchRec ``EmbeddingBagCollection``.

    The same interface as :class:`~mtlrec.nn.embedding.EmbeddingCollection` (``layout``,
    ``out_dim``, ``forward(features) -> Embedded``), so models do not know which one they hold.
    The flat output has the same column order (sparse fields grouped by width, then the pooled
    sequences, the dense values and the zero padding), so a model's dense weights mean the
    same on both backends.

    Args:
        layout: the inputs (fields, tables, sizes).
        init_std: standard deviation of the tables' initial values (:func:`initial_rows`).
        pad_to: round the flat width up to a multiple of this with zero columns.

    Shapes:
        ``Features -> Embedded`` with ``flat [B, out_dim]``.

    Example (with torchrec installed):
        >>> from mtlrec.nn.embedding import FieldSpec
        >>> lay = FeatureLayout((FieldSpec("a", "a", 4),), (), ("x",), {"a": 5}, {"a": 4})
        >>> emb = TorchRecEmbeddingCollection(lay)  # doctest: +SKIP
        >>> emb.out_dim, emb.ebc.embedding_bags["a"].weight.device.type  # doctest: +SKIP
        (8, 'meta')
    """

    def __init__(self, layout: FeatureLayout, *, init_std: float = 0.05, pad_to: int = 8) -> None:
        super().__init__()
        require_torchrec()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.modules.embedding_configs import PoolingType

        self.layout = layout
        self.init_std = init_std
        self.tables = table_infos(layout)
        pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=t.name,
                    embedding_dim=t.dim,
                    num_embeddings=t.rows,
                    feature_names=list(t.features),
                    pooling=pooling[t.pooling],
                )
                for t in self.tables
            ],
            device=torch.device("meta"),
        )
        # the flat order of EmbeddingCollection: sparse fields grouped by width (widths
        # ascending, schema order within), then the sequences
        dims = sorted({f.dim for f in layout.sparse})
        self.sparse_order = tuple(f.name for d in dims for f in layout.sparse if f.dim == d)
        self.keys = tuple(f.name for f in layout.sparse) + tuple(s.name for s in layout.sequences)
        self._single = len(dims) == 1
        self.sparse_grad = False  # the trainer's flag for the torch backend; unused here
        self.pad = -layout.flat_dim % pad_to
        self.out_dim = layout.flat_dim + self.pad
        self.is_sharded = False

    # -- inputs -----------------------------------------------------------------------------
    def to_kjt(self, features: Features) -> Any:
        """The batch's ids as a ``KeyedJaggedTensor``: one id per sparse field, the non-padding
        ids of each sequence (key-major values, one length per key and row)."""
        from torchrec import KeyedJaggedTensor

        sparse = features.sparse
        b = sparse.shape[0]
        values = [sparse.t().reshape(-1).to(torch.int64)]  # [F * B], key-major
        lengths = [torch.ones(sparse.shape[1] * b, dtype=torch.int32, device=sparse.device)]
        for s in self.layout.sequences:
            ids = features.sequences[s.name]  # [B, L]
            real = ids != PAD_ID
            values.append(ids[real].to(torch.int64))  # row-major: row by row
            lengths.append(real.sum(1, dtype=torch.int32))
        return KeyedJaggedTensor(
            keys=list(self.keys), values=torch.cat(values), lengths=torch.cat(lengths)
        )

    def forward(self, features: Features) -> Embedded:
        pooled = self.ebc(self.to_kjt(features)).to_dict()  # name -> [B, E]
        sparse = [pooled[n] for n in self.sparse_order]
        parts = list(sparse)
        parts += [pooled[s.name] for s in self.layout.sequences]
        if features.dense.shape[1]:
            parts.append(features.dense.to(parts[0].dtype) if parts else features.dense)
        if self.pad:
            parts.append(torch.zeros_like(parts[0][:, :1]).expand(-1, self.pad))
        flat = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        fields = None
        if self._single and sparse:
            fields = flat[:, : sum(p.shape[1] for p in sparse)].view(
                flat.shape[0], len(sparse), -1
            )  # [B, F, E]
        return Embedded(flat, fields, features.dense)

    def embed_sequence(self, features: Features, name: str) -> tuple[Tensor, Tensor]:
        raise ConfigError(
            f"this model reads the sequence {name!r} unpooled (position by position), which "
            "model.embedding_backend: torchrec does not provide (its bags pool); train it with "
            "the torch backend"
        )

    # -- sharding ---------------------------------------------------------------------------
    def shard(
        self,
        plan: Mapping[str, tuple[str, Sequence[int]]],
        *,
        env: Any,
        device: torch.device,
        optimizer: tuple[type, dict[str, Any]],
        seed: int,
        key: str,
        local_size: int,
    ) -> None:
        """Replace the meta tables by this process's shards and fill them with their initial
        values.

        Args:
            plan: table -> ``(sharding type, ranks)`` (:mod:`mtlrec.train.sharding_plan`).
            env: the TorchRec ``ShardingEnv`` of the process group.
            device: where the shards and the kernels live.
            optimizer: ``(class, kwargs)`` of the fused optimiser applied in backward.
            seed: the run's seed (initial values, :func:`initial_rows`).
            key: this module's path in the model (part of every table's identity).
            local_size: processes per host.
        """
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.shard import shard
        from torchrec.distributed.sharding_plan import (
            column_wise,
            construct_module_sharding_plan,
            row_wise,
            table_wise,
        )
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        if self.is_sharded:
            raise RuntimeError("the tables are sharded already")
        cls, kwargs = optimizer
        with quiet():
            apply_optimizer_in_backward(cls, self.ebc.parameters(), kwargs)
        per_table = {}
        for t in self.tables:
            kind, ranks = plan[t.name]
            if kind == "table_wise":
                per_table[t.name] = table_wise(rank=int(ranks[0]))
            elif kind == "row_wise":
                per_table[t.name] = row_wise()
            else:
                per_table[t.name] = column_wise(ranks=[int(r) for r in ranks])
        sharder = EmbeddingBagCollectionSharder()
        module_plan = construct_module_sharding_plan(
            self.ebc,
            per_param_sharding=per_table,
            sharder=sharder,
            local_size=local_size,
            world_size=env.world_size,
            device_type=device.type,
        )
        with quiet():
            self.ebc = shard(self.ebc, module_plan, env, device, sharder)
        self.is_sharded = True
        self.fill_initial(seed, key)

    def local_shards(self) -> dict[str, list[tuple[Tensor, list[int], list[int], list[int]]]]:
        """This process's pieces of every table: table -> ``[(tensor, offsets, sizes, global
        size)]``. The tensors alias the kernel's weights (writing them changes the table)."""
        out: dict[str, list[tuple[Tensor, list[int], list[int], list[int]]]] = {}
        with quiet():
            for k, v in self.ebc.state_dict().items():
                table = k.removeprefix("embedding_bags.").removesuffix(".weight")
                whole = list(v.size())
                out[table] = [
                    (s.tensor, list(s.metadata.shard_offsets), list(s.metadata.shard_sizes), whole)
                    for s in v.local_shards()
                ]
        return out

    @torch.no_grad()
    def fill_initial(self, seed: int, key: str) -> None:
        """Write :func:`initial_rows` into every local shard."""
        std = self.init_std
        shapes = {t.name: (t.rows, t.dim) for t in self.tables}
        for table, pieces in self.local_shards().items():
            for tensor, (r0, c0), (nr, nc), _ in pieces:
                # block by block (aligned to the draws): the temporaries stay small
                a = 0
                while a < nr:
                    b = min(
                        nr, (r0 + a) // INIT_BLOCK_ROWS * INIT_BLOCK_ROWS + INIT_BLOCK_ROWS - r0
                    )
                    vals = initial_rows(
                        seed, f"{key}/{table}", (r0 + a, r0 + b), shapes[table], std, (c0, c0 + nc)
                    )
                    tensor[a:b].copy_(vals.to(tensor.dtype))
                    a = b

    def fused_optimizer(self) -> Any:
        """The sharded tables' fused optimiser (a TorchRec ``KeyedOptimizer``)."""
        if not self.is_sharded:
            raise RuntimeError("the tables are not sharded yet")
        return self.ebc.fused_optimizer
