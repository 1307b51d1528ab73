"""Seeded random streams and argument checks shared by the synthetic generators.

Every generator takes ``seed`` and draws from independent streams
``numpy.random.default_rng(numpy.random.SeedSequence(seed, spawn_key=(k,)))`` (the ``k``-th child
of ``SeedSequence(seed).spawn``), one stream per ingredient. Rows are drawn sequentially, so a
call with ``n`` rows returns the first ``n`` rows of any larger call with the same arguments.
"""

from __future__ import annotations

import numpy as np

from mtlrec.errors import ConfigError


def _rng(seed: int, stream: int, *sub: int) -> np.random.Generator:
    """Independent generator number ``stream`` (optionally sub-stream ``sub``) under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, *sub)))


def _check_seed(name: str, seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ConfigError(f"n must be a non-negative integer, got {n!r}")
    return int(n)
