"""A run: from a config to a folder holding everything needed to score again.

Folder layout (every file written atomically)::

    RUN/config.yaml                 the resolved config
    RUN/schema.json                 features and tasks
    RUN/encoders.json               fitted vocabularies and dense statistics
    RUN/model.json                  model name, its resolved parameters, table sizes
    RUN/checkpoints/last.safetensors, best.safetensors
    RUN/metrics.jsonl               one line per epoch (train losses, validation metrics)
    RUN/summary.json                best epoch, validation and test metrics, drift reference
    RUN/lineage.json                parent run (warm start), data files seen
    RUN/vocab_counts.parquet        value counts of the fitted vocabularies (warm starts)

Running the same command again resumes from ``last.safetensors`` (the data order, RNG and
optimiser state are restored, so the result equals an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
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
from mtlrec.train.shard_checkpoint import ShardSet, is_sharded, restore_gathered
from mtlrec.train.trainer import FitResult, Trainer
from mtlrec.train.warm_start import WarmStart, initialise, write_run_files
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
    ("training", "device"),
}


@dataclass
class RunResult:
    path: Path
    fit: FitResult
    valid_metrics: dict[str, dict[str, float]] | None
    test_metrics: dict[str, dict[str, float]] | None
    unknown_counts: dict[str, dict[str, int]]
    seconds: float
    init: dict[str, Any] = field(default_factory=dict)
    """What initialised the weights: warm start, pretrained vectors (also in lineage.json)."""


@dataclass
class LoadedRun:
    """A trained run, ready to score raw tables."""

    path: Path
    config: ExperimentConfig
    schema: Schema
    preprocessor: Preprocessor
    model: MultiTaskModel
    model_name: str

    def trainer(
        self, progress: bool = False, *, device: str = "auto", precision: str = "fp32"
    ) -> Trainer:
        """A trainer to score with: on ``device`` (``auto``: a GPU if there is one, whatever
        the run was trained on) and in ``precision`` (fp32 unless asked)."""
        tcfg = self.config.training.model_copy(
            update={"progress": progress, "device": device, "precision": precision}
        )
        return Trainer(self.model, self.schema, config=tcfg)


# where a run lives is not what it is: a run folder moved or copied elsewhere is the same run
_PLACE_KEYS = ("output_dir", "base_dir")
_DATA_PATHS = ("data.train", "data.valid", "data.test")
_SHOWN_DIFFERENCES = 4
_ABSENT: Any = object()


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(cfg_dict))
    for sec, key in _RESUMABLE_CHANGES:
        out.get(sec, {}).pop(key, None)
    for key in _PLACE_KEYS:
        out.pop(key, None)
    return out


def _flatten(x: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested mappings and lists by dotted path (``schema.features.0.name``)."""
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else None
    if items is None or not x:
        return {prefix: x}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _same_file(a: Any, base_a: Any, b: Any, base_b: str | None) -> bool:
    """Whether two data paths, each relative to its own folder (``base_b`` None: the working
    directory), name the same file."""
    if not (isinstance(a, str) and isinstance(b, str) and isinstance(base_a, str)):
        return False
    return (Path(base_a) / a).resolve() == (Path(base_b or ".") / b).resolve()


def config_differences(saved: Any, cfg: ExperimentConfig) -> list[tuple[str, Any, Any]]:
    """How ``cfg`` differs from a run folder's saved ``config.yaml`` (parsed): ``(dotted key,
    saved value, new value)``, ``_ABSENT`` for a missing key, in the config's order.

    Not differences: the settings a resume may change (``training.epochs``...), where the run
    lives (``output_dir``), and a data path written differently that names the same file
    (each resolved from its own config's folder). A key added since the run was saved (saved
    without it, so with its default) is no difference; a config this version cannot read
    differs as a whole (key ``""``).
    """
    saved_base = saved.get("base_dir") if isinstance(saved, dict) else None
    with contextlib.suppress(ConfigError):
        saved = yaml.safe_load(ExperimentConfig.from_dict(saved).to_yaml())
    if not isinstance(saved, dict):
        return [("", saved, "a config")]
    old = _flatten(_comparable(saved))
    new = _flatten(_comparable(yaml.safe_load(cfg.to_yaml())))
    diffs = []
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a == b or (key in _DATA_PATHS and _same_file(a, saved_base, b, cfg.base_dir)):
            continue
        diffs.append((key, a, b))
    return diffs


def same_config(saved: Any, cfg: ExperimentConfig) -> bool:
    """Whether a run folder's saved ``config.yaml`` (parsed) is the run of ``cfg``: equal but
    for the settings a resume may change and the run's place (see
    :func:`config_differences`)."""
    return not config_differences(saved, cfg)


def _shown(v: Any) -> str:
    if v is _ABSENT:
        return "(absent)"
    text = repr(v) if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_same_run(out: Path, cfg: ExperimentConfig) -> None:
    """Refuse to resume a run folder of another config, naming the keys that differ and the
    way out."""
    diffs = config_differences(yaml.safe_load((out / "config.yaml").read_text()), cfg)
    if not diffs:
        return
    shown = "; ".join(
        f"{k or 'config'}: {_shown(a)} -> {_shown(b)}" for k, a, b in diffs[:_SHOWN_DIFFERENCES]
    )
    more = len(diffs) - _SHOWN_DIFFERENCES
    if more > 0:
        shown += f"; and {more} more"
    raise ConfigError(
        f"{out} holds a run of another config ({shown}); to resume it, use the config it was "
        f"trained with ({out / 'config.yaml'}); to start over there, pass --overwrite "
        "(overwrite=True from Python); or choose another output folder (--output)"
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
    init_from: str | Path | None = None,
) -> RunResult:
    """Train the configured model, select its epoch on validation, score the test split.

    With ``distributed`` (one process of a data-parallel group, see
    :mod:`mtlrec.train.distributed`) every process trains on its share of each batch and only
    rank 0 writes files. ``init_from`` (an earlier run folder) sets ``training.init_from``: a
    warm start (:mod:`mtlrec.train.warm_start`, docs/continual.md).
    """
    if init_from is not None:
        tcfg = cfg.training.model_copy(update={"init_from": str(Path(init_from).resolve())})
        cfg = cfg.model_copy(update={"training": tcfg})
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
            "lineage.json",
            "vocab_counts.parquet",
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
    # warm start (training.init_from) on a fresh start; a resumed run has its own checkpoint
    fresh = not (resume and (out / "checkpoints" / "last.safetensors").is_file())
    warm = _warm_start(cfg) if cfg.training.init_from is not None and fresh else None
    grow = warm.grow if warm is not None and pre_saved is None else None
    data = load_datasets(cfg, pre_saved, adapt=grow)
    pre = data.preprocessor
    schema = pre.schema
    model_name = cfg.model.name
    params = MODELS.parse_params(model_name, cfg.model.params)
    # training.seed fixes the initial weights too, so the same command gives the same model
    torch.manual_seed(cfg.training.seed)
    if cfg.model.embedding_backend == "torchrec" and warm is not None:
        raise ConfigError(
            "training.init_from: warm starts are for model.embedding_backend: torch (the "
            "TorchRec tables are filled from their shards)"
        )
    model = build_model(
        model_name,
        schema,
        pre.table_sizes(),
        params,
        embedding_backend=cfg.model.embedding_backend,
    )
    strategy = build_weighting(cfg.balancing.name, model.loss_task_names, cfg.balancing.params())
    init = initialise(cfg, model, strategy, pre, warm) if fresh else {}
    if not existing and main:
        write_run_files(out, cfg, pre, warm, init)
        write_text(out / "config.yaml", cfg.to_yaml(with_base_dir=True))
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
                    "embedding_backend": cfg.model.embedding_backend,
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
    if warm is not None and (carry := warm.optimizer_callback()) is not None:
        trainer_kwargs["callbacks"].append(carry)
    train, valid, test = data.train, data.valid, data.test
    if cfg.model.embedding_backend == "torchrec":  # tables sharded over the processes
        from mtlrec.train.sharded import ShardedTrainer

        trainer = ShardedTrainer(
            model, schema, context=distributed, sharding=cfg.model.sharding, **trainer_kwargs
        )
    elif distributed is None:
        trainer = Trainer(model, schema, **trainer_kwargs)
    else:
        from mtlrec.train.distributed import DistributedTrainer

        trainer = DistributedTrainer(model, schema, context=distributed, **trainer_kwargs)
    if distributed is not None:
        from mtlrec.train.distributed import RankShard

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
    reference = None
    # sharded tables: every process takes part in scoring (rank 0 keeps the result)
    scorers = main or cfg.model.embedding_backend == "torchrec"
    if scorers and valid is not None:  # what `mtlrec evaluate --data` compares new data with
        from mtlrec.analysis.drift import drift_reference

        preds = trainer.predict(valid)
        reference = drift_reference(valid, preds) if main else None
    seconds = time.perf_counter() - t0
    if main:
        _write_summary(
            out, model_name, fit, valid_metrics, test_metrics, unknown, seconds, reference
        )
    return RunResult(out, fit, valid_metrics, test_metrics, unknown, seconds, init)


def _warm_start(cfg: ExperimentConfig) -> WarmStart:
    """The checked earlier run of ``training.init_from`` (a run folder: relative to the working
    directory, as ``output_dir``)."""
    assert cfg.training.init_from is not None
    path = Path(cfg.training.init_from)
    return WarmStart(cfg, load_run(path, checkpoint=cfg.training.init_checkpoint))


def _write_summary(
    out: Path,
    model_name: str,
    fit: FitResult,
    valid_metrics: dict[str, dict[str, float]] | None,
    test_metrics: dict[str, dict[str, float]] | None,
    unknown: dict[str, dict[str, int]],
    seconds: float,
    reference: dict[str, Any] | None = None,
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
                "drift_reference": reference,
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
    if is_sharded(ckpt.meta):  # a TorchRec run: its tables gathered into the torch backend
        shards = ShardSet(ckpt_path.parent, ckpt.meta["shards"])
        restore_gathered(model, ckpt.model, shards, source=str(ckpt_path))
    else:
        restore_model(model, ckpt.model, source=str(ckpt_path))
    model.eval()
    return LoadedRun(p, cfg, schema, pre, model, name)
