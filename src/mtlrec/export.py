"""Export a trained run to ONNX or TorchScript, with its encoders, and score raw rows with it.

An export folder holds everything needed to score raw feature values without mtlrec's model
code::

    OUT/model.onnx | model.pt      the network: plain tensors in, named per-task outputs
    OUT/schema.json                features and tasks (copied from the run)
    OUT/encoders.json              fitted vocabularies and dense statistics (copied)
    OUT/fusion.json                the fusion file, if one was given (copied)
    OUT/manifest.json              format, input/output names and dtypes, tasks, versions

Inputs (only the groups the schema has): ``sparse`` ``[B, F_sparse]`` int32 ids (schema
order), ``dense`` ``[B, F_dense]`` float32 encoded values, ``seq_<name>`` ``[B, L]`` int32 padded
ids. Outputs: one per task, named by the task: the probability (binary), the value
(regression) or the class probabilities ``[B, C]`` (multiclass). The batch size is dynamic.
The fusion formulas of :mod:`mtlrec.fusion` run on numpy after the network (rank transforms,
calibration, LightGBM are not graph ops), so the fused score ``score`` is added by
:class:`ExportedModel` (and the server) from the copied ``fusion.json``.

The manifest is written last, so a folder without one is an interrupted export.

Example:
    >>> from mtlrec.export import ExportedModel  # doctest: +SKIP
    >>> m = ExportedModel.load("exports/mmoe")  # doctest: +SKIP
    >>> m.score_raw([{"user": "u1", "item": "i3", "price": 2.5, "hist": "i1|i2"}])  # doctest: +SKIP
    {'click': array([0.71], dtype=float32), 'watch': array([0.62], dtype=float32)}
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import CheckpointError, ConfigError, DataError, MtlrecError
from mtlrec.models.base import MultiTaskModel
from mtlrec.schema import Schema, TaskSpec
from mtlrec.utils.atomic import atomic_path, write_text

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
    return load_fusion(path, tasks=schema.task_names)


def input_names(schema: Schema) -> list[str]:
    """Names of the exported model's inputs, in order."""
    names = []
    if schema.sparse:
        names.append("sparse")
    if schema.dense:
        names.append("dense")
    names += [f"seq_{f.name}" for f in schema.sequences]
    return names


def output_names(schema: Schema) -> list[str]:
    """Names of the exported model's outputs (the tasks), in order."""
    return list(schema.task_names)


class TensorModel(nn.Module):
    """A model taking plain tensors (see the module doc) and returning a tuple of per-task
    predictions: the form ONNX and TorchScript export.

    Args:
        model: a trained model (put in eval mode).
        schema: the run's schema (feature order, tasks).
    """

    def __init__(self, model: MultiTaskModel, schema: Schema) -> None:
        super().__init__()
        self.model = model.eval()
        self.tasks: tuple[TaskSpec, ...] = schema.tasks
        self.sparse_names = tuple(f.name for f in schema.sparse)
        self.dense_names = tuple(f.name for f in schema.dense)
        self.seq_names = tuple(f.name for f in schema.sequences)
        self.has_sparse = bool(schema.sparse)
        self.has_dense = bool(schema.dense)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        i = 0
        ref = inputs[0]  # any input gives the batch size
        if self.has_sparse:
            sparse = inputs[i]
            i += 1
        else:
            sparse = torch.zeros((ref.shape[0], 0), dtype=torch.int32)
        if self.has_dense:
            dense = inputs[i]
            i += 1
        else:
            dense = torch.zeros((ref.shape[0], 0), dtype=torch.float32)
        seqs = {name: inputs[i + k] for k, name in enumerate(self.seq_names)}
        feats = Features(sparse, dense, seqs, self.sparse_names, self.dense_names)
        preds = self.model(feats).predictions(self.tasks)
        return tuple(preds[t.name] for t in self.tasks)


def features_to_inputs(features: Features, schema: Schema) -> list[Tensor]:
    """The exported model's input tensors for a batch of encoded features."""
    out: list[Tensor] = []
    if schema.sparse:
        out.append(features.sparse.to(torch.int32).contiguous())
    if schema.dense:
        out.append(features.dense.to(torch.float32).contiguous())
    out += [features.sequences[f.name].to(torch.int32).contiguous() for f in schema.sequences]
    return out


def sample_features(run: Any, rows: int = 256) -> Features:
    """Encoded features of the first ``rows`` rows of the run's own data (for parity checks).

    Args:
        run: a :class:`mtlrec.train.run.LoadedRun`.
    """
    from mtlrec.data.sources import BUILTIN
    from mtlrec.data.stream import record_batches

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


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' progress lines and warnings (deprecations, tracer warnings,
    torchvision notes) for the duration of an export."""
    loggers = [
        logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _summary(e: BaseException) -> str:
    """The exporter's own one-line reason (its messages run over many lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("## Exception summary") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[0] if lines else type(e).__name__


def _export_onnx(
    wrapper: TensorModel, example: list[Tensor], names: list[str], outs: list[str], path: Path
) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"ONNX export needs the 'export' extra (pip install 'mtlrec[export]'): {e}"
        ) from None
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1 << 24)
    dynamic = (tuple({0: batch} for _ in example),)  # one entry: the *inputs varargs
    try:
        with _quiet_exporter(), torch.no_grad():
            prog = torch.onnx.export(
                wrapper,
                tuple(example),
                input_names=names,
                output_names=outs,
                dynamic_shapes=dynamic,
                dynamo=True,
                verbose=False,
                optimize=True,
            )
    except Exception as e:  # the exporter raises many kinds; reduce them to one line
        raise ExportError(f"ONNX export failed: {_summary(e)}") from None
    assert prog is not None
    with atomic_path(path) as tmp:
        prog.save(tmp)


def _export_torchscript(wrapper: TensorModel, example: list[Tensor], path: Path) -> None:
    try:
        # no_grad: inference code paths only (no custom autograd Functions in the graph)
        with _quiet_exporter(), torch.no_grad():
            traced = torch.jit.trace(wrapper, tuple(example), check_trace=False, strict=False)
        with atomic_path(path) as tmp, _quiet_exporter():
            torch.jit.save(traced, tmp)
    except Exception as e:
        raise ExportError(f"TorchScript export failed: {_summary(e)}") from None


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
    runner = _runner(format, model_path, names, outs)
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
        "tasks": list(schema.task_names),
        "fusion": {"file": "fusion.json", "output": SCORE_OUTPUT} if fused else None,
        "parity": {"rows": rows, "max_abs_diff": diff},
        "versions": versions,
    }


def _runner(
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
        runner = _runner(fmt, p / _MODEL_FILE[fmt], names, outs)
        return cls(p, man, schema, pre, names, outs, runner, fusion)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.schema.task_names

    def score_features(self, features: Features) -> dict[str, np.ndarray]:
        """Predictions of encoded features, output name -> ``[B]`` (or ``[B, C]``)."""
        arrays = [t.numpy() for t in features_to_inputs(features, self.schema)]
        out = dict(zip(self.outputs, self.run_model(arrays), strict=True))
        if self.fusion is not None:
            out[SCORE_OUTPUT] = np.asarray(self.fusion(out), dtype=np.float64)
        return out

    def score_raw(self, rows: Sequence[Mapping[str, Any]] | pa.Table) -> dict[str, np.ndarray]:
        """Encode raw feature values with the run's encoders and score them.

        Args:
            rows: a list of ``{column: value}`` dicts or a pyarrow table with the schema's
                feature columns (unknown categories map to the OOV id; counts in
                :attr:`last_unknown`).

        Returns:
            output name (task, and ``score`` if fused) -> ``[N]`` (``[N, C]`` multiclass).

        Raises:
            DataError: a column is missing or a value does not fit the schema.
        """
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
        if table.num_rows == 0:
            raise DataError("no rows to score")
        ds = self.preprocessor.encode(table, file="<rows>", targets=False)
        self.last_unknown = dict(ds.unknown_counts)
        return self.score_features(ds.features_at(slice(0, len(ds))))
