"""Checkpoints of sharded embedding tables: one safetensors file per process and a manifest.

Layout of a run folder trained with ``model.embedding_backend: torchrec``::

    RUN/checkpoints/last.safetensors            dense weights, strategy, optimiser, RNG, trainer
                                                position (as for the torch backend) and, in its
                                                metadata, the manifest of the shards below
    RUN/checkpoints/last.shards/<tag>/rank-00000.safetensors   process 0's pieces of the tables
    RUN/checkpoints/last.shards/<tag>/rank-00001.safetensors   (weights and fused optimiser state)
    RUN/checkpoints/best.safetensors, best.shards/<tag>/...    the same for the best epoch

A save is a two-phase commit: every process writes its file into a new folder ``<tag>``
(atomically), the processes report the size and CRC-32 of their files to process 0, which then
replaces ``last.safetensors`` (atomically), whose manifest names the new folder, and only then
removes the older folders. After ``kill -9`` of any process at any point, ``last.safetensors``
names a complete set of shard files.

Every piece is recorded with its place in the whole tensor (offsets, sizes, whole size), so a
process can rebuild its own shards from the files of *any* earlier plan and number of processes
(:func:`load_into`: resume with another ``--nproc``), and a whole table can be assembled in one
process (:func:`gather_tables`: ``evaluate``, ``predict``, ``export`` and ``serve`` of a sharded
run, whose tables must then fit one machine). A file whose size or CRC does not match the
manifest, or that cannot be parsed, is a :class:`~mtlrec.errors.CheckpointError` naming it.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from mtlrec.errors import CheckpointError
from mtlrec.utils.atomic import atomic_path

SHARD_FORMAT = 1
_READ_ROWS_BYTES = 64 << 20  # rows read at once when copying a piece (bounded temporaries)
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass(frozen=True)
class Piece:
    """One process's part of one tensor of a table.

    ``state`` is ``weight`` or the fused optimiser's state name (e.g. ``momentum1``);
    ``offsets`` and ``sizes`` place the piece in the whole tensor of size ``whole``.
    """

    module: str
    table: str
    state: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    whole: tuple[int, ...]

    @property
    def name(self) -> str:
        at = "_".join(str(o) for o in self.offsets)
        return f"{self.module}/{self.table}/{self.state}/{at}"

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "table": self.table,
            "state": self.state,
            "offsets": list(self.offsets),
            "sizes": list(self.sizes),
            "whole": list(self.whole),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Piece:
        return cls(
            str(d["module"]),
            str(d["table"]),
            str(d["state"]),
            tuple(int(x) for x in d["offsets"]),
            tuple(int(x) for x in d["sizes"]),
            tuple(int(x) for x in d["whole"]),
        )


def local_pieces(collections: Mapping[str, Any]) -> list[tuple[Piece, Tensor]]:
    """This process's pieces of every table and of its fused optimiser state.

    Args:
        collections: module path -> sharded :class:`~mtlrec.nn.torchrec_embedding.
            TorchRecEmbeddingCollection`.

    Returns:
        ``(piece, tensor)``; the tensors alias the live weights and states (writing them
        changes the model).
    """
    from mtlrec.nn.torchrec_embedding import quiet

    out: list[tuple[Piece, Tensor]] = []
    for path, m in collections.items():
        for table, shards in m.local_shards().items():
            for tensor, offsets, sizes, whole in shards:
                piece = Piece(path, table, "weight", tuple(offsets), tuple(sizes), tuple(whole))
                out.append((piece, tensor))

        with quiet():
            state = m.fused_optimizer().state_dict()["state"]
            for key, entries in state.items():
                table = key.removeprefix("embedding_bags.").removesuffix(".weight")
                for skey, value in entries.items():
                    if not hasattr(value, "local_shards"):
                        continue  # no such state in mtlrec's kernels (scalars live in groups)
                    name = skey.removeprefix(f"{table}.")
                    whole = tuple(value.size())
                    for s in value.local_shards():
                        at = (tuple(s.metadata.shard_offsets), tuple(s.metadata.shard_sizes))
                        out.append((Piece(path, table, name, *at, whole), s.tensor))
    return out


def file_crc32(path: Path, chunk: int = 16 << 20) -> int:
    """CRC-32 of a file, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def write_rank_file(folder: Path, rank: int, pieces: Sequence[tuple[Piece, Tensor]]) -> dict:
    """Write one process's pieces (atomically) and describe the file for the manifest.

    Returns:
        ``{"rank", "file", "bytes", "crc32", "pieces"}`` (the file name relative to ``folder``).
    """
    name = f"rank-{rank:05d}.safetensors"
    tensors = {p.name: t.detach().cpu().contiguous() for p, t in pieces}
    path = folder / name
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"mtlrec_shard": json.dumps({"rank": rank})})
    return {
        "rank": rank,
        "file": name,
        "bytes": path.stat().st_size,
        "crc32": file_crc32(path),
        "pieces": [p.to_json() for p, _ in pieces],
    }


# -- reading ----------------------------------------------------------------------------------
class _ShardFile:
    """A shard file's header (tensor names, dtypes, shapes, byte ranges), checked against the
    manifest's size and CRC once."""

    def __init__(self, path: Path, entry: Mapping[str, Any], *, verify: bool = True) -> None:
        self.path = path
        if not path.is_file():
            raise CheckpointError(
                f"shard file {path} (process {entry.get('rank')}) is missing; the checkpoint "
                "cannot be loaded"
            )
        size = path.stat().st_size
        if size != int(entry["bytes"]):
            raise CheckpointError(
                f"shard file {path} is truncated or corrupt ({size} bytes, the manifest says "
                f"{entry['bytes']})"
            )
        if verify and file_crc32(path) != int(entry["crc32"]):
            raise CheckpointError(
                f"shard file {path} is corrupt (its CRC-32 does not match the manifest)"
            )
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(n))
        except (ValueError, struct.error, json.JSONDecodeError) as e:
            raise CheckpointError(f"shard file {path} is corrupt ({e})") from None
        self.start = 8 + n
        self.header = {k: v for k, v in header.items() if k != "__metadata__"}

    def read_rows(self, name: str, lo: int, hi: int) -> Tensor:
        """Rows ``lo:hi`` of tensor ``name`` (its first dimension)."""
        try:
            info = self.header[name]
            dtype = _DTYPES[info["dtype"]]
        except KeyError:
            raise CheckpointError(f"shard file {self.path} has no tensor {name!r}") from None
        shape = list(info["shape"])
        row = int(torch.tensor(shape[1:], dtype=torch.int64).prod()) if len(shape) > 1 else 1
        item = torch.empty((), dtype=dtype).element_size()
        begin = int(info["data_offsets"][0])
        out = torch.empty((hi - lo, *shape[1:]), dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin + lo * row * item)
            got = f.readinto(memoryview(out.view(torch.uint8).numpy()).cast("B"))
        if got != out.numel() * item:
            raise CheckpointError(f"shard file {self.path} is truncated ({name})")
        return out


class ShardSet:
    """The shard files named by a manifest (files opened and verified when first read)."""

    def __init__(self, root: Path, manifest: Mapping[str, Any], *, verify: bool = True) -> None:
        if int(manifest.get("format", -1)) != SHARD_FORMAT:
            raise CheckpointError(
                f"{root}: shard format {manifest.get('format')!r} is not {SHARD_FORMAT}"
            )
        self.folder = root / str(manifest["dir"])
        self.world_size = int(manifest["world_size"])
        self.verify = verify
        self.entries = list(manifest["files"])
        self.sources: list[tuple[Piece, int]] = [
            (Piece.from_json(p), i) for i, e in enumerate(self.entries) for p in e["pieces"]
        ]
        self._open: dict[int, _ShardFile] = {}

    def file(self, i: int) -> _ShardFile:
        if i not in self._open:
            e = self.entries[i]
            self._open[i] = _ShardFile(self.folder / e["file"], e, verify=self.verify)
        return self._open[i]

    def pieces(self, module: str, table: str, state: str) -> list[tuple[Piece, int]]:
        return [
            (p, i)
            for p, i in self.sources
            if (p.module, p.table, p.state) == (module, table, state)
        ]


def _overlap(a0: int, an: int, b0: int, bn: int) -> tuple[int, int]:
    return max(a0, b0), min(a0 + an, b0 + bn)


@torch.no_grad()
def copy_region(shards: ShardSet, target: Piece, dest: Tensor) -> int:
    """Fill ``dest`` (the tensor of piece ``target``) from every saved piece that overlaps it;
    returns the number of elements written.

    Raises:
        CheckpointError: the saved tensor has another whole size (e.g. the optimiser state of
            a column-wise table split into another number of columns).
    """
    written = 0
    for src, i in shards.pieces(target.module, target.table, target.state):
        if src.whole != target.whole:
            raise CheckpointError(
                f"{shards.folder}: {target.module}/{target.table} {target.state} was saved with "
                f"whole size {list(src.whole)}, this plan needs {list(target.whole)} (a "
                "column-wise table's row-wise optimiser state cannot be re-split; resume with "
                f"{shards.world_size} processes)"
            )
        r0, r1 = _overlap(target.offsets[0], target.sizes[0], src.offsets[0], src.sizes[0])
        if r0 >= r1:
            continue
        cols = None
        if len(target.sizes) > 1:
            c0, c1 = _overlap(target.offsets[1], target.sizes[1], src.offsets[1], src.sizes[1])
            if c0 >= c1:
                continue
            cols = (c0, c1)
        f = shards.file(i)
        width = src.sizes[1] if len(src.sizes) > 1 else 1  # values per saved row
        step = max(1, _READ_ROWS_BYTES // (width * dest.element_size()))
        for a in range(r0, r1, step):
            b = min(a + step, r1)
            block = f.read_rows(src.name, a - src.offsets[0], b - src.offsets[0])
            rows = slice(a - target.offsets[0], b - target.offsets[0])
            if cols is None:
                dest[rows].copy_(block)
                written += b - a
            else:
                c0, c1 = cols
                dest[rows, c0 - target.offsets[1] : c1 - target.offsets[1]].copy_(
                    block[:, c0 - src.offsets[1] : c1 - src.offsets[1]]
                )
                written += (b - a) * (c1 - c0)
    return written


def load_into(shards: ShardSet, targets: Iterable[tuple[Piece, Tensor]]) -> None:
    """Fill this process's pieces (weights and optimiser states) from a saved shard set,
    whatever plan and number of processes saved it.

    Raises:
        CheckpointError: a piece is not covered by the saved ones (another schema or table
            size), a file is missing or corrupt, or a state cannot be re-split.
    """
    for target, dest in targets:
        n = copy_region(shards, target, dest)
        if n != dest.numel():
            raise CheckpointError(
                f"{shards.folder}: the saved shards cover {n} of the {dest.numel()} values of "
                f"{target.module}/{target.table} {target.state} at {list(target.offsets)} (a "
                "checkpoint of other tables?)"
            )


def gather_tables(shards: ShardSet) -> dict[str, dict[str, Tensor]]:
    """Every table whole, in this process: module path -> table -> ``[rows, dim]``.

    The tables must fit in memory (the run is then scored by the torch backend).
    """
    wholes: dict[tuple[str, str], tuple[int, ...]] = {}
    for p, _ in shards.sources:
        if p.state == "weight":
            wholes[(p.module, p.table)] = p.whole
    out: dict[str, dict[str, Tensor]] = {}
    for (module, table), whole in wholes.items():
        full = torch.empty(whole)
        target = Piece(module, table, "weight", (0,) * len(whole), whole, whole)
        load_into(shards, [(target, full)])
        out.setdefault(module, {})[table] = full
    return out


def is_sharded(meta: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's metadata names shard files (a TorchRec run)."""
    return isinstance(meta.get("shards"), dict)


@torch.no_grad()
def restore_gathered(
    model: torch.nn.Module,
    dense: Mapping[str, Tensor],
    tables: ShardSet | Mapping[str, Mapping[str, Tensor]],
    *,
    source: str,
) -> None:
    """Load a sharded run into a model of the torch backend: the dense weights as they are,
    and every whole table into the fused :class:`~mtlrec.nn.embedding.EmbeddingCollection` at
    the same module path (its rows of the fused weight). From a :class:`ShardSet` the pieces
    are read straight into those rows (no second copy of a table).

    Raises:
        CheckpointError: the weights or tables do not fit the model.
    """
    from mtlrec.nn.embedding import EmbeddingCollection

    if isinstance(tables, ShardSet):
        wanted: dict[str, dict[str, tuple[int, ...]]] = {}
        for p, _ in tables.sources:
            if p.state == "weight":
                wanted.setdefault(p.module, {})[p.table] = p.whole
    else:
        wanted = {m: {t: tuple(w.shape) for t, w in tabs.items()} for m, tabs in tables.items()}
    own = model.state_dict()
    table_keys = set()
    for path, shapes in wanted.items():
        try:
            emb = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"{source}: the model has no embedding at {path!r}") from None
        if not isinstance(emb, EmbeddingCollection):
            raise CheckpointError(f"{source}: {path!r} is not an embedding collection")
        table_keys |= {f"{path}.{k}" for k in emb.state_dict()}
        for name, shape in shapes.items():
            if name not in emb.layout.table_sizes:
                raise CheckpointError(f"{source}: the model has no table {name!r} at {path!r}")
            rows = emb.table_weight(name)
            if tuple(rows.shape) != tuple(shape):
                raise CheckpointError(
                    f"{source}: table {name} has shape {tuple(shape)}, the model expects "
                    f"{tuple(rows.shape)} (another vocabulary?)"
                )
            if isinstance(tables, ShardSet):
                whole = Piece(path, name, "weight", (0,) * len(shape), tuple(shape), tuple(shape))
                load_into(tables, [(whole, rows)])
            else:
                rows.copy_(tables[path][name])
    names = set(own) - table_keys
    missing, extra = sorted(names - set(dense)), sorted(set(dense) - names)
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{source}: weights do not fit this model ({what})")
    for k in names:
        if own[k].shape != dense[k].shape:
            raise CheckpointError(
                f"{source}: weight {k} has shape {tuple(dense[k].shape)}, the model expects "
                f"{tuple(own[k].shape)}"
            )
        own[k].copy_(dense[k])
