"""mtlrec: multi-task ranking models for recommender systems.

Public API::

    from mtlrec import Schema, SparseFeature, DenseFeature, SequenceFeature, TaskSpec
    from mtlrec import Preprocessor, ColumnarDataset, build_model, Trainer, TrainingConfig
    from mtlrec import ExperimentConfig, train_run, load_run

Importing mtlrec before pyarrow selects pyarrow's system allocator (unless the environment
variable ``ARROW_DEFAULT_MEMORY_POOL`` says otherwise): its freed buffers go back to the OS,
where the default pool kept ~90 MB after reading a 500,000-row file.
"""

from __future__ import annotations

import os as _os
import sys as _sys

if "pyarrow" not in _sys.modules:
    _os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from mtlrec.config import ExperimentConfig, TrainingConfig
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.preprocess import Preprocessor
from mtlrec.models import ModelOutput, MultiTaskModel, build_model
from mtlrec.schema import (
    DenseFeature,
    Schema,
    SequenceFeature,
    SparseFeature,
    TaskSpec,
)
from mtlrec.train.run import load_run, train_run
from mtlrec.train.trainer import Trainer
from mtlrec.weighting import build_weighting

__version__ = "0.1.0"

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
