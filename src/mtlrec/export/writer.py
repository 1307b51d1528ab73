"""``export_run``: a run folder to an export folder, checked against the eager model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.export.common import (
    _MODEL_FILE,
    EXPORT_FORMAT,
    FORMATS,
    PARITY_TOLERANCE,
    SCORE_OUTPUT,
    ExportError,
    load_fusion_file,
)
from mtlrec.export.graph import (
    TensorModel,
    _export_onnx,
    _export_torchscript,
    features_to_inputs,
    input_names,
    output_names,
)
from mtlrec.export.loaded import model_runner
from mtlrec.schema import Schema
from mtlrec.utils.atomic import write_text


def sample_features(run: Any, rows: int = 256) -> Features:
    """Encoded features of the first ``rows`` rows of the run's own data (for parity checks).

    Args:
        run: a :class:`mtlrec.train.run.LoadedRun`.
    """
    from mtlrec.data.file_encoding import record_batches
    from mtlrec.data.loading import BUILTIN

    cfg = run.config
    d = cfg.data
    if d.dataset is not None:
        table = BUILTIN[d.dataset].load(d.options)[0].slice(0, rows)
        name = d.dataset
    else:
        name = d.test or d.valid or d.train
        assert name is not None
        path = cfg.resolve_path(name)
        table = next(
            iter(
                record_batches(
                    path, run.schema.input_columns(), delimiter=d.delimiter, batch_rows=rows
                )
            )
        )
        table = table.slice(0, rows)
    ds = run.preprocessor.encode(table, file=name, targets=False)
    return ds.features_at(slice(0, len(ds)))


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    parity_rows: int
    outputs: list[str]


def export_run(
    run: str | Path,
    output: str | Path,
    *,
    format: str = "onnx",
    fusion: str | Path | None = None,
    parity_rows: int = 256,
    tolerance: float = PARITY_TOLERANCE,
) -> ExportResult:
    """Export a run folder; check the export against the eager model on the run's rows.

    Raises:
        CheckpointError: ``run`` is not a usable run folder.
        ConfigError: unknown format, missing extra, bad fusion file.
        ExportError: the exporter failed, or the parity difference exceeds ``tolerance``.
    """
    from mtlrec.train.run import load_run

    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: expected one of {list(FORMATS)}")
    loaded = load_run(run)
    schema = loaded.schema
    fuse = load_fusion_file(fusion, schema) if fusion is not None else None
    torch.manual_seed(0)
    wrapper = TensorModel(loaded.model, schema).eval()
    feats = sample_features(loaded, parity_rows)
    example = features_to_inputs(feats, schema)
    names = input_names(schema)
    outs = output_names(schema)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the folder is incomplete until the end
    model_path = out / _MODEL_FILE[format]
    if format == "onnx":
        _export_onnx(wrapper, example, names, outs, model_path)
    else:
        _export_torchscript(wrapper, example, model_path)
    for f in ("schema.json", "encoders.json"):
        write_text(out / f, (loaded.path / f).read_text())
    if fusion is not None:
        write_text(out / "fusion.json", Path(fusion).read_text(encoding="utf-8"))
    else:
        (out / "fusion.json").unlink(missing_ok=True)
    runner = model_runner(format, model_path, names, outs)
    diff = 0.0
    n = len(feats)
    # the whole sample, then a single row and an odd-sized slice: the batch size is dynamic
    for rows in dict.fromkeys((n, 1, min(37, n))):
        part = [t[:rows] for t in example]
        with torch.inference_mode():
            eager = [o.numpy() for o in wrapper(*part)]
        got = runner([t.numpy() for t in part])
        for name, a, b in zip(outs, eager, got, strict=True):
            if a.shape != b.shape:
                raise ExportError(
                    f"{model_path}: output {name!r} has shape {list(b.shape)} for a batch of "
                    f"{rows}, expected {list(a.shape)} (the export did not keep the batch "
                    "size dynamic)"
                )
            diff = max(diff, float(np.max(np.abs(a - b), initial=0.0)))
    if not diff <= tolerance:  # also catches NaN
        raise ExportError(
            f"{model_path}: the export differs from the eager model by {diff:.3g} on "
            f"{n} rows (tolerance {tolerance:g}); the folder has no manifest and must "
            "not be used"
        )
    if fuse is not None:  # the fusion must accept the model's predictions
        fuse(dict(zip(outs, got, strict=True)))
    manifest = _manifest(loaded, format, names, outs, example, fuse is not None, diff, n)
    write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return ExportResult(out, format, diff, n, outs + ([SCORE_OUTPUT] if fuse is not None else []))


def _manifest(
    loaded: Any,
    format: str,
    names: list[str],
    outs: list[str],
    example: list[Tensor],
    fused: bool,
    diff: float,
    rows: int,
) -> dict[str, Any]:
    import mtlrec

    versions = {"mtlrec": mtlrec.__version__, "torch": torch.__version__}
    if format == "onnx":
        import onnx
        import onnxruntime

        versions |= {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    schema: Schema = loaded.schema
    return {
        "export_format": EXPORT_FORMAT,
        "format": format,
        "model_file": _MODEL_FILE[format],
        "model": loaded.model_name,
        "run": loaded.path.name,
        "schema_fingerprint": schema.fingerprint(),
        "inputs": [
            {
                "name": n,
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": ["batch", t.shape[1]],
            }
            for n, t in zip(names, example, strict=True)
        ],
        "outputs": [
            {
                "name": n,
                "kind": schema.task(n).kind,
                "shape": ["batch", schema.task(n).output_dim]
                if schema.task(n).kind == "multiclass"
                else ["batch"],
            }
            for n in outs
        ],
        "tasks": list(schema.primary_task_names),  # auxiliary tasks are not exported
        "fusion": {"file": "fusion.json", "output": SCORE_OUTPUT} if fused else None,
        "parity": {"rows": rows, "max_abs_diff": diff},
        "versions": versions,
    }
