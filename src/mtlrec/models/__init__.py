"""Registered models. Importing this package registers every model in :data:`MODELS`."""

from mtlrec.models import moe, shared_bottom, single_task
from mtlrec.models.base import ModelOutput, ModelParams, MultiTaskModel
from mtlrec.models.build import build_model

__all__ = [
    "ModelOutput",
    "ModelParams",
    "MultiTaskModel",
    "build_model",
    "moe",
    "shared_bottom",
    "single_task",
]
