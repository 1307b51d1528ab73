"""Scoring backends of the service: raw columns in, per-task predictions (and fused score) out.

A :class:`Scorer` encodes one batch with the run's :class:`~mtlrec.data.preprocess.Preprocessor`
(one pyarrow column per feature, built once per request, read with the run's rule for missing
values: :mod:`mtlrec.data.columns`) and runs either the eager PyTorch model
of a run folder (``inference_mode``) or an exported model (onnxruntime / TorchScript).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mtlrec.batch import Features
from mtlrec.data.columns import to_missing
from mtlrec.data.encoders import sequence_ids
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import CheckpointError, ConfigError
from mtlrec.export import SCORE_OUTPUT, ExportedModel, Fusion, load_fusion_file
from mtlrec.schema import DenseFeature, Schema, SequenceFeature


def column_type(f: Any) -> pa.DataType:
    """The pyarrow type a feature's request values are built as."""
    if isinstance(f, DenseFeature):
        return pa.float64()
    if isinstance(f, SequenceFeature):
        return pa.list_(pa.string())
    return pa.string()


@dataclass
class Scorer:
    """A loaded model, its encoders and its optional fusion.

    Args:
        schema: features and tasks.
        preprocessor: the run's fitted encoders.
        predict: encoded features -> task -> ``[N]`` / ``[N, C]`` numpy predictions.
        model_name: the registered model's name.
        backend: ``torch`` (eager) or the export's format.
        fusion: optional fusion (adds ``score``).
        source: the folder it was loaded from.
    """

    schema: Schema
    preprocessor: Preprocessor
    predict: Any = field(repr=False)
    model_name: str
    backend: str
    fusion: Fusion | None = None
    source: str = ""
    unknown_total: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(
        cls, path: str | Path, *, fusion: str | Path | None = None, precision: str = "fp32"
    ) -> Scorer:
        """A run folder (eager PyTorch, weights from safetensors) or an export folder (with a
        ``manifest.json``: onnxruntime or TorchScript). ``precision`` bf16 (a run folder only)
        scores under autocast once :func:`~mtlrec.train.precision_check.require_precision`
        allows it."""
        p = Path(path)
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {precision!r}")
        if precision != "fp32" and (p / "manifest.json").is_file():
            raise ConfigError(
                f"--precision {precision} is for a run folder; an export runs in fp32 (ONNX "
                "Runtime's CPU provider has no bf16 Gemm)"
            )
        if (p / "manifest.json").is_file():
            exported = ExportedModel.load(p)
            fuse = (
                load_fusion_file(fusion, exported.schema) if fusion is not None else exported.fusion
            )
            exported.fusion = None  # fused here, after the model

            def run_export(features: Features) -> dict[str, np.ndarray]:
                return exported.score_features(features)

            return cls(
                exported.schema,
                exported.preprocessor,
                run_export,
                str(exported.manifest.get("model", "?")),
                str(exported.manifest["format"]),
                fuse,
                str(p),
            )
        from mtlrec.train.run import load_run

        if not p.is_dir():
            raise CheckpointError(f"{p}: no such run or export folder")
        run = load_run(p)
        model = run.model.eval()
        tasks = run.schema.primary_tasks  # auxiliary tasks are not served
        from mtlrec.train.step import forward  # the one autocast of a forward pass

        if precision != "fp32":
            from mtlrec.train.precision_check import require_precision

            require_precision(run, precision)

        def run_eager(features: Features) -> dict[str, np.ndarray]:
            with torch.inference_mode():
                preds = forward(model, features, None, precision).predictions(tasks)
            return {k: v.numpy() for k, v in preds.items()}

        fuse = load_fusion_file(fusion, run.schema) if fusion is not None else None
        return cls(run.schema, run.preprocessor, run_eager, run.model_name, "torch", fuse, str(p))

    def __post_init__(self) -> None:
        for table in self.preprocessor.tables.values():
            table.prepare()  # lookup structures built before the first request

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.schema.primary_task_names

    def encode_columns(
        self, columns: Mapping[str, list[Any]], n: int
    ) -> tuple[Features, dict[str, int]]:
        """Encode ``n`` rows of raw values, one list per feature column; a list of one value
        is broadcast to all rows (encoded once: the context of a request).

        This is :meth:`Preprocessor.encode` feature by feature (the same encoders), so that
        a context value is looked up once instead of once per candidate.

        Raises:
            DataError: a value does not fit the schema (``column`` names the feature).
        """
        s, pre = self.schema, self.preprocessor
        by_source = {f.source: f for f in s.features}
        # bias features (role: bias) are never needed to score: missing unless given
        columns = {**{f.source: [None] for f in s.bias_features}, **columns}
        # the run's rule for missing values (null tokens), as for files: a request's "NA" is
        # what a CSV or Parquet file's "NA" is
        arrays = {
            c: to_missing(pa.array(v, type=column_type(by_source[c])), pre.null_values)
            for c, v in columns.items()
        }
        unknown: dict[str, int] = {}
        sparse = np.empty((n, len(s.sparse)), dtype=np.int32)
        for j, f in enumerate(s.sparse):
            ids, unk = pre.tables[f.table_name].lookup_column(
                arrays[f.source], file="request", column=f.source
            )
            sparse[:, j] = ids  # [n] or [1] broadcast
            unknown[f.name] = int(np.sum(unk))
        dense = np.empty((n, len(s.dense)), dtype=np.float32)
        for j, fd in enumerate(s.dense):
            dense[:, j] = pre.dense[fd.name].encode(
                arrays[fd.source], file="request", name=fd.source
            )
        seqs: dict[str, torch.Tensor] = {}
        for fs in s.sequences:
            ids2, unk = sequence_ids(
                pre.tables[fs.table_name], fs, arrays[fs.source], pre.null_values, file="request"
            )
            if ids2.shape[0] != n:  # one context value
                ids2 = np.repeat(ids2, n, axis=0)  # [n, L]
            seqs[fs.name] = torch.from_numpy(ids2)
            unknown[fs.name] = int(np.sum(unk))
        feats = Features(
            torch.from_numpy(sparse),
            torch.from_numpy(dense),
            seqs,
            tuple(f.name for f in s.sparse),
            tuple(f.name for f in s.dense),
        )
        return feats, {k: v for k, v in unknown.items() if v}

    def score_columns(
        self, columns: Mapping[str, list[Any]], n: int
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Score ``n`` rows given as one list of raw values per feature column (a list of
        one value is broadcast).

        Returns:
            ``(outputs, unknown)``: task (and ``score``) -> ``[n]`` / ``[n, C]``, and the count
            of values mapped to the OOV id by feature (a broadcast value counts once).

        Raises:
            DataError: a value does not fit the schema (e.g. log1p of a value <= -1).
        """
        features, unknown = self.encode_columns(columns, n)
        outputs = self.predict(features)
        if self.fusion is not None:
            outputs[SCORE_OUTPUT] = np.asarray(self.fusion(outputs), dtype=np.float64)
        with self._lock:
            self.requests += 1
            for k, v in unknown.items():
                self.unknown_total[k] = self.unknown_total.get(k, 0) + v
        return outputs, unknown
