"""The model of a run folder or of an experiment config, for ``mtlrec list-params``."""

from __future__ import annotations

from pathlib import Path

from mtlrec.config import ExperimentConfig
from mtlrec.data.loading import config_schema
from mtlrec.models.base import MultiTaskModel
from mtlrec.models.build import build_model
from mtlrec.train.run import load_run

_PLACEHOLDER_ROWS = 3


def model_of(source: str | Path) -> tuple[MultiTaskModel, ExperimentConfig, bool]:
    """``(model, config, sized)``: a run folder's model (with its table sizes), or a config's
    model built without data (vocabulary tables get a placeholder size: ``sized`` False).
    Parameter names do not depend on the data, so either gives the names of the run."""
    p = Path(source)
    if p.is_dir():
        loaded = load_run(p)
        return loaded.model, loaded.config, True
    cfg = ExperimentConfig.load(p)
    schema = config_schema(cfg)
    sizes = {}
    for name, feats in schema.tables().items():
        f = feats[0]
        n = f.hash_buckets or f.vocab_size
        sizes[name] = n + 2 if n else _PLACEHOLDER_ROWS
    return build_model(cfg.model.name, schema, sizes, cfg.model.params), cfg, False
