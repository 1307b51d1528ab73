"""Process-level helpers of mtlrec.utils.runtime."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mtlrec.utils.runtime import mapped_empty


def _mapped_kb() -> int:
    """Anonymous mappings' total size (kB) from /proc/self/maps, Linux only."""
    total = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) == 5 or parts[5] == "/dev/zero":  # anonymous (private or shared)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            total += (hi - lo) // 1024
    return total


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.bool, torch.int64])
def test_mapped_empty_is_a_writable_tensor_of_the_shape(dtype: torch.dtype) -> None:
    for shape in [(3, 4), (300_000, 2)]:  # small (usual allocation) and large (mapped)
        t = mapped_empty(shape, dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        t.fill_(1)
        assert bool((t == 1).all())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_large_mapped_tensor_is_unmapped_when_freed() -> None:
    gc.collect()
    before = _mapped_kb()
    t = mapped_empty((8 << 20,), torch.int32)  # 32 MB
    assert _mapped_kb() - before >= 32 * 1024
    view = t[5:10]  # a view keeps the map alive
    del t
    gc.collect()
    assert _mapped_kb() - before >= 32 * 1024
    del view
    gc.collect()
    assert _mapped_kb() - before < 1024


# -- ports (issue 17.12) -------------------------------------------------------------------------
def _http_server(port: int) -> Any:
    """A real HTTP server process on ``port`` (it exits at once if the port is taken)."""
    import subprocess

    return subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parent,
    )


def _ready(proc: Any, port: int) -> bool:
    from mtlrec.utils.runtime import http_ok

    return http_ok(f"http://127.0.0.1:{port}/")


def _stop(proc: Any) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_a_port_taken_between_choice_and_bind_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Simulated race: the first port handed out is held by this test (as another process
    would hold it after free_port chose it); the server fails to bind it, and the helper
    starts it again on another port."""
    import socket

    from mtlrec.utils import runtime

    real = runtime.free_port
    handed: list[int] = []
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]

        def chooser() -> int:
            handed.append(taken if not handed else real())
            return handed[-1]

        monkeypatch.setattr(runtime, "free_port", chooser)
        proc, port = runtime.start_on_free_port(_http_server, _ready, timeout=60)
        try:
            assert handed[0] == taken and len(handed) == 2
            assert port == handed[1] != taken
            assert proc.poll() is None
            assert _ready(proc, port)
        finally:
            _stop(proc)


def test_a_server_failing_for_another_reason_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess

    from mtlrec.utils import runtime

    calls: list[int] = []

    def start(port: int) -> Any:
        calls.append(port)
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    proc, port = runtime.start_on_free_port(start, lambda p, q: False, timeout=60)
    assert calls == [port]
    assert proc.wait(timeout=30) == 3
    with pytest.raises(ValueError, match="attempts"):
        runtime.start_on_free_port(start, lambda p, q: False, attempts=0)


def test_port_in_use_and_free_port() -> None:
    import socket

    from mtlrec.utils.runtime import free_port, port_in_use

    port = free_port()
    assert not port_in_use(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert port_in_use(port)


def test_the_command_chooses_the_system_pool_before_pyarrow_loads() -> None:
    """``import mtlrec.cli`` loads no pyarrow, so the command's opt-in reaches Arrow's C++ default
    pool (set by the environment at load time, which ``pa.set_memory_pool`` cannot change for
    the C++ readers: a mimalloc pool kept ~80 MB more after encoding the speed harness's file)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, mtlrec.cli\n"
        "assert 'pyarrow' not in sys.modules, 'pyarrow loaded by import mtlrec.cli'\n"
        "from mtlrec.utils.runtime import enable_process_tuning\n"
        "enable_process_tuning()\n"
        "import pyarrow as pa\n"
        "print(pa.default_memory_pool().backend_name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "system"
