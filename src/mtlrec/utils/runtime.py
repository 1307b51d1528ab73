"""Process-level settings for fast CPU training: thread count and the allocator's behaviour.

glibc returns large freed blocks (activations of a batch, tens of MB) to the kernel at once and
maps them again on the next step, paying a page fault per 4 KB page every step. Raising the
mmap and trim thresholds keeps them in the heap for reuse: on a 2-core machine this alone made
MMoE inference ~30% faster (see benchmarks/RESULTS.md). Only glibc is touched; elsewhere it is a
no-op. Peak memory is unchanged (the blocks are reused, not accumulated).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_allocator() -> bool:
    """Keep large freed blocks in the heap (glibc only). Returns whether it applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    import os

    mmap_t = int(os.environ.get("MTLREC_MMAP_THRESHOLD", 1 << 30))
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_t)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    _done = ok
    return ok


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
