"""Labels, sample-space masks and sample weights, checked row by row (vectorised)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mtlrec.data.columns import first_row, to_float
from mtlrec.errors import DataError
from mtlrec.schema import Schema, TaskSpec


def encode_mask(table: pa.Table, task: TaskSpec, file: str) -> np.ndarray:
    """The task's sample space as a bool vector (missing mask values count as false)."""
    if task.mask is None:
        return np.ones(table.num_rows, dtype=bool)
    m = to_float(table.column(task.mask), file=file, column=task.mask)
    return np.nan_to_num(m, nan=0.0) != 0.0


def encode_label(table: pa.Table, task: TaskSpec, mask: np.ndarray, file: str) -> np.ndarray:
    """Label values (0 outside the mask), validated inside the mask."""
    col = task.label_column
    y = to_float(table.column(col), file=file, column=col)
    missing = np.isnan(y) & mask
    if missing.any():
        raise DataError(
            f"label of task {task.name!r} is missing on a row inside the task's sample space"
            + (f" (mask column {task.mask!r})" if task.mask else ""),
            file=file,
            column=col,
            row=first_row(missing),
        )
    if task.kind == "binary":
        bad = mask & (y != 0.0) & (y != 1.0)
        if bad.any():
            raise DataError(
                f"binary task {task.name!r} expects labels 0 or 1, found {float(y[bad][0])!r}",
                file=file,
                column=col,
                row=first_row(bad),
            )
    elif task.kind == "multiclass":
        c = task.num_classes or 0
        bad = mask & ((y != np.floor(y)) | (y < 0) | (y >= c))
        if bad.any():
            raise DataError(
                f"multiclass task {task.name!r} expects integer labels in [0, {c}), "
                f"found {float(y[bad][0])!r}",
                file=file,
                column=col,
                row=first_row(bad),
            )
    else:
        bad = mask & np.isinf(y)
        if bad.any():
            raise DataError(
                f"regression task {task.name!r} expects finite labels",
                file=file,
                column=col,
                row=first_row(bad),
            )
    return np.where(mask, y, 0.0).astype(np.float32)


def encode_weight(
    table: pa.Table, task: TaskSpec, mask: np.ndarray, file: str, labels: np.ndarray | None = None
) -> np.ndarray:
    """Sample weights inside the mask (0 outside): the weight column's values (1 without one),
    times the weight expression's, times ``negative_weight`` on negative rows (binary ``labels``
    given)."""
    if task.weight is None and task.weight_expr is None and task.negative_weight is None:
        return mask.astype(np.float32)
    w = (
        np.ones(table.num_rows)
        if task.weight is None
        else to_float(table.column(task.weight), file=file, column=task.weight)
    )
    if task.weight_expr is not None:
        from mtlrec.data.expressions import evaluate_expression

        e = evaluate_expression(task.weight_expr, table, file=file)
        bad = mask & ~np.isfinite(e)
        if bad.any():
            raise DataError(
                f"weight expression {task.weight_expr!r} of task {task.name!r} is not finite",
                file=file,
                row=first_row(bad),
            )
        bad = mask & (e < 0)
        if bad.any():
            raise DataError(
                f"weight expression {task.weight_expr!r} of task {task.name!r} must be >= 0, "
                f"found {float(e[bad][0])!r}",
                file=file,
                row=first_row(bad),
            )
        w = w * e
    if task.negative_weight is not None and labels is not None:
        w = np.where(labels == 0, w * task.negative_weight, w)
    bad = mask & ~np.isfinite(w)
    if bad.any():
        raise DataError(
            f"sample weight of task {task.name!r} is missing or not finite",
            file=file,
            column=task.weight,
            row=first_row(bad),
        )
    bad = mask & (w < 0)
    if bad.any():
        raise DataError(
            f"sample weights must be >= 0, found {float(w[bad][0])!r}",
            file=file,
            column=task.weight,
            row=first_row(bad),
        )
    return np.where(mask, w, 0.0).astype(np.float32)


def encode_targets(
    table: pa.Table, schema: Schema, file: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels ``[N, T]`` float32, masks ``[N, T]`` bool, weights ``[N, T]`` float32."""
    n, t = table.num_rows, len(schema.tasks)
    labels = np.zeros((n, t), dtype=np.float32)
    masks = np.zeros((n, t), dtype=bool)
    weights = np.zeros((n, t), dtype=np.float32)
    for j, task in enumerate(schema.tasks):
        m = encode_mask(table, task, file)
        masks[:, j] = m
        labels[:, j] = encode_label(table, task, m, file)
        weights[:, j] = encode_weight(table, task, m, file, labels[:, j])
    return labels, masks, weights
