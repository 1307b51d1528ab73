"""Process-level helpers of mtlrec.utils.runtime."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

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
