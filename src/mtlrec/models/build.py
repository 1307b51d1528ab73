"""Build a registered model from its name, the schema and the fitted table sizes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from mtlrec.models.base import MultiTaskModel
from mtlrec.nn.embedding import FeatureLayout
from mtlrec.registry import MODELS
from mtlrec.schema import Schema


def build_model(
    name: str,
    schema: Schema,
    table_sizes: dict[str, int],
    params: dict[str, Any] | BaseModel | None = None,
) -> MultiTaskModel:
    """Instantiate model ``name`` for ``schema``.

    Args:
        name: registry name (``mtlrec list`` shows them).
        schema: features and tasks.
        table_sizes: rows of every embedding table (from the fitted encoders).
        params: the model's options; unknown keys are rejected.

    Example:
        >>> from mtlrec.testing import tiny_schema
        >>> m = build_model("mmoe", tiny_schema(), {"user": 10, "item": 20},
        ...                 {"num_experts": 3, "expert_hidden": [8]})
        >>> sorted(m.task_names)
        ['click', 'watch']
    """
    entry = MODELS.get(name)
    p = MODELS.parse_params(name, params)
    layout = FeatureLayout.from_schema(schema, table_sizes)
    model: MultiTaskModel = entry.cls(layout, schema.tasks, p)
    return model
