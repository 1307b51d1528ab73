"""Build a registered model from its name, the schema and the fitted table sizes."""

from __future__ import annotations

import dataclasses
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
    *,
    embedding_backend: str = "torch",
) -> MultiTaskModel:
    """Instantiate model ``name`` for ``schema``.

    Args:
        name: registry name (``mtlrec list`` shows them).
        schema: features and tasks.
        table_sizes: rows of every embedding table (from the fitted encoders).
        params: the model's options; unknown keys are rejected.
        embedding_backend: ``torch`` (fused torch tables) or ``torchrec`` (TorchRec tables on
            the ``meta`` device until the trainer shards them; :mod:`mtlrec.train.sharded`).

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
    if embedding_backend != "torch":
        layout = dataclasses.replace(layout, backend=embedding_backend)
    model: MultiTaskModel = entry.cls(layout, schema.tasks, p)
    return model
