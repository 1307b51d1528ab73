"""Build a registered balancing strategy from its name and parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from mtlrec.registry import WEIGHTINGS
from mtlrec.weighting.base import Weighting


def build_weighting(
    name: str, task_names: Sequence[str], params: dict[str, Any] | BaseModel | None = None
) -> Weighting:
    """Instantiate strategy ``name`` for the given tasks (unknown parameters rejected).

    Example:
        >>> w = build_weighting("static", ["a", "b"], {"weights": {"a": 2.0}})
        >>> w.weights(__import__("torch").zeros(2)).tolist()
        [2.0, 1.0]
    """
    entry = WEIGHTINGS.get(name)
    p = WEIGHTINGS.parse_params(name, params)
    strategy: Weighting = entry.cls(task_names, p)
    return strategy
