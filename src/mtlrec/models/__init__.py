"""Registered models. Importing this package imports every module in it, which registers each
model in :data:`mtlrec.registry.MODELS` (a new architecture is a new module here)."""

import importlib as _importlib
import pkgutil as _pkgutil

from mtlrec.models.base import ModelOutput, ModelParams, MultiTaskModel
from mtlrec.models.build import build_model

for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["ModelOutput", "ModelParams", "MultiTaskModel", "build_model"]
