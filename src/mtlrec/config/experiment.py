"""The whole experiment: its sections, loading from YAML with overrides, the monitored key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from mtlrec.config.editing import _key_hint, _switched_model, apply_overrides, switch_model_params
from mtlrec.config.sections import (
    _STRICT,
    CONFIG_VERSION,
    BalancingConfig,
    DataConfig,
    ModelConfig,
    TrainingConfig,
)
from mtlrec.errors import ConfigError
from mtlrec.schema import Schema


class ExperimentConfig(BaseModel):
    """A whole experiment."""

    model_config = _STRICT
    version: int = CONFIG_VERSION
    data: DataConfig
    schema_: Schema | None = Field(default=None, alias="schema")
    tasks: list[str] | None = Field(
        default=None,
        description="train only these tasks of the schema (e.g. a single-task baseline)",
        min_length=1,
    )
    model: ModelConfig
    balancing: BalancingConfig = BalancingConfig()
    training: TrainingConfig = TrainingConfig()
    output_dir: str = "runs/experiment"
    base_dir: str | None = Field(
        default=None,
        exclude=True,
        description="the folder relative data paths start from: the YAML's folder, unless the "
        "file names one (a run folder's config.yaml names the folder of the config it was "
        "trained from, so that it reads the same data wherever the run folder is moved)",
    )

    @model_validator(mode="after")
    def _version(self) -> ExperimentConfig:
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"config version {self.version} is not supported (this mtlrec reads version "
                f"{CONFIG_VERSION})"
            )
        return self

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, source: str = "config", base_dir: str | None = None
    ) -> ExperimentConfig:
        """A config from a parsed mapping.

        Args:
            data: the mapping (as read from YAML).
            source: named in error messages (the file).
            base_dir: the folder of the file; relative data paths start there, unless ``data``
                names its own ``base_dir`` (itself relative to this folder).

        Raises:
            ConfigError: one line naming the key; an unknown key gets the closest valid one.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        own = data.get("base_dir")
        if isinstance(own, str) and own:
            base_dir = str(Path(base_dir) / own) if base_dir else own
        try:
            cfg = cls.model_validate({**data, "base_dir": base_dir})
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]).replace("schema_", "schema")
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key" + _key_hint(cls, err["loc"])
            raise ConfigError(f"{source}: {loc}: {msg}") from None
        return cfg

    @classmethod
    def load(
        cls, path: str | Path, overrides: list[str] | None = None, *, strict: bool = False
    ) -> ExperimentConfig:
        """Read a YAML config and apply ``key.path=value`` overrides.

        An override of ``model.name`` switches the model as :meth:`with_model` does: the
        file's model parameters that the new model takes are kept, the others dropped with a
        :class:`ConfigWarning` (``strict``: a :class:`ConfigError` listing the new model's
        parameters instead). Parameters given by overrides (``model.params.x=...``) are always
        the new model's.
        """
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        data = apply_overrides(raw, overrides or [])
        data = _switched_model(raw, data, overrides or [], strict=strict)
        return cls.from_dict(data, source=str(path), base_dir=str(p.parent.resolve()))

    def with_model(
        self, name: str, params: dict[str, Any] | None = None, *, strict: bool = False
    ) -> ExperimentConfig:
        """This experiment with another model (what ``--set model.name=NAME`` does).

        Args:
            name: a registered model.
            params: parameters given for the new model (kept as they are; validated when the
                model is built).
            strict: refuse (:class:`ConfigError` listing the new model's parameters) instead
                of dropping the current parameters that the new model does not take.

        Returns:
            A copy whose ``model.params`` holds the current parameters the new model takes
            (a :class:`ConfigWarning` names the others, dropped), updated by ``params``.

        Example:
            >>> cfg = ExperimentConfig.from_dict({"data": {"dataset": "census-income"},
            ...     "model": {"name": "mmoe", "params": {"num_experts": 4, "tower_hidden": [8]}}})
            >>> import warnings
            >>> with warnings.catch_warnings():
            ...     warnings.simplefilter("ignore")
            ...     cfg.with_model("shared_bottom").model.params
            {'tower_hidden': [8]}
        """
        kept = switch_model_params(
            name, self.model.params, keep=params or {}, previous=self.model.name, strict=strict
        )
        model = ModelConfig(name=name, params=kept)
        return self.model_copy(update={"model": model})

    def resolve_path(self, path: str) -> str:
        """A data path relative to the config file's folder (absolute paths unchanged)."""
        p = Path(path)
        if p.is_absolute() or self.base_dir is None:
            return str(p)
        return str(Path(self.base_dir) / p)

    def to_yaml(self, *, with_base_dir: bool = False) -> str:
        """The resolved config as YAML (every default written out).

        Args:
            with_base_dir: also write ``base_dir``, the absolute folder relative data paths
                start from (a run folder's ``config.yaml`` does, so that it reads the same
                data from any working directory and wherever the folder is moved).
        """
        data = self.model_dump(mode="json", by_alias=True, exclude={"base_dir"})
        if with_base_dir:
            data["base_dir"] = str(Path(self.base_dir or ".").resolve())
        return yaml.safe_dump(data, sort_keys=False)

    def monitor_key(self, schema: Schema) -> tuple[str, str]:
        """The (task, metric) that selects the best epoch."""
        return monitor_key(self.training.monitor, schema)


def monitor_key(monitor: str | None, schema: Schema) -> tuple[str, str]:
    """``training.monitor`` as ``(task, metric)``: ``'task/metric'``, ``'mean/metric'`` (over
    the tasks but the auxiliary ones), or (None) the first non-auxiliary task's AUC (binary),
    MSE (regression) or accuracy (multiclass)."""
    if monitor:
        task, _, metric = monitor.partition("/")
        if (task not in schema.task_names and task != "mean") or not metric:
            raise ConfigError(
                f"training.monitor {monitor!r} must be 'task/metric' with a task among "
                f"{list(schema.task_names)}, or 'mean/metric' (the metric's mean over the "
                "tasks that report it)"
            )
        return task, metric
    t = schema.primary_tasks[0]
    return t.name, {"binary": "auc", "regression": "mse", "multiclass": "accuracy"}[t.kind]
