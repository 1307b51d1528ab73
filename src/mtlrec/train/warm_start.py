"""Warm start: a new run on new data that starts from an earlier run (``training.init_from``).

:func:`~mtlrec.train.run.train_run` composes three pieces, each usable alone:

1. vocabulary growth (:mod:`mtlrec.data.vocab_growth`): the earlier run's vocabularies, with
   the new training rows' values appended (``data.vocab_counts``: ``new`` or ``cumulative``);
   dense statistics kept (``data.dense_stats: keep``) or refit;
2. the checkpoint remap (:mod:`mtlrec.train.remap`): the earlier weights copied into the new
   model, new rows initialised as usual, an added task's tower, gates and task experts fresh;
   the balancing strategy's state carried when it weighs the same tasks; the optimiser state
   reset (``training.init_optimizer: reset``) or carried (``carry``);
3. lineage (:mod:`mtlrec.train.lineage`): the parent run, its schema fingerprint and
   checkpoint, the data files.

:class:`WarmStart` checks first that the earlier run can be started from: the same model with
the same parameters, the same features (``min_count``, ``max_size`` and the source
``column`` may change), the same null tokens. Every refusal is one :class:`ConfigError` line
naming what differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, cast

from torch import nn

from mtlrec.config import ExperimentConfig
from mtlrec.data.loading import config_schema, null_values
from mtlrec.data.preprocess import Preprocessor
from mtlrec.data.vocab_growth import (
    COUNTS_FILE,
    check_prefix,
    grow_preprocessor,
    read_counts,
    table_counts,
    write_counts,
)
from mtlrec.errors import ConfigError
from mtlrec.models.base import MultiTaskModel
from mtlrec.registry import MODELS
from mtlrec.schema import Schema
from mtlrec.train.callbacks import Callback
from mtlrec.train.checkpoint import load_training_state
from mtlrec.train.lineage import write_lineage
from mtlrec.train.pretrained import load_pretrained
from mtlrec.train.remap import RemapPlan, plan_remap, remap_optimizer_state
from mtlrec.train.state import TrainerView, TrainState

_FREE_FEATURE_KEYS = {"min_count", "max_size", "column"}
"""What a feature may change between a run and the run warm-started from it."""


class ParentRun(Protocol):
    """What a warm start reads of the earlier run (a :class:`~mtlrec.train.run.LoadedRun`)."""

    path: Path
    config: ExperimentConfig
    schema: Schema
    preprocessor: Preprocessor
    model: MultiTaskModel
    model_name: str


def checkpoint_file(run: Path, which: str) -> Path:
    """The checkpoint a warm start reads: ``which``, or ``last`` when there is no ``best``."""
    p = run / "checkpoints" / f"{which}.safetensors"
    if not p.is_file() and which == "best":
        p = run / "checkpoints" / "last.safetensors"
    return p


def _feature_differences(old: Schema, new: Schema) -> list[str]:
    a = {f.name: f.model_dump() for f in old.features}
    b = {f.name: f.model_dump() for f in new.features}
    out = []
    if list(a) != list(b):
        out.append(f"features {list(a)} in the earlier run, {list(b)} here")
        return out
    for name, fa in a.items():
        fb = b[name]
        for k in fa:
            if k not in _FREE_FEATURE_KEYS and fa[k] != fb.get(k):
                was, now = fa[k], fb.get(k)
                out.append(f"feature {name!r}: {k} {was!r} in the earlier run, {now!r} here")
    if old.group_column != new.group_column:
        out.append(f"group_column {old.group_column!r} in the earlier run, {new.group_column!r}")
    return out


class WarmStart:
    """The earlier run a new run starts from, checked against the new config.

    Args:
        cfg: the new run's config (``training.init_from`` set).
        parent: the earlier run, loaded with ``cfg.training.init_checkpoint``
            (:func:`~mtlrec.train.run.load_run`).

    Raises:
        ConfigError: the model, its parameters, the features or the null tokens differ, or an
            option cannot be honoured (cumulative counts without kept counts, a carried
            optimiser state of another optimiser).
    """

    def __init__(self, cfg: ExperimentConfig, parent: ParentRun) -> None:
        t = cfg.training
        self.cfg = cfg
        self.parent = parent
        self.path = Path(parent.path).resolve()
        self.checkpoint = checkpoint_file(self.path, t.init_checkpoint)
        where = f"training.init_from {self.path}"
        if parent.model_name != cfg.model.name:
            raise ConfigError(
                f"{where}: the earlier run trained model {parent.model_name!r}, this config "
                f"{cfg.model.name!r}; a warm start keeps the architecture"
            )
        backends = {getattr(c.model, "embedding_backend", "torch") for c in (cfg, parent.config)}
        if backends != {"torch"}:
            raise ConfigError(
                f"{where}: warm starts copy the rows of the torch embedding backend; "
                "model.embedding_backend: torchrec is not supported yet"
            )
        old_p = MODELS.parse_params(parent.model_name, parent.config.model.params)
        new_p = MODELS.parse_params(cfg.model.name, cfg.model.params)
        a, b = old_p.model_dump(mode="json"), new_p.model_dump(mode="json")
        diffs = [f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in b if a.get(k) != b[k]]
        if diffs:
            raise ConfigError(
                f"{where}: the model's parameters differ ({'; '.join(diffs[:4])}); a warm "
                "start keeps the architecture"
            )
        self.schema = config_schema(cfg)
        fdiff = _feature_differences(parent.schema, self.schema)
        if fdiff:
            raise ConfigError(f"{where}: {'; '.join(fdiff[:3])}")
        tokens = tuple(null_values(cfg.data))
        if tokens != tuple(parent.preprocessor.null_values):
            raise ConfigError(
                f"{where}: data.null_values {list(tokens)} differ from the earlier run's "
                f"{list(parent.preprocessor.null_values)}: a value would change meaning"
            )
        counts_path = self.path / COUNTS_FILE
        self.parent_counts = read_counts(counts_path) if counts_path.is_file() else None
        if cfg.data.vocab_counts == "cumulative" and self.parent_counts is None:
            raise ConfigError(
                f"data.vocab_counts: cumulative needs the earlier run's counts ({counts_path} "
                "is missing: the run was trained by an earlier mtlrec); use data.vocab_counts: "
                "new"
            )
        self.strategy_state, self.optimizer_state, self.meta = load_training_state(self.checkpoint)
        if t.init_optimizer == "carry":
            po, no = parent.config.training.optimizer, t.optimizer
            if (po.name, po.sparse_embeddings) != (no.name, no.sparse_embeddings):
                raise ConfigError(
                    f"training.init_optimizer: carry needs the earlier run's optimiser "
                    f"({po.name}, sparse_embeddings {po.sparse_embeddings}); this config has "
                    f"{no.name}, sparse_embeddings {no.sparse_embeddings}; use reset"
                )
            names = (self.meta.get("optimizer") or {}).get("param_names")
            if self.optimizer_state is None or names is None:
                raise ConfigError(
                    f"training.init_optimizer: carry: {self.checkpoint} has no optimiser state "
                    "by parameter name (written by an earlier mtlrec); use reset"
                )
        self.growth: dict[str, dict[str, Any]] = {}
        self.plan: RemapPlan | None = None
        self.carried_strategy = False

    # -- 1. vocabularies ---------------------------------------------------------------------
    def grow(self, fitted: Preprocessor) -> Preprocessor:
        """The earlier encoders grown with ``fitted`` (encoders fitted on the new training
        rows): the ``adapt`` hook of :func:`~mtlrec.data.loading.load_datasets`."""
        grown, self.growth = grow_preprocessor(
            self.parent.preprocessor,
            fitted,
            counts=self.cfg.data.vocab_counts,
            parent_counts=self.parent_counts,
            dense=self.cfg.data.dense_stats,
        )
        return grown

    # -- 2. weights --------------------------------------------------------------------------
    def init_model(
        self, model: MultiTaskModel, strategy: nn.Module, pre: Preprocessor
    ) -> dict[str, Any]:
        """Copy the earlier weights into ``model`` (and the strategy's state into ``strategy``
        when it weighs the same tasks with the same strategy); ``pre`` (the new run's encoders)
        must keep every earlier value at its id."""
        check_prefix(self.parent.preprocessor, pre)
        self.plan = plan_remap(self.parent.model, model)
        self.plan.apply_weights(model, self.parent.model.state_dict())
        same = self.parent.config.balancing.name == self.cfg.balancing.name and tuple(
            self.parent.model.loss_task_names
        ) == tuple(model.loss_task_names)
        if same and self.strategy_state:
            strategy.load_state_dict(self.strategy_state)
            self.carried_strategy = True
        return {
            **self.plan.to_dict(),
            "strategy_state": "carried" if self.carried_strategy else "fresh",
        }

    def optimizer_callback(self) -> Callback | None:
        """A callback that loads the earlier optimiser state at the start of training
        (``training.init_optimizer: carry``; not when the run resumes its own checkpoint)."""
        if self.cfg.training.init_optimizer != "carry":
            return None
        return _CarryOptimizer(self)

    # -- 3. lineage --------------------------------------------------------------------------
    def parent_entry(self) -> dict[str, Any]:
        """The ``parent`` entry of the new run's lineage."""
        return {
            "run": str(self.path),
            "checkpoint": self.cfg.training.init_checkpoint,
            "checkpoint_file": str(self.checkpoint.relative_to(self.path)),
            "epoch": (self.meta.get("trainer") or {}).get("epoch"),
            "schema_fingerprint": self.parent.schema.fingerprint(),
            "model": self.parent.model_name,
        }

    def report(self) -> dict[str, Any]:
        """What the warm start did (for the lineage and the CLI)."""
        return {
            "vocabularies": self.growth,
            "vocab_counts": self.cfg.data.vocab_counts,
            "dense_stats": self.cfg.data.dense_stats,
            "optimizer_state": self.cfg.training.init_optimizer,
        }


class _CarryOptimizer(Callback):
    """Loads the earlier run's optimiser state, re-indexed, when a fresh fit starts (after the
    trainer allocated its own state, so that it is not overwritten)."""

    def __init__(self, warm: WarmStart) -> None:
        self.warm = warm
        self.carried = 0

    def on_fit_start(self, trainer: TrainerView, state: TrainState) -> None:
        if state.step != 0 or self.warm.plan is None or self.warm.optimizer_state is None:
            return
        t = cast(Any, trainer)
        self.carried = remap_optimizer_state(
            self.warm.plan,
            self.warm.optimizer_state,
            self.warm.meta["optimizer"]["param_names"],
            t.optimizer,
            t.model,
            t.strategy,
            carry_strategy=self.warm.carried_strategy,
        )


def initialise(
    cfg: ExperimentConfig,
    model: MultiTaskModel,
    strategy: nn.Module,
    pre: Preprocessor,
    warm: WarmStart | None,
) -> dict[str, Any]:
    """A new run's initial weights: the model's own initialisation, then the pretrained
    vectors (``training.pretrained``), then the earlier run's weights (``warm``; so with both,
    the vectors only reach the rows the earlier run did not have).

    Returns:
        What was done (``pretrained`` reports, the warm start's report).
    """
    out: dict[str, Any] = {}
    if cfg.training.pretrained:
        out["pretrained"] = {
            table: load_pretrained(
                model,
                pre,
                table,
                cfg.resolve_path(spec.path),
                id_column=spec.id_column,
                vector_column=spec.vector_column,
            )
            for table, spec in cfg.training.pretrained.items()
        }
    if warm is not None:
        out["warm_start"] = {**warm.report(), **warm.init_model(model, strategy, pre)}
    return out


def write_run_files(
    out: Path,
    cfg: ExperimentConfig,
    pre: Preprocessor,
    warm: WarmStart | None,
    init: dict[str, Any],
) -> None:
    """Write a new run folder's ``lineage.json`` and ``vocab_counts.parquet`` (the counts of
    its fitted tables: its training rows' plus, after a warm start, the earlier run's kept
    counts; not written when the encoders were loaded rather than fitted)."""
    write_lineage(out, cfg, parent=None if warm is None else warm.parent_entry(), init=init)
    counts = table_counts(pre)
    if counts:
        write_counts(out / COUNTS_FILE, counts)


def init_overrides(init_from: Path | None, checkpoint: str | None) -> list[str]:
    """``--set`` overrides of ``mtlrec train --init-from RUN --init-checkpoint C`` (the run
    folder made absolute, so a relaunched process reads the same one)."""
    out = []
    if init_from is not None:
        out.append(f"training.init_from={json.dumps(str(Path(init_from).resolve()))}")
    if checkpoint is not None:
        if checkpoint not in ("best", "last"):
            raise ConfigError(f"--init-checkpoint must be best or last, got {checkpoint!r}")
        out.append(f"training.init_checkpoint={checkpoint}")
    return out


def describe_init(init: dict[str, Any]) -> list[str]:
    """Lines saying what initialised a run's weights (for the CLI)."""
    lines = []
    for table, r in init.get("pretrained", {}).items():
        lines.append(
            f"pretrained {table}: {r['written']} rows from {r['vectors']} vectors; "
            f"{r['not_in_vocabulary']} ids not in the vocabulary, {r['rows_without_vector']} "
            "values without a vector (initialised as usual)"
        )
    ws = init.get("warm_start")
    if ws:
        grown = ", ".join(
            f"{k} +{v.get('added', 0)}"
            + (
                f" ({v['dropped_by_max_size']} over max_size)"
                if v.get("dropped_by_max_size")
                else ""
            )
            for k, v in ws["vocabularies"].items()
            if v.get("kind") == "vocabulary"
        )
        tasks = f"; new tasks {ws['added_tasks']}" if ws["added_tasks"] else ""
        lines.append(
            f"warm start: vocabularies {grown or 'unchanged'} ({ws['vocab_counts']} counts); "
            f"dense statistics {ws['dense_stats']}; optimiser state {ws['optimizer_state']}; "
            f"strategy state {ws['strategy_state']}{tasks}"
        )
    return lines
