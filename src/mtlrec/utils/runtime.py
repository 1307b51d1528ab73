"""Process-level settings for fast CPU training: thread count and the allocator's behaviour.

Nothing here changes the process unless it opted in: the ``mtlrec`` command and the benchmarks
call :func:`enable_process_tuning` first thing; a library user who imports mtlrec and trains from
Python gets no allocator changes, no forced garbage collections and pyarrow's default memory
pool, unless they call it too. Threads are set only where a config asks for a number.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TUNED_MMAP = 1 << 30
_GLIBC_MMAP = 128 * 1024  # glibc's initial threshold
_MIN_MAPPED = 1 << 20
_done = False
_loading_depth = 0
_enabled = False


def enable_process_tuning() -> None:
    """Opt this process in to the process-wide settings: glibc allocator tuning
    (:func:`tune_allocator`, where a config allows it), :func:`release_memory` between phases,
    and pyarrow's system memory pool (freed buffers go back to the OS; the default pool kept
    ~90 MB after reading a 500,000-row file) unless ``ARROW_DEFAULT_MEMORY_POOL`` says
    otherwise. For command-line tools and benchmarks, not for a library's import; call it
    before anything imports pyarrow (``import mtlrec`` does not), so that Arrow's C++ code uses
    the system pool too."""
    global _enabled
    _enabled = True
    import os

    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        return
    if "pyarrow" not in sys.modules:
        # read by Arrow's C++ library when it loads: every allocation (file readers and compute
        # kernels included) then goes to the system allocator
        os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"
        return
    # pyarrow is loaded already: the Python-level default changes, but C++ code that asks
    # Arrow for its own default pool keeps the pool chosen at load time (call this first)
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def process_tuning_enabled() -> bool:
    """Whether :func:`enable_process_tuning` was called in this process."""
    return _enabled


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
    """Set torch's intra-op threads (if given) and tune the allocator (if asked and the
    process opted in, :func:`enable_process_tuning`)."""
    if num_threads is not None and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    if allocator and _enabled:
        tune_allocator()


def release_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``) and pyarrow's pool.

    Called between phases (after loading data, after training, before scoring), never in a
    hot loop: RSS then reflects live data only, and the next phase's buffers are reused. A
    no-op unless the process opted in (:func:`enable_process_tuning`): a full collection costs
    ~0.2 s in a large process, which a library must not charge its caller per call.
    """
    if not _enabled:
        return
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
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Another process may take it before the caller binds it: start a server on it with
    :func:`start_on_free_port` (which tries another port then), or let the OS choose the port
    where the socket is bound (the launcher of :mod:`mtlrec.train.distributed` hosts its store
    on port 0)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` cannot be bound now (a socket in TIME_WAIT does not count)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of ``url`` answers 200 within ``timeout`` seconds (standard library only,
    for readiness checks)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return bool(r.status == 200)
    except (OSError, ValueError, urllib.error.URLError):
        return False


def start_on_free_port(
    start: Callable[[int], T],
    ready: Callable[[T, int], bool],
    *,
    exited: Callable[[T], bool] | None = None,
    host: str = "127.0.0.1",
    attempts: int = 5,
    timeout: float = 180.0,
    poll: float = 0.2,
) -> tuple[T, int]:
    """Start a server process on a free port, and again on another one if a different process
    took the port between its choice and the server's bind.

    Each attempt takes a :func:`free_port`, calls ``start(port)`` and waits until
    ``ready(handle, port)``. If the server ends first while the port is in use (by somebody
    else: the server is gone), the port was lost: the next attempt takes another one. A
    server that ends with its port free failed for another reason, and one that is not ready
    after ``timeout`` seconds is slow or stuck: both are returned as they are, for the caller's
    own checks to report (nothing is retried that a retry would not cure).

    Args:
        start: starts the server on the given port; returns its handle.
        ready: whether the server answers on the port now (e.g. ``http_ok(url + "/healthz")``).
        exited: whether the server has ended (default: ``handle.poll() is not None``, for a
            ``subprocess.Popen``).
        host: the address the server binds.
        attempts: ports tried at most.
        timeout: seconds to wait for one attempt to become ready.
        poll: seconds between checks.

    Returns:
        The handle of the last start and its port.
    """
    import time

    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")

    def ended(handle: T) -> bool:
        if exited is not None:
            return exited(handle)
        return handle.poll() is not None  # type: ignore[attr-defined]

    for attempt in range(1, attempts + 1):
        port = free_port()
        handle = start(port)
        deadline = time.monotonic() + timeout
        while not ready(handle, port):
            if ended(handle):
                if attempt < attempts and port_in_use(port, host):
                    break  # the port was taken before the server bound it: another one
                return handle, port
            if time.monotonic() > deadline:
                return handle, port
            time.sleep(poll)
        else:
            return handle, port
    raise AssertionError("unreachable: the last attempt always returns")
