"""mtlrec: multi-task ranking models for recommender systems.

Public API::

    from mtlrec import Schema, SparseFeature, DenseFeature, SequenceFeature, TaskSpec
    from mtlrec import Preprocessor, ColumnarDataset, build_model, Trainer, TrainingConfig
    from mtlrec import ExperimentConfig, train_run, load_run

Importing mtlrec changes nothing in the process (environment, allocator, memory pools): the
``mtlrec`` command opts in to its speed and memory settings with
:func:`mtlrec.utils.runtime.enable_process_tuning`, which a Python user may call too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the public names, for type checkers and readers
    from mtlrec.config import ExperimentConfig, TrainingConfig
    from mtlrec.data.dataset import ColumnarDataset
    from mtlrec.data.preprocess import Preprocessor
    from mtlrec.models import ModelOutput, MultiTaskModel, build_model
    from mtlrec.schema import DenseFeature, Schema, SequenceFeature, SparseFeature, TaskSpec
    from mtlrec.train.run import load_run, train_run
    from mtlrec.train.trainer import Trainer
    from mtlrec.weighting import build_weighting

__version__ = "0.1.0"

# name -> module: imported on first use (PEP 562), so that ``import mtlrec.cli`` or
# ``import mtlrec.utils.runtime`` does not load pyarrow and torch's training stack first (the
# command sets pyarrow's memory pool before pyarrow is imported)
_PUBLIC = {
    "ColumnarDataset": "mtlrec.data.dataset",
    "DenseFeature": "mtlrec.schema",
    "ExperimentConfig": "mtlrec.config",
    "ModelOutput": "mtlrec.models",
    "MultiTaskModel": "mtlrec.models",
    "Preprocessor": "mtlrec.data.preprocess",
    "Schema": "mtlrec.schema",
    "SequenceFeature": "mtlrec.schema",
    "SparseFeature": "mtlrec.schema",
    "TaskSpec": "mtlrec.schema",
    "Trainer": "mtlrec.train.trainer",
    "TrainingConfig": "mtlrec.config",
    "build_model": "mtlrec.models",
    "build_weighting": "mtlrec.weighting",
    "load_run": "mtlrec.train.run",
    "train_run": "mtlrec.train.run",
}

__all__ = [
    "ColumnarDataset",
    "DenseFeature",
    "ExperimentConfig",
    "ModelOutput",
    "MultiTaskModel",
    "Preprocessor",
    "Schema",
    "SequenceFeature",
    "SparseFeature",
    "TaskSpec",
    "Trainer",
    "TrainingConfig",
    "__version__",
    "build_model",
    "build_weighting",
    "load_run",
    "train_run",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mtlrec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
