"""The exported network: plain tensors in, named per-task outputs; ONNX and TorchScript writers."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from mtlrec.batch import Features
from mtlrec.errors import ConfigError
from mtlrec.export.common import ExportError
from mtlrec.models.base import MultiTaskModel
from mtlrec.schema import DenseFeature, Schema, SequenceFeature, SparseFeature, TaskSpec
from mtlrec.utils.atomic import atomic_path


def _scored(schema: Schema) -> tuple[list, list, list]:
    """The sparse, dense and sequence features an exported model reads: the bias features
    (``role: bias``) are not inputs (the model never reads them outside training)."""
    keep = [f for f in schema.features if f.role != "bias"]
    kinds = (SparseFeature, DenseFeature, SequenceFeature)
    sparse, dense, seqs = ([f for f in keep if type(f) is k] for k in kinds)
    return sparse, dense, seqs


def input_names(schema: Schema) -> list[str]:
    """Names of the exported model's inputs, in order."""
    sparse, dense, seqs = _scored(schema)
    names = []
    if sparse:
        names.append("sparse")
    if dense:
        names.append("dense")
    names += [f"seq_{f.name}" for f in seqs]
    return names


def output_names(schema: Schema) -> list[str]:
    """Names of the exported model's outputs (the tasks but the auxiliary ones), in order."""
    return list(schema.primary_task_names)


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
        self.tasks: tuple[TaskSpec, ...] = schema.primary_tasks
        sparse, dense, seqs = _scored(schema)
        self.sparse_names = tuple(f.name for f in sparse)
        self.dense_names = tuple(f.name for f in dense)
        self.seq_names = tuple(f.name for f in seqs)
        self.has_sparse = bool(sparse)
        self.has_dense = bool(dense)

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
    """The exported model's input tensors for a batch of encoded features (their bias
    columns, if any, left out)."""
    sparse, dense, seqs = _scored(schema)
    out: list[Tensor] = []
    if sparse:
        x = features.sparse
        if len(sparse) != x.shape[1]:  # [B, F] with the bias columns: [B, F - F_bias]
            x = x[:, [features.sparse_names.index(f.name) for f in sparse]]
        out.append(x.to(torch.int32).contiguous())
    if dense:
        x = features.dense
        if len(dense) != x.shape[1]:
            x = x[:, [features.dense_names.index(f.name) for f in dense]]
        out.append(x.to(torch.float32).contiguous())
    out += [features.sequences[f.name].to(torch.int32).contiguous() for f in seqs]
    return out


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
