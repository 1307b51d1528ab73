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

The package: :mod:`~mtlrec.export.graph` (the tensor-in / tensor-out network and its ONNX and
TorchScript writers), :mod:`~mtlrec.export.writer` (:func:`export_run`: a run folder to an
export folder, with the parity check), :mod:`~mtlrec.export.loaded` (:class:`ExportedModel`:
an export folder loaded for scoring) and :mod:`~mtlrec.export.common` (constants, errors).
"""

from __future__ import annotations

from mtlrec.export.common import (
    EXPORT_FORMAT,
    FORMATS,
    PARITY_TOLERANCE,
    SCORE_OUTPUT,
    ExportError,
    Fusion,
    load_fusion_file,
)
from mtlrec.export.graph import TensorModel, features_to_inputs, input_names, output_names
from mtlrec.export.loaded import ExportedModel
from mtlrec.export.writer import ExportResult, export_run, sample_features

__all__ = [
    "EXPORT_FORMAT",
    "FORMATS",
    "PARITY_TOLERANCE",
    "SCORE_OUTPUT",
    "ExportError",
    "ExportResult",
    "ExportedModel",
    "Fusion",
    "TensorModel",
    "export_run",
    "features_to_inputs",
    "input_names",
    "load_fusion_file",
    "output_names",
    "sample_features",
]
