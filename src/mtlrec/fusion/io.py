"""Fusion files: JSON (validated on load), plus a LightGBM text model beside it when learned.

Format (``format`` 1)::

    {"format": 1, "kind": "weighted_sum", "tasks": ["click", "conv"],
     "params": {"weights": {"click": 1.0, "conv": 2.0}, "transform": "identity"},
     "calibration": {"conv": {"method": "platt", "a": 1.1, "b": -0.3}},
     "meta": {"method": "cem", "objective": 2.41, ...}}

Example:
    >>> import tempfile, pathlib, numpy as np
    >>> from mtlrec.fusion import WeightedSum, SumParams, load_fusion, save_fusion
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "fusion.json"
    >>> save_fusion(WeightedSum(SumParams(weights={"click": 1.0})), path)
    >>> load_fusion(path)({"click": np.array([0.2])}).tolist()
    [0.2]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtlrec.errors import CheckpointError, ConfigError
from mtlrec.fusion.base import FUSION_FORMAT, Fusion
from mtlrec.fusion.calibration import Calibration
from mtlrec.registry import FUSIONS
from mtlrec.utils.atomic import write_text


class FusionFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal[1]
    kind: str
    tasks: list[str] = Field(min_length=1)
    params: dict[str, Any]
    calibration: dict[str, Calibration] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)


def fusion_from_dict(
    data: Any, *, source: str = "<fusion>", base_dir: str | Path | None = None
) -> Fusion:
    """Build a fusion from its JSON object (validated; errors name ``source``)."""
    try:
        f = FusionFile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{source}: {loc}: {err['msg']}") from None
    entry = FUSIONS.get(f.kind)
    try:
        params = FUSIONS.parse_params(f.kind, f.params)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    kwargs: dict[str, Any] = {"base_dir": base_dir} if f.kind == "lgbm" else {}
    try:
        fusion: Fusion = entry.cls(params, f.calibration, f.meta, **kwargs)
    except (ConfigError, CheckpointError) as e:
        raise type(e)(f"{source}: {e}") from None
    if list(fusion.tasks) != f.tasks:
        raise ConfigError(
            f"{source}: 'tasks' {f.tasks} do not match the tasks of the parameters "
            f"{list(fusion.tasks)}"
        )
    return fusion


def load_fusion(
    path: str | Path, tasks: Sequence[str] | None = None, auxiliary: Sequence[str] = ()
) -> Fusion:
    """Load a fusion JSON file; with ``tasks`` (a model's task names), check it fuses only
    those, raising :class:`ConfigError` naming the unknown ones, or the ``auxiliary`` tasks
    (trained, never fused: ``TaskSpec.auxiliary``) it names."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"fusion file {p} not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    fusion = fusion_from_dict(data, source=str(p), base_dir=p.parent)
    aux = [t for t in fusion.tasks if t in auxiliary]
    if aux:
        raise ConfigError(
            f"{p}: fusion names auxiliary tasks {aux}: they are trained, never fused or served"
        )
    if tasks is not None:
        unknown = [t for t in fusion.tasks if t not in tasks]
        if unknown:
            raise ConfigError(
                f"{p}: fusion names tasks {unknown} that the model does not predict "
                f"(model tasks: {', '.join(tasks)})"
            )
    return fusion


def save_fusion(fusion: Fusion, path: str | Path) -> None:
    """Write ``fusion`` as JSON atomically (and its LightGBM model beside it, first)."""
    p = Path(path)
    save = getattr(fusion, "save_artifacts", None)
    if save is not None:
        save(p)
    write_text(p, json.dumps(fusion.to_dict(), indent=2, allow_nan=False) + "\n")


__all__ = ["FUSION_FORMAT", "FusionFile", "fusion_from_dict", "load_fusion", "save_fusion"]
