"""An export folder, loaded: its encoders and its network (onnxruntime or TorchScript)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mtlrec.batch import Features
from mtlrec.data.columns import as_table
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import CheckpointError, ConfigError, DataError
from mtlrec.export.common import (
    _MODEL_FILE,
    EXPORT_FORMAT,
    FORMATS,
    SCORE_OUTPUT,
    Fusion,
    load_fusion_file,
)
from mtlrec.export.graph import features_to_inputs, input_names, output_names
from mtlrec.schema import Schema


def model_runner(
    format: str, path: Path, names: list[str], outs: list[str]
) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """A function: input arrays -> output arrays, for an exported model file."""
    if format == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(
                "scoring an ONNX export needs onnxruntime (pip install 'mtlrec[export]')"
            ) from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise CheckpointError(f"{path}: onnxruntime cannot load the model ({e})") from None

        def run_onnx(arrays: list[np.ndarray]) -> list[np.ndarray]:
            return list(sess.run(outs, dict(zip(names, arrays, strict=True))))

        return run_onnx
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load the TorchScript model ({e})") from None
    module.eval()

    def run_ts(arrays: list[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            res = module(*(torch.from_numpy(a) for a in arrays))
        return [r.numpy() for r in res]

    return run_ts


@dataclass
class ExportedModel:
    """An export folder, loaded: its encoders and its network (onnxruntime or TorchScript).

    Example:
        >>> m = ExportedModel.load("exports/mmoe")  # doctest: +SKIP
        >>> preds = m.score_raw(table)  # doctest: +SKIP
    """

    path: Path
    manifest: dict[str, Any]
    schema: Schema
    preprocessor: Preprocessor
    inputs: list[str]
    outputs: list[str]
    run_model: Callable[[list[np.ndarray]], list[np.ndarray]] = field(repr=False)
    fusion: Fusion | None = field(default=None, repr=False)
    last_unknown: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> ExportedModel:
        """Load an export folder (no pickle: JSON files and an ONNX/TorchScript graph).

        Raises:
            CheckpointError: not a complete export folder, or files that do not agree.
        """
        p = Path(path)
        man_path = p / "manifest.json"
        if not man_path.is_file():
            raise CheckpointError(
                f"{p} is not a complete mtlrec export (no manifest.json; run `mtlrec export`)"
            )
        try:
            man = json.loads(man_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{man_path}: not valid JSON ({e.msg})") from None
        if not isinstance(man, dict) or man.get("export_format") != EXPORT_FORMAT:
            got = man.get("export_format") if isinstance(man, dict) else None
            raise CheckpointError(f"{man_path}: export format {got!r} is not {EXPORT_FORMAT}")
        fmt = man.get("format")
        if fmt not in FORMATS:
            raise CheckpointError(f"{man_path}: 'format' must be one of {list(FORMATS)}")
        for f in ("schema.json", "encoders.json", _MODEL_FILE[fmt]):
            if not (p / f).is_file():
                raise CheckpointError(f"{p}: export folder lacks {f}")
        try:
            schema = Schema.from_json((p / "schema.json").read_text())
        except (ConfigError, ValueError) as e:
            raise CheckpointError(f"{p / 'schema.json'}: {e}") from None
        if man.get("schema_fingerprint") != schema.fingerprint():
            raise CheckpointError(f"{man_path}: the model was exported for another schema")
        pre = Preprocessor.from_json(
            schema, (p / "encoders.json").read_text(), source=str(p / "encoders.json")
        )
        names = [i["name"] for i in man["inputs"]]
        outs = [o["name"] for o in man["outputs"]]
        if names != input_names(schema):
            raise CheckpointError(f"{man_path}: inputs {names} do not match the schema")
        if outs != output_names(schema):
            raise CheckpointError(f"{man_path}: outputs {outs} do not match the schema's tasks")
        fusion = None
        if man.get("fusion"):
            fusion = load_fusion_file(p / man["fusion"]["file"], schema)
        runner = model_runner(fmt, p / _MODEL_FILE[fmt], names, outs)
        return cls(p, man, schema, pre, names, outs, runner, fusion)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.schema.primary_task_names

    def score_features(self, features: Features) -> dict[str, np.ndarray]:
        """Predictions of encoded features, output name -> ``[B]`` (or ``[B, C]``)."""
        arrays = [t.numpy() for t in features_to_inputs(features, self.schema)]
        out = dict(zip(self.outputs, self.run_model(arrays), strict=True))
        if self.fusion is not None:
            out[SCORE_OUTPUT] = np.asarray(self.fusion(out), dtype=np.float64)
        return out

    def score_raw(self, rows: Sequence[Mapping[str, Any]] | Any) -> dict[str, np.ndarray]:
        """Encode raw feature values with the run's encoders and score them.

        Values are read with the run's rule for missing values (its null tokens, saved in
        ``encoders.json``; :mod:`mtlrec.data.columns`), as in training.

        Args:
            rows: a list of ``{column: value}`` dicts, or a pyarrow table, a pandas DataFrame
                or a dict of column arrays, with the schema's feature columns (unknown
                categories map to the OOV id; counts in :attr:`last_unknown`).

        Returns:
            output name (task, and ``score`` if fused) -> ``[N]`` (``[N, C]`` multiclass).

        Raises:
            DataError: a column is missing or a value does not fit the schema.
        """
        if isinstance(rows, list | tuple):
            table = pa.Table.from_pylist(list(rows))
        else:
            table = as_table(rows)
        if table.num_rows == 0:
            raise DataError("no rows to score")
        ds = self.preprocessor.encode(table, file="<rows>", targets=False)
        self.last_unknown = dict(ds.unknown_counts)
        return self.score_features(ds.features_at(slice(0, len(ds))))
