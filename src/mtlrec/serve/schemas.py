"""Request and response models of the scoring service, generated from a run's schema.

Every constraint lives in the types (so the OpenAPI document says exactly what is accepted):
categorical values are strings or JSON integers (``66.0`` counts as an integer, booleans do
not), dense values finite numbers in a declared range (``> -1`` for ``log1p`` features),
sequences lists of categorical values; ``null`` is a missing value (OOV id, the feature's
fill value, an empty sequence), and so is a categorical string (or sequence element) that is
empty or one of the run's null tokens (``data.null_values``, saved in ``encoders.json``:
``"NA"`` by default), exactly as in the files the model was trained on
(:mod:`mtlrec.data.columns`). Unknown fields are refused.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    create_model,
)

from mtlrec.schema import DenseFeature, Schema, SequenceFeature

DENSE_LIMIT = 1e9
"""Largest magnitude accepted for a dense value (keeps every activation finite in float32)."""
MAX_CATEGORY_CHARS = 1024
MAX_SEQUENCE_ITEMS = 10_000


def _json_integer(v: Any) -> Any:
    """JSON Schema's "integer": ``66.0`` is one (JSON does not tell 66 from 66.0)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2.0**53:
        return int(v)
    return v


CategoryStr = Annotated[StrictStr, Field(max_length=MAX_CATEGORY_CHARS)]
CategoryValue = CategoryStr | Annotated[StrictInt, BeforeValidator(_json_integer)]


def _dense_type(f: DenseFeature) -> Any:
    lower = (
        Field(gt=-1.0, le=DENSE_LIMIT)
        if f.transform.startswith("log1p")
        else Field(ge=-DENSE_LIMIT, le=DENSE_LIMIT)
    )
    # Field first: constraints then appear in the JSON schema as minimum / maximum
    return Annotated[float, lower, Field(strict=True, allow_inf_nan=False)] | None


def feature_type(f: Any) -> Any:
    """The pydantic type of one feature's raw value."""
    if isinstance(f, DenseFeature):
        return _dense_type(f)
    if isinstance(f, SequenceFeature):
        return Annotated[list[CategoryValue], Field(max_length=MAX_SEQUENCE_ITEMS)] | None
    return CategoryValue | None


def _description(f: Any) -> str:
    if isinstance(f, DenseFeature):
        return f"dense feature {f.name!r} (number; null -> fill value {f.fill_value})"
    if isinstance(f, SequenceFeature):
        return f"sequence feature {f.name!r} (list of ids, most recent last; null -> empty)"
    return (
        f"categorical feature {f.name!r} (string or integer; null, a null token or unseen -> OOV)"
    )


def _row_model(name: str, schema: Schema, columns: list[str], required: bool) -> type[BaseModel]:
    by_source = {f.source: f for f in schema.features}
    fields: dict[str, Any] = {}
    for col in columns:
        f = by_source[col]
        default = ... if required else None
        fields[col] = (feature_type(f), Field(default, description=_description(f)))
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


def request_models(
    schema: Schema,
    *,
    context_features: list[str] | None,
    max_candidates: int,
    fused: bool,
) -> tuple[type[BaseModel], type[BaseModel], type[BaseModel]]:
    """``(ScoreRequest, Context, Candidate)`` for a schema.

    Args:
        schema: the run's schema (feature columns are the field names).
        context_features: columns given once per request (user, history...); the others are
            given per candidate, all required. ``None``: any column may be given in either
            place (a candidate's value wins); a column given in neither is refused.
        max_candidates: the most candidates one request may hold.
        fused: whether a fusion is loaded (``sort_by='score'`` allowed).
    """
    columns = schema.scoring_columns()  # bias features (role: bias) are not asked for
    if context_features is None:
        context = _row_model("Context", schema, columns, required=False)
        candidate = _row_model("Candidate", schema, columns, required=False)
    else:
        ctx = [c for c in columns if c in context_features]
        context = _row_model("Context", schema, ctx, required=True)
        candidate = _row_model(
            "Candidate", schema, [c for c in columns if c not in context_features], required=True
        )
    keys = [t.name for t in schema.primary_tasks if t.kind != "multiclass"]
    if fused:
        keys = ["score", *keys]
    sort_by = Enum("SortBy", {k: k for k in keys}, type=str)  # type: ignore[misc]
    request = create_model(
        "ScoreRequest",
        __config__=ConfigDict(extra="forbid"),
        context=(
            context,
            Field(description="feature values shared by all candidates")
            if context_features
            else Field(default_factory=context, description="values shared by all candidates"),
        ),
        candidates=(
            list[candidate],  # type: ignore[valid-type]
            Field(min_length=1, max_length=max_candidates, description="the items to score"),
        ),
        sort_by=(
            sort_by | None,
            Field(
                default=None,
                description="order the results by this output, highest first "
                "(default: the candidates' order)",
            ),
        ),
    )
    return request, context, candidate


class CandidateResult(BaseModel):
    index: int = Field(description="position of the candidate in the request")
    predictions: dict[str, float | list[float]] = Field(
        description="per task: probability (binary), value (regression), class probabilities"
    )
    score: float | None = Field(default=None, description="the fused score, if a fusion is set")


class ScoreResponse(BaseModel):
    model: str
    tasks: list[str]
    results: list[CandidateResult]
    unknown: dict[str, int] = Field(
        description="values of this request mapped to the OOV id (unseen categories), by feature"
    )


class Health(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    detail: Any
