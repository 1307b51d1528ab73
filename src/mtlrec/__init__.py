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
