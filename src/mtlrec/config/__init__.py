"""Experiment configuration: validated on load, unknown keys rejected, saved resolved.

A YAML file (or a dict) with the sections ``data``, ``schema`` (optional when a built-in data
set brings its own), ``model``, ``balancing``, ``training`` and ``output_dir``. Dotted overrides
(``training.optimizer.lr=0.01``) are applied before validation; their values are parsed as YAML
scalars.

Example:
    >>> cfg = ExperimentConfig.from_dict({"data": {"dataset": "census-income"},
    ...                                   "model": {"name": "mmoe"}})
    >>> cfg.training.optimizer.name, cfg.training.batch_size
    ('adam', 1024)

The package: :mod:`~mtlrec.config.sections` (data, model, balancing, optimiser, schedule,
training), :mod:`~mtlrec.config.experiment` (:class:`ExperimentConfig`, the monitored key) and
:mod:`~mtlrec.config.editing` (overrides, model switching, key suggestions).
"""

from __future__ import annotations

from mtlrec.config.editing import apply_overrides, switch_model_params
from mtlrec.config.experiment import ExperimentConfig, monitor_key
from mtlrec.config.sections import (
    CONFIG_VERSION,
    BalancingConfig,
    ConfigWarning,
    DataConfig,
    EarlyStoppingConfig,
    ModelConfig,
    OptimizerConfig,
    OptimizerGroupConfig,
    PretrainedConfig,
    SchedulerConfig,
    ShardingConfig,
    SplitConfig,
    TrainingConfig,
)

__all__ = [
    "CONFIG_VERSION",
    "BalancingConfig",
    "ConfigWarning",
    "DataConfig",
    "EarlyStoppingConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimizerConfig",
    "OptimizerGroupConfig",
    "PretrainedConfig",
    "SchedulerConfig",
    "ShardingConfig",
    "SplitConfig",
    "TrainingConfig",
    "apply_overrides",
    "monitor_key",
    "switch_model_params",
]
