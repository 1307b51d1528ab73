"""Sample reweighting: weight expressions, down-weighted negatives, focal loss (issue 4)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from mtlrec.data.expressions import evaluate_expression, parse_expression
from mtlrec.data.preprocess import Preprocessor
from mtlrec.errors import DataError
from mtlrec.losses import focal_loss_with_logits
from mtlrec.schema import DenseFeature, Schema, TaskSpec


def table() -> pa.Table:
    return pa.table(
        {
            "x": [0.1, 0.2, 0.3, 0.4],
            "click": [1, 0, 1, 0],
            "watch": [10.0, None, 0.0, None],
        }
    )


def schema(**task: object) -> Schema:
    return Schema(
        features=(DenseFeature(name="x", transform="none"),),
        tasks=(TaskSpec(name="click", kind="binary", **task),),  # type: ignore[arg-type]
    )


def weights_of(s: Schema) -> np.ndarray:
    t = table()
    return Preprocessor.fit(s, t).encode(t).weights[:, 0].numpy()  # type: ignore[union-attr]


def test_positive_weight_grows_with_watch_time() -> None:
    w = weights_of(schema(weight_expr="where(click == 1, 1 + log1p(watch), 1)"))
    np.testing.assert_allclose(w, [1 + np.log1p(10.0), 1.0, 1.0, 1.0], rtol=1e-6)


def test_negatives_are_down_weighted() -> None:
    w = weights_of(schema(negative_weight=0.25))
    np.testing.assert_allclose(w, [1.0, 0.25, 1.0, 0.25])


def test_expression_reads_its_columns_and_rejects_code() -> None:
    assert parse_expression("maximum(a, 2) * b ** 2")[1] == ["a", "b"]
    for bad in ("__import__('os')", "a.b", "x if y else z", "[1]", "f(1)", "'s'"):
        with pytest.raises(ValueError):
            parse_expression(bad)
    with pytest.raises(ValidationError):
        TaskSpec(name="t", kind="binary", weight_expr="open('f')")
    with pytest.raises(ValidationError, match="binary tasks only"):
        TaskSpec(name="t", kind="regression", negative_weight=0.5)
    s = schema(weight_expr="1 + watch")
    assert "watch" in s.target_columns()


def test_bad_expression_values_are_data_errors() -> None:
    with pytest.raises(DataError, match="missing column"):
        evaluate_expression("nope + 1", table(), file="f.csv")
    with pytest.raises(DataError, match="must be >= 0"):
        weights_of(schema(weight_expr="x - 1"))
    with pytest.raises(DataError, match="not finite"):
        weights_of(schema(weight_expr="log(x - 0.1)"))


def test_focal_loss_matches_its_formula_and_reduces_to_bce() -> None:
    z = torch.tensor([-2.0, 0.5, 3.0])
    y = torch.tensor([1.0, 0.0, 1.0])
    p = torch.sigmoid(z)
    p_t = torch.where(y == 1, p, 1 - p)
    alpha_t = torch.where(y == 1, torch.tensor(0.25), torch.tensor(0.75))
    expected = -alpha_t * (1 - p_t) ** 2 * torch.log(p_t)
    torch.testing.assert_close(focal_loss_with_logits(z, y, 2.0, 0.25), expected)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    torch.testing.assert_close(focal_loss_with_logits(z, y, 0.0, None), bce)
