"""Task relationships: label correlation between tasks on their joint sample space.

The correlation of tasks ``i`` and ``j`` is the Pearson correlation of their labels over the
rows inside both tasks' sample spaces (both masks true). For two binary tasks it is the phi
coefficient. Multiclass tasks (a class index has no order) and pairs with fewer than two joint
rows, or a constant label on the joint rows, give ``nan``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mtlrec.data.dataset import ColumnarDataset
from mtlrec.errors import DataError


def label_correlation(data: ColumnarDataset) -> dict[str, Any]:
    """Pairwise label correlation of the tasks of a labelled data set.

    Returns:
        ``{"tasks": [T names], "correlation": T x T (nan where undefined),
        "rows": T x T joint row counts}``.
    """
    if data.labels is None:
        raise DataError(f"{data.source}: no label columns, cannot correlate tasks")
    tasks = data.schema.tasks
    y = data.labels.to(dtype=data.labels.dtype).double().numpy()
    n, t = y.shape
    m = np.ones((n, t), dtype=bool) if data.masks is None else data.masks.numpy().astype(bool)
    m = m & np.isfinite(y)
    corr = np.full((t, t), math.nan)
    rows = np.zeros((t, t), dtype=np.int64)
    for i in range(t):
        for j in range(t):
            joint = m[:, i] & m[:, j]
            rows[i, j] = int(joint.sum())
            if "multiclass" in (tasks[i].kind, tasks[j].kind) or rows[i, j] < 2:
                continue
            a, b = y[joint, i], y[joint, j]
            sa, sb = a.std(), b.std()
            if sa == 0 or sb == 0:
                continue
            corr[i, j] = float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))
    return {
        "tasks": [x.name for x in tasks],
        "correlation": [[None if math.isnan(v) else float(v) for v in r] for r in corr],
        "rows": rows.tolist(),
    }
