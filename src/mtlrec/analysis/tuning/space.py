"""The search space of ``mtlrec tune``: parsed from YAML, and a trial's values set into a
config (shortcuts resolved per model). See :mod:`mtlrec.analysis.tuning`."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from mtlrec.config import ExperimentConfig, apply_overrides, switch_model_params
from mtlrec.errors import ConfigError
from mtlrec.registry import MODELS

if TYPE_CHECKING:
    import optuna

DEFAULT_SPACE: dict[str, Any] = {
    "num_experts": {"low": 2, "high": 16, "log": True},
    "gate_depth": {"low": 0, "high": 3},
    "gate_width": [16, 32, 64],
    "expert_width": [32, 64, 128, 256],
    "tower_width": [16, 32, 64],
    "lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "balancing": ["static", "uncertainty", "dwa"],
}
"""The space searched without ``--space``; shortcuts a model does not take are left out."""

_MODEL_KEYS = {
    "num_experts": ("num_experts",),
    "gate_depth": ("gate_hidden",),
    "gate_width": ("gate_hidden",),
    "expert_width": ("expert_hidden",),
    "tower_width": ("tower_hidden",),
}
_SHORTCUTS = {*_MODEL_KEYS, "lr", "balancing"}


@dataclass(frozen=True)
class Dimension:
    """One entry of the search space: ``choices``, a ``low``..``high`` range, or ``fixed``."""

    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    fixed: Any = None

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def suggest(self, trial: optuna.Trial) -> Any:
        """This dimension's value for ``trial`` (asked of its sampler)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.low is None or self.high is None:
            return self.fixed
        if self.is_int:
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def grid(self) -> list[Any] | None:
        """The values a grid search visits (None: fixed, not a grid axis)."""
        if self.choices is not None:
            return list(self.choices)
        if self.low is None or self.high is None:
            return None
        if not self.is_int:
            raise ConfigError(f"--grid: {self.name} is a float range; give a list of values")
        return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))


def parse_space(raw: Any, *, source: str = "search space") -> list[Dimension]:
    """The dimensions of a space written as YAML (see the module doc).

    Raises:
        ConfigError: an entry that is not a list, a range or a value, or a key of the data.

    Example:
        >>> [d.name for d in parse_space({"gate_depth": {"low": 0, "high": 3}, "lr": 0.01})]
        ['gate_depth', 'lr']
        >>> parse_space({"num_experts": [2, 4]})[0].grid()
        [2, 4]
    """
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: expected a mapping from a name to values")
    dims = []
    for name, spec in raw.items():
        if not isinstance(name, str) or (name not in _SHORTCUTS and "." not in name):
            raise ConfigError(
                f"{source}: {name!r} is neither a dotted config key nor one of "
                f"{', '.join(sorted(_SHORTCUTS))}"
            )
        if name.split(".")[0] in ("data", "schema", "tasks", "output_dir"):
            raise ConfigError(f"{source}: {name}: the data and tasks are fixed for a search")
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{source}: {name}: an empty list")
            dims.append(Dimension(name, choices=tuple(spec)))
        elif isinstance(spec, dict):
            extra = set(spec) - {"low", "high", "log", "step"}
            if extra or "low" not in spec or "high" not in spec or spec["low"] > spec["high"]:
                raise ConfigError(f"{source}: {name}: a range is {{low, high, log, step}}")
            dims.append(
                Dimension(
                    name,
                    low=spec["low"],
                    high=spec["high"],
                    log=bool(spec.get("log", False)),
                    step=spec.get("step"),
                )
            )
        else:
            dims.append(Dimension(name, fixed=spec))
    return dims


def default_space(model: str) -> dict[str, Any]:
    """:data:`DEFAULT_SPACE` without the shortcuts ``model`` does not take."""
    return {k: v for k, v in DEFAULT_SPACE.items() if _takes(model, k)}


def _takes(model: str, shortcut: str) -> bool:
    takes = set(MODELS.param_names(model))
    if shortcut == "num_experts":
        return "num_experts" in takes or {"experts_per_task", "shared_experts"} <= takes
    return all(k in takes for k in _MODEL_KEYS.get(shortcut, ()))


def _current(model: str, params: dict[str, Any], key: str) -> Any:
    if key in params:
        return params[key]
    field = MODELS.get(model).params.model_fields[key]  # type: ignore[union-attr]
    return field.get_default(call_default_factory=True)


def _widths(current: Any, width: int) -> Any:
    if isinstance(current, int):
        return width
    return [width] * max(1, len(current))


def apply_values(cfg: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    """``cfg`` with a trial's values set (shortcuts resolved for its model).

    Raises:
        ConfigError: a shortcut the model does not take.

    Example:
        >>> cfg = ExperimentConfig.from_dict({"data": {"dataset": "census-income"},
        ...     "model": {"name": "ple", "params": {"expert_hidden": [64, 32]}}})
        >>> p = apply_values(cfg, {"num_experts": 3, "gate_depth": 2, "expert_width": 16,
        ...                        "gate_width": 8}).model.params
        >>> p["experts_per_task"], p["shared_experts"], p["gate_hidden"], p["expert_hidden"]
        (3, 3, [8, 8], [16, 16])
    """
    data = yaml.safe_load(cfg.to_yaml())
    if "model.name" in values and values["model.name"] != data["model"]["name"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kept = switch_model_params(values["model.name"], data["model"]["params"])
        data["model"] = {"name": values["model.name"], "params": kept}
    data = apply_overrides(
        data,
        [f"{k}={json.dumps(v)}" for k, v in values.items() if "." in k and k != "model.name"],
    )
    model, params = data["model"]["name"], data["model"]["params"]
    for key in values:
        if key in _MODEL_KEYS and not _takes(model, key):
            raise ConfigError(f"search space: {key}: model {model!r} has no such option")
    if "num_experts" in values:
        n = int(values["num_experts"])
        keys = ["num_experts"] if "num_experts" in MODELS.param_names(model) else []
        for k in keys or ["experts_per_task", "shared_experts"]:
            params[k] = n
    if "gate_depth" in values or "gate_width" in values:
        old = _current(model, params, "gate_hidden")
        depth = int(values.get("gate_depth", len(old)))
        width = int(values.get("gate_width", old[0] if old else 32))
        params["gate_hidden"] = [width] * depth
    if "expert_width" in values:
        params["expert_hidden"] = _widths(
            _current(model, params, "expert_hidden"), int(values["expert_width"])
        )
    if "tower_width" in values:
        params["tower_hidden"] = _widths(
            _current(model, params, "tower_hidden"), int(values["tower_width"])
        )
    if "lr" in values:
        data["training"]["optimizer"]["lr"] = float(values["lr"])
    if "balancing" in values:
        data["balancing"] = {"name": values["balancing"]}
    return ExperimentConfig.from_dict(data, source="trial config", base_dir=cfg.base_dir)
