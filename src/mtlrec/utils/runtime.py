"""Process-level settings for fast CPU training: thread count and the allocator's behaviour.

glibc returns large freed blocks (activations of a batch, tens of MB) to the kernel at once and
maps them again on the next step, paying a page fault per 4 KB page every step. Raising the
mmap and trim thresholds keeps them in the heap for reuse: on a 2-core machine this alone made
MMoE inference ~30% faster (see benchmarks/RESULTS.md). While data is read and encoded the
opposite holds (:func:`mmap_large_blocks`): the load's buffers are mapped separately and go back
to the OS, so they leave no holes in the heap for training's buffers to wander through. Only
glibc is touched; elsewhere these are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TUNED_MMAP = 1 << 30
_GLIBC_MMAP = 128 * 1024  # glibc's initial threshold
_MIN_MAPPED = 1 << 20
_done = False
_loading_depth = 0


def _mallopt() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.mallopt
    except (OSError, AttributeError):
        return None


def tune_allocator() -> bool:
    """Keep large freed blocks in the heap (glibc only). Returns whether it applied."""
    global _done
    if _done:
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    mmap_t = _TUNED_MMAP if _loading_depth == 0 else 1 << 20
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_t)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    _done = ok
    return ok


@contextmanager
def mmap_large_blocks(threshold: int = 1 << 20) -> Iterator[None]:
    """While reading and encoding data, serve large blocks by ``mmap`` (glibc only).

    The buffers of a load (record batches, encoded chunks, the final columns) come and go in
    an order unlike training's. In the heap they leave holes between long-lived blocks, and
    training's per-step buffers then wander through those holes, touching ever more pages:
    on the 500,000-row benchmark that was 40-100 MB of extra peak RSS. Mapped separately,
    they go back to the OS when freed and the heap stays compact. Nested uses are fine.
    """
    global _loading_depth
    mallopt = _mallopt()
    if mallopt is None:
        yield
        return
    _loading_depth += 1
    if _loading_depth == 1:
        mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        _loading_depth -= 1
        if _loading_depth == 0:
            mallopt(_M_MMAP_THRESHOLD, _TUNED_MMAP if _done else _GLIBC_MMAP)


def configure_runtime(num_threads: int | None = None, allocator: bool = True) -> None:
    """Set torch's intra-op threads (if given) and tune the allocator (if asked)."""
    if num_threads is not None and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    if allocator:
        tune_allocator()


def release_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``) and pyarrow's pool.

    Called between phases (after loading data, after training, before scoring), never in a
    hot loop: RSS then reflects live data only, and the next phase's buffers are reused.
    """
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim(0)
        except (OSError, AttributeError):
            pass
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except ImportError:
        pass


def mapped_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in its own anonymous memory map (large ones; small ones as
    usual), whatever the allocator's settings or the calling thread.

    Its pages go back to the OS as soon as the tensor is freed. For buffers that are made in
    one thread and freed in another, or that must not stay in a heap kept for reuse by
    :func:`tune_allocator` (e.g. the shuffle buffers of streaming training).
    """
    import math
    import mmap

    import numpy as np

    count = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if count * itemsize < _MIN_MAPPED:
        return torch.empty(shape, dtype=dtype)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    arr = np.frombuffer(mmap.mmap(-1, count * itemsize), dtype=np_dtype, count=count)
    return torch.from_numpy(arr.reshape(shape))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local process group or a
    service started by a test or benchmark)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
