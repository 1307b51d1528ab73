"""Constants, the export error and the fusion-file loader shared by writing and loading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtlrec.errors import ConfigError, MtlrecError
from mtlrec.schema import Schema

EXPORT_FORMAT = 1
FORMATS = ("onnx", "torchscript")
PARITY_TOLERANCE = 1e-5
SCORE_OUTPUT = "score"
_MODEL_FILE = {"onnx": "model.onnx", "torchscript": "model.pt"}

Fusion = Callable[..., Any]
"""A fusion (:class:`mtlrec.fusion.base.Fusion`): ``{task: [N]}`` predictions -> ``[N]``."""


class ExportError(MtlrecError):
    """The model cannot be exported, or the export does not reproduce the eager model."""


def load_fusion_file(path: str | Path, schema: Schema) -> Fusion:
    """Load a fusion file with :func:`mtlrec.fusion.load_fusion` (the ``fusion`` part).

    Raises:
        ConfigError: the fusion part is not installed, or the file does not fit the tasks.
    """
    try:
        from mtlrec.fusion import load_fusion
    except ImportError:
        raise ConfigError(
            f"--fusion {path}: score fusion (mtlrec.fusion) is not available in this mtlrec "
            "installation"
        ) from None
    auxiliary = [t.name for t in schema.tasks if t.auxiliary]
    return load_fusion(path, tasks=schema.primary_task_names, auxiliary=auxiliary)
