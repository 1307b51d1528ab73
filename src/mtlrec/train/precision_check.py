"""Whether a trained run may score in bf16: its task AUCs on the validation split must stay
within :data:`AUC_TOLERANCE` of fp32's.

``mtlrec predict --precision bf16`` and ``mtlrec serve --precision bf16`` (the eager backend)
call :func:`require_precision`: the run's validation split is scored in fp32 and under bf16
autocast, and a task whose AUC moves by more than 0.001 refuses bf16 with one line. The result is
kept in the run folder (``precision_check.json``, keyed by the checkpoint it was measured on), so
a serving machine without the training data can use a check made where the data was.

ONNX exports stay fp32: ONNX Runtime's CPU provider has no bf16 ``Gemm`` kernel (a bf16 graph
fails to load: ``NOT_IMPLEMENTED: Could not find an implementation for Gemm(13)``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtlrec.errors import ConfigError
from mtlrec.utils.atomic import write_text

AUC_TOLERANCE = 1e-3
CHECK_FILE = "precision_check.json"


@dataclass(frozen=True)
class PrecisionCheck:
    """AUC per binary task under fp32 and under ``precision``, on ``rows`` validation rows."""

    precision: str
    rows: int
    auc_fp32: dict[str, float]
    auc_other: dict[str, float]
    checkpoint: str

    @property
    def deltas(self) -> dict[str, float]:
        return {t: abs(self.auc_other[t] - v) for t, v in self.auc_fp32.items()}

    @property
    def ok(self) -> bool:
        return all(d <= AUC_TOLERANCE for d in self.deltas.values())


def _checkpoint_key(run: Any) -> str:
    """Which weights a check was made on: the checkpoint file's name, size and mtime."""
    ckpt = run.path / "checkpoints" / "best.safetensors"
    if not ckpt.is_file():
        ckpt = run.path / "checkpoints" / "last.safetensors"
    st = ckpt.stat()
    return f"{ckpt.name}:{st.st_size}:{st.st_mtime_ns}"


def measure(run: Any, precision: str, data: Any = None) -> PrecisionCheck:
    """Score the run's validation split (or ``data``) in fp32 and in ``precision``.

    Args:
        run: a :class:`~mtlrec.train.run.LoadedRun`.
        precision: ``bf16`` (or ``fp16``).
        data: labelled encoded data (default: the run's validation split).

    Raises:
        ConfigError: no labelled data to measure on, or no binary task.
    """
    from mtlrec.metrics.ranking import auc

    if data is None:
        from mtlrec.data.loading import load_datasets

        try:
            data = load_datasets(run.config, run.preprocessor).get("valid")
        except Exception as e:  # the training files are not here
            raise ConfigError(
                f"--precision {precision}: the check of its task AUCs against fp32 reads the "
                f"run's validation split, which cannot be read here ({str(e).splitlines()[0]}); "
                f"run the same command once where the data is (it writes {CHECK_FILE} into "
                "the run folder)"
            ) from None
    if data is None or not data.has_targets:
        raise ConfigError(f"--precision {precision}: the run has no labelled validation split")
    tasks = [t for t in run.schema.tasks if t.kind == "binary"]
    if not tasks:
        raise ConfigError(f"--precision {precision}: no binary task to compare AUCs on")
    scores = {p: run.trainer(precision=p).predict(data) for p in ("fp32", precision)}
    aucs: dict[str, dict[str, float]] = {"fp32": {}, precision: {}}
    rows = data.take(slice(0, len(data)))
    for t in tasks:
        mask = rows.masks[t.name].numpy()
        labels = rows.labels[t.name].numpy()[mask]
        for p in aucs:
            aucs[p][t.name] = float(auc(np.asarray(scores[p][t.name])[mask], labels))
    return PrecisionCheck(precision, len(data), aucs["fp32"], aucs[precision], _checkpoint_key(run))


def require_precision(run: Any, precision: str) -> PrecisionCheck | None:
    """Allow scoring ``run`` in ``precision`` only when its task AUCs stay within
    :data:`AUC_TOLERANCE` of fp32 (fp32 needs no check). Reuses the run folder's saved check
    when it was made on the same checkpoint, else measures and saves it.

    Raises:
        ConfigError: a task's AUC moves by more than the tolerance, or no check can be made.
    """
    if precision == "fp32":
        return None
    path: Path = run.path / CHECK_FILE
    key = _checkpoint_key(run)
    check = None
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("precision") == precision and saved.get("checkpoint") == key:
                saved.pop("ok", None)
                saved.pop("deltas", None)
                check = PrecisionCheck(**saved)
        except (ValueError, TypeError):
            check = None
    if check is None:
        check = measure(run, precision)
        write_text(
            path,
            json.dumps({**asdict(check), "deltas": check.deltas, "ok": check.ok}, indent=2),
        )
    if not check.ok:
        worst = max(check.deltas, key=lambda t: check.deltas[t])
        raise ConfigError(
            f"--precision {precision}: task {worst!r}'s validation AUC moves by "
            f"{check.deltas[worst]:.4f} ({check.auc_fp32[worst]:.4f} in fp32, "
            f"{check.auc_other[worst]:.4f} in {precision}), more than {AUC_TOLERANCE}; "
            "score this run in fp32"
        )
    return check
