"""A run: from a config to a folder holding everything needed to score again.

Folder layout (every file written atomically)::

    RUN/config.yaml                 the resolved config
    RUN/schema.json                 features and tasks
    RUN/encoders.json               fitted vocabularies and dense statistics
    RUN/model.json                  model name, its resolved parameters, table sizes
    RUN/checkpoints/last.safetensors, best.safetensors
    RUN/metrics.jsonl               one line per epoch (train losses, validation metrics)
    RUN/summary.json                best epoch, validation and test metrics

Running the same command again resumes from ``last.safetensors`` (the data order, RNG and
optimiser state are restored, so the result equals an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from mtlrec.config import ExperimentConfig
from mtlrec.data.dataset import ColumnarDataset
from mtlrec.data.loading import load_datasets
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import CheckpointError, ConfigError
from mtlrec.models.base import MultiTaskModel
from mtlrec.models.build import build_model
from mtlrec.registry import MODELS
from mtlrec.schema import Schema
from mtlrec.train.callbacks import Callback, JsonlLogger
from mtlrec.train.checkpoint import load_checkpoint, restore_model
from mtlrec.train.trainer import FitResult, Trainer
from mtlrec.utils.atomic import write_text
from mtlrec.utils.runtime import configure_runtime
from mtlrec.weighting.build import build_weighting

if TYPE_CHECKING:
    from mtlrec.train.distributed import DistContext

RUN_FORMAT = 1
# config keys that may change between a run and its resumption
_RESUMABLE_CHANGES = {
    ("training", "epochs"),
    ("training", "progress"),
    ("training", "num_threads"),
    ("training", "checkpoint_every_steps"),
}


@dataclass
class RunResult:
    path: Path
    fit: FitResult
    valid_metrics: dict[str, dict[str, float]] | None
    test_metrics: dict[str, dict[str, float]] | None
    unknown_counts: dict[str, dict[str, int]]
    seconds: float


@dataclass
class LoadedRun:
    """A trained run, ready to score raw tables."""

    path: Path
    config: ExperimentConfig
    schema: Schema
    preprocessor: Preprocessor
    model: MultiTaskModel
    model_name: str

    def trainer(self, progress: bool = False) -> Trainer:
        tcfg = self.config.training.model_copy(update={"progress": progress})
        return Trainer(self.model, self.schema, config=tcfg)


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(cfg_dict))
    for sec, key in _RESUMABLE_CHANGES:
        out.get(sec, {}).pop(key, None)
    return out


def same_config(saved: Any, cfg: ExperimentConfig) -> bool:
    """Whether a run folder's saved ``config.yaml`` (parsed) is the run of ``cfg``: equal but
    for the settings a resume may change. A key added since (saved without it, so with its
    default) does not make it another config; a config this version cannot read differs."""
    with contextlib.suppress(ConfigError):
        saved = yaml.safe_load(ExperimentConfig.from_dict(saved).to_yaml())
    if not isinstance(saved, dict):
        return False
    return _comparable(saved) == _comparable(yaml.safe_load(cfg.to_yaml()))


def _check_same_run(out: Path, cfg: ExperimentConfig) -> None:
    if not same_config(yaml.safe_load((out / "config.yaml").read_text()), cfg):
        raise ConfigError(
            f"{out} holds a run of another config; pass --overwrite to start over there, or "
            "choose another output_dir"
        )


def train_run(
    cfg: ExperimentConfig,
    *,
    output_dir: str | Path | None = None,
    resume: bool = True,
    overwrite: bool = False,
    callbacks: list[Callback] | None = None,
    progress_label: str = "train",
    distributed: DistContext | None = None,
) -> RunResult:
    """Train the configured model, select its epoch on validation, score the test split.

    With ``distributed`` (one process of a data-parallel group, see
    :mod:`mtlrec.train.distributed`) every process trains on its share of each batch and only
    rank 0 writes files.
    """
    t0 = time.perf_counter()
    out = Path(output_dir or cfg.output_dir)
    existing = (out / "config.yaml").is_file()
    main = distributed is None or distributed.is_main
    if distributed is not None:
        distributed.barrier()  # every process has looked before rank 0 writes
    if existing and overwrite and main:
        for f in (
            "checkpoints/last.safetensors",
            "checkpoints/best.safetensors",
            "metrics.jsonl",
            "summary.json",
            "encoders.json",
        ):
            (out / f).unlink(missing_ok=True)
    if existing and overwrite:
        existing = False
    if distributed is not None:
        distributed.barrier()  # nobody reads what rank 0 is removing
    if existing:
        _check_same_run(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    # threads and allocator as the Trainer sets them, before the data is read and encoded
    configure_runtime(cfg.training.num_threads, cfg.training.tune_allocator)
    pre_saved = None
    if existing and (out / "encoders.json").is_file():
        schema_saved = Schema.from_json((out / "schema.json").read_text())
        pre_saved = Preprocessor.from_json(
            schema_saved, (out / "encoders.json").read_text(), source=str(out / "encoders.json")
        )
    data = load_datasets(cfg, pre_saved)
    pre = data.preprocessor
    schema = pre.schema
    model_name = cfg.model.name
    params = MODELS.parse_params(model_name, cfg.model.params)
    # training.seed fixes the initial weights too, so the same command gives the same model
    torch.manual_seed(cfg.training.seed)
    model = build_model(model_name, schema, pre.table_sizes(), params)
    strategy = build_weighting(cfg.balancing.name, model.loss_task_names, cfg.balancing.params())
    if not existing and main:
        write_text(out / "config.yaml", cfg.to_yaml())
        write_text(out / "schema.json", schema.to_json())
        write_text(out / "encoders.json", pre.to_json())
        write_text(
            out / "model.json",
            json.dumps(
                {
                    "format": RUN_FORMAT,
                    "name": model_name,
                    "params": params.model_dump(mode="json"),
                    "table_sizes": pre.table_sizes(),
                },
                indent=2,
            ),
        )
        (out / "metrics.jsonl").unlink(missing_ok=True)
    meta = {"schema_fingerprint": schema.fingerprint(), "model": model_name}
    logger = [JsonlLogger(out / "metrics.jsonl")] if main else []
    trainer_kwargs: dict[str, Any] = dict(
        config=cfg.training,
        strategy=strategy,
        monitor=cfg.monitor_key(schema),
        run_dir=out,
        meta=meta,
        callbacks=[*logger, *(callbacks or [])],
        progress_label=progress_label,
    )
    train, valid, test = data.train, data.valid, data.test
    if distributed is None:
        trainer = Trainer(model, schema, **trainer_kwargs)
    else:
        from mtlrec.train.distributed import DistributedTrainer, RankShard

        trainer = DistributedTrainer(model, schema, context=distributed, **trainer_kwargs)
        if isinstance(train, ColumnarDataset):
            train = RankShard(train, distributed.rank, distributed.world_size)
        else:  # a stream: each process encodes only the rows of its shares
            from mtlrec.data.stream_dataset import sharded

            train = sharded(train, distributed.rank, distributed.world_size)
    fit = trainer.fit(train, valid, resume=resume)
    valid_metrics = trainer.evaluate(valid) if valid is not None else None
    test_metrics = trainer.evaluate(test) if test is not None else None
    unknown = {
        k: ds.unknown_counts for k in ("train", "valid", "test") if (ds := data.get(k)) is not None
    }
    seconds = time.perf_counter() - t0
    if main:
        _write_summary(out, model_name, fit, valid_metrics, test_metrics, unknown, seconds)
    return RunResult(out, fit, valid_metrics, test_metrics, unknown, seconds)


def _write_summary(
    out: Path,
    model_name: str,
    fit: FitResult,
    valid_metrics: dict[str, dict[str, float]] | None,
    test_metrics: dict[str, dict[str, float]] | None,
    unknown: dict[str, dict[str, int]],
    seconds: float,
) -> None:
    write_text(
        out / "summary.json",
        json.dumps(
            {
                "model": model_name,
                "best_epoch": fit.best_epoch,
                "monitor": fit.monitor,
                "best_value": fit.best_value,
                "epochs_run": fit.epochs_run,
                "stop_reason": fit.stop_reason,
                "valid": valid_metrics,
                "test": test_metrics,
                "unknown_categories": unknown,
                "seconds": seconds,
            },
            indent=2,
            allow_nan=True,
        ),
    )


def load_run(path: str | Path, *, checkpoint: str = "best") -> LoadedRun:
    """Load a trained run folder (weights from ``best``, else ``last``; no pickle)."""
    p = Path(path)
    for f in ("config.yaml", "schema.json", "encoders.json", "model.json"):
        if not (p / f).is_file():
            raise CheckpointError(f"{p} is not an mtlrec run folder (no {f})")
    try:
        cfg_data = yaml.safe_load((p / "config.yaml").read_text())
        model_info = json.loads((p / "model.json").read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: corrupt run files ({e})") from None
    if not isinstance(model_info, dict):
        raise CheckpointError(f"{p / 'model.json'}: expected a JSON object")
    if model_info.get("format") != RUN_FORMAT:
        raise CheckpointError(
            f"{p / 'model.json'}: run format {model_info.get('format')!r} is not {RUN_FORMAT}"
        )
    name, params = model_info.get("name"), model_info.get("params", {})
    if not isinstance(name, str) or name not in MODELS.names():
        raise CheckpointError(
            f"{p / 'model.json'}: 'name' must be a registered model, got {name!r}"
        )
    if not isinstance(params, dict):
        raise CheckpointError(f"{p / 'model.json'}: 'params' must be an object, got {params!r}")
    cfg = ExperimentConfig.from_dict(cfg_data, source=str(p / "config.yaml"))
    schema = Schema.from_json((p / "schema.json").read_text())
    pre = Preprocessor.from_json(
        schema, (p / "encoders.json").read_text(), source=str(p / "encoders.json")
    )
    try:
        model = build_model(name, schema, pre.table_sizes(), params)
    except ConfigError as e:
        raise CheckpointError(f"{p / 'model.json'}: {e}") from None
    ckpt_path = p / "checkpoints" / f"{checkpoint}.safetensors"
    if not ckpt_path.is_file() and checkpoint == "best":
        ckpt_path = p / "checkpoints" / "last.safetensors"
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.meta.get("schema_fingerprint") != schema.fingerprint():
        raise CheckpointError(f"{ckpt_path}: checkpoint was trained on another schema")
    restore_model(model, ckpt.model, source=str(ckpt_path))
    model.eval()
    return LoadedRun(p, cfg, schema, pre, model, name)
