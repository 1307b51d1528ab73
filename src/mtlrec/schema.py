"""Features and tasks: what a data set holds and what a model predicts.

A :class:`Schema` is frozen and round-trips through JSON, so it travels with every checkpoint and
every exported model. Features come in three kinds (categorical ``sparse``, numeric ``dense``,
variable-length id lists ``sequence``); tasks in three (``binary``, ``regression``,
``multiclass``). Each task owns its label column, an optional sample-space mask column (the task's
loss and metrics only see rows where the mask is true) and an optional sample-weight column.

Example:
    >>> from mtlrec.schema import Schema, SparseFeature, DenseFeature, TaskSpec
    >>> s = Schema(
    ...     features=[SparseFeature(name="item"), DenseFeature(name="price", transform="log1p")],
    ...     tasks=[TaskSpec(name="click", kind="binary"),
    ...            TaskSpec(name="watch", kind="regression", mask="click")],
    ... )
    >>> Schema.from_json(s.to_json()) == s
    True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mtlrec.errors import ConfigError

MAX_TABLE_VALUES = 2**31 - 3
"""The most values one embedding table holds: ids are int32 and the values' ids start after
the padding and OOV rows (``2 + n - 1 <= 2**31 - 1``)."""

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_TABLE_ATTRS = ("embedding_dim", "min_count", "max_size", "hash_buckets", "vocab_size")
"""What features sharing an embedding table must agree on."""


class _Feature(BaseModel):
    model_config = _FROZEN

    name: str = Field(min_length=1)
    column: str | None = Field(default=None, description="source column; defaults to the name")
    role: Literal["input", "bias"] = Field(
        default="input",
        description="'bias': a selection-bias feature (position, device...): never in the main "
        "model's input, read only by a bias tower (model option bias_tower) in training, and "
        "not needed to score (prediction, export, serving)",
    )

    @property
    def source(self) -> str:
        """The column this feature is read from."""
        return self.column or self.name


class _Categorical(_Feature):
    embedding_dim: int = Field(default=16, ge=1)
    table: str | None = Field(
        default=None,
        description="embedding table name; features naming the same table share it "
        "(one vocabulary, one set of vectors). Defaults to the feature name.",
    )
    min_count: int = Field(default=1, ge=1, description="values seen fewer times map to OOV")
    max_size: int | None = Field(default=None, ge=1, description="keep only the most frequent")
    hash_buckets: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TABLE_VALUES,
        description="hash values into this many buckets instead of a vocabulary",
    )
    vocab_size: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TABLE_VALUES,
        description="pre-indexed ids: the values are integers in [0, vocab_size), used as they "
        "are (no vocabulary is fitted); out-of-range ids and missing values take the OOV row",
    )

    @model_validator(mode="after")
    def _indexed(self) -> _Categorical:
        if self.vocab_size is not None:
            other = [
                k
                for k, v in (
                    ("hash_buckets", self.hash_buckets is not None),
                    ("min_count", self.min_count != 1),
                    ("max_size", self.max_size is not None),
                )
                if v
            ]
            if other:
                raise ValueError(
                    f"feature {self.name!r}: vocab_size (pre-indexed ids) excludes {other[0]}"
                )
        return self

    @property
    def table_name(self) -> str:
        return self.table or self.name


class SparseFeature(_Categorical):
    """One categorical value per row, embedded as a vector."""

    type: Literal["sparse"] = "sparse"


class SequenceFeature(_Categorical):
    """A variable-length list of ids per row (e.g. clicked-item history).

    In CSV the list is one string with ``separator`` between ids; in Parquet a list column.
    Rows keep the ``max_len`` most recent ids (``truncate='last'``) or the first ones.
    """

    type: Literal["sequence"] = "sequence"
    max_len: int = Field(default=20, ge=1)
    separator: str = Field(default="|", min_length=1)
    truncate: Literal["last", "first"] = "last"
    pooling: Literal["mean", "sum", "max"] = "mean"


class DenseFeature(_Feature):
    """One number per row; missing values take ``fill_value`` before the transform."""

    type: Literal["dense"] = "dense"
    fill_value: float = 0.0
    transform: Literal["none", "standardize", "log1p", "log1p_standardize"] = "none"


Feature = Annotated[SparseFeature | DenseFeature | SequenceFeature, Field(discriminator="type")]

TaskKind = Literal["binary", "regression", "multiclass"]
LossName = Literal["bce", "focal", "mse", "huber", "cross_entropy"]
_DEFAULT_LOSS: dict[str, LossName] = {
    "binary": "bce",
    "regression": "mse",
    "multiclass": "cross_entropy",
}
_ALLOWED_LOSS: dict[str, set[str]] = {
    "binary": {"bce", "focal"},
    "regression": {"mse", "huber"},
    "multiclass": {"cross_entropy"},
}


class TaskSpec(BaseModel):
    """A prediction target.

    Args:
        name: the task's name, the key of its logits, losses and metrics.
        kind: ``binary`` (labels 0/1), ``regression`` or ``multiclass`` (labels 0..C-1).
        label: label column; defaults to ``name``.
        mask: optional column; the task only sees rows where it is true (non-zero). A missing
            mask means every row counts.
        weight: optional sample-weight column (non-negative multipliers on the per-row loss).
        weight_expr: optional sample-weight expression over numeric columns (multiplies
            ``weight``), e.g. ``where(click == 1, 1 + log1p(watch_time), 1)``; see
            :mod:`mtlrec.data.expressions` for what it may contain.
        negative_weight: binary tasks only: multiplier of the weight of negative rows (label 0),
            e.g. 0.1 to down-weight negatives.
        num_classes: number of classes, multiclass only.
        loss: per-row loss; defaults to bce / mse / cross_entropy by kind.
        focal_gamma: focusing parameter of the focal loss (Lin et al., 2017).
        focal_alpha: weight of the positive class in the focal loss (None: no class weight).
        huber_delta: threshold of the Huber loss.
        auxiliary: an auxiliary task: trained (its loss, its metrics), but never exported,
            served or fused, and left out of ``mean/<metric>`` epoch selection (naming it,
            ``training.monitor: <task>/auc``, still works). E.g. a domain label learned
            adversarially (model option ``adversarial_tasks``).
    """

    model_config = _FROZEN

    name: str = Field(min_length=1)
    kind: TaskKind
    label: str | None = None
    mask: str | None = None
    weight: str | None = None
    weight_expr: str | None = None
    negative_weight: float | None = Field(default=None, ge=0)
    num_classes: int | None = Field(default=None, ge=2)
    loss: LossName | None = None
    focal_gamma: float = Field(default=2.0, ge=0)
    focal_alpha: float | None = Field(default=None, gt=0, lt=1)
    huber_delta: float = Field(default=1.0, gt=0)
    auxiliary: bool = Field(
        default=False,
        description="trained, never exported, served, fused or used by mean/<metric> epoch "
        "selection",
    )

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.kind == "multiclass" and self.num_classes is None:
            raise ValueError(f"task {self.name!r}: a multiclass task needs num_classes")
        if self.kind != "multiclass" and self.num_classes is not None:
            raise ValueError(f"task {self.name!r}: num_classes is for multiclass tasks only")
        if self.negative_weight is not None and self.kind != "binary":
            raise ValueError(f"task {self.name!r}: negative_weight is for binary tasks only")
        if self.weight_expr is not None:
            from mtlrec.data.expressions import parse_expression

            parse_expression(self.weight_expr)
        if self.loss is not None and self.loss not in _ALLOWED_LOSS[self.kind]:
            raise ValueError(
                f"task {self.name!r}: loss {self.loss!r} does not fit a {self.kind} task "
                f"(expected one of {sorted(_ALLOWED_LOSS[self.kind])})"
            )
        return self

    @property
    def label_column(self) -> str:
        return self.label or self.name

    @property
    def loss_name(self) -> LossName:
        return self.loss or _DEFAULT_LOSS[self.kind]

    @property
    def output_dim(self) -> int:
        """Width of the task's logit: 1, or the number of classes."""
        return self.num_classes if self.kind == "multiclass" and self.num_classes else 1


class Schema(BaseModel):
    """The features a model reads and the tasks it predicts (frozen, JSON round trip)."""

    model_config = _FROZEN

    features: tuple[Feature, ...] = Field(min_length=1)
    tasks: tuple[TaskSpec, ...] = Field(min_length=1)
    group_column: str | None = Field(
        default=None, description="optional user / request column, kept for grouped metrics"
    )

    @model_validator(mode="after")
    def _check(self) -> Schema:
        names = [f.name for f in self.features]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"feature names must be unique; repeated: {sorted(dup)}")
        tnames = [t.name for t in self.tasks]
        dup = {n for n in tnames if tnames.count(n) > 1}
        if dup:
            raise ValueError(f"task names must be unique; repeated: {sorted(dup)}")
        feature_cols = {f.source: f.name for f in self.features}
        for t in self.tasks:
            if t.label_column in feature_cols:
                raise ValueError(
                    f"task {t.name!r}: label column {t.label_column!r} is also read as feature "
                    f"{feature_cols[t.label_column]!r} (label leakage)"
                )
        tables: dict[str, _Categorical] = {}
        for f in self.features:
            if isinstance(f, _Categorical):
                first = tables.setdefault(f.table_name, f)
                for attr in _TABLE_ATTRS:
                    if getattr(first, attr) != getattr(f, attr):
                        raise ValueError(
                            f"features {first.name!r} and {f.name!r} share table "
                            f"{f.table_name!r} but differ in {attr}"
                        )
        _check_roles(self)
        return self

    # -- views -------------------------------------------------------------------------------
    @property
    def sparse(self) -> tuple[SparseFeature, ...]:
        return tuple(f for f in self.features if isinstance(f, SparseFeature))

    @property
    def dense(self) -> tuple[DenseFeature, ...]:
        return tuple(f for f in self.features if isinstance(f, DenseFeature))

    @property
    def sequences(self) -> tuple[SequenceFeature, ...]:
        return tuple(f for f in self.features if isinstance(f, SequenceFeature))

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def primary_tasks(self) -> tuple[TaskSpec, ...]:
        """The tasks that are exported, served and fused: every task not ``auxiliary``."""
        return tuple(t for t in self.tasks if not t.auxiliary)

    @property
    def primary_task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.primary_tasks)

    @property
    def bias_features(self) -> tuple[Feature, ...]:
        """The selection-bias features (``role: bias``): read by a bias tower in training only."""
        return tuple(f for f in self.features if f.role == "bias")

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"unknown task {name!r}; tasks are {list(self.task_names)}")

    def tables(self) -> dict[str, tuple[_Categorical, ...]]:
        """Embedding table name -> the categorical features that read it (schema order)."""
        out: dict[str, list[_Categorical]] = {}
        for f in self.features:
            if isinstance(f, _Categorical):
                out.setdefault(f.table_name, []).append(f)
        return {k: tuple(v) for k, v in out.items()}

    def input_columns(self) -> list[str]:
        """Every feature column, the bias features' included (read to train; a file scored
        without them is scored as if they were missing: :meth:`scoring_columns`)."""
        cols = [f.source for f in self.features]
        return list(dict.fromkeys(cols))

    def scoring_columns(self) -> list[str]:
        """The columns needed to score (prediction, export, serving): the input columns less
        those read only by bias features (``role: bias``)."""
        cols = [f.source for f in self.features if f.role != "bias"]
        return list(dict.fromkeys(cols))

    def target_columns(self) -> list[str]:
        """Label, mask and weight columns (needed to train or evaluate)."""
        cols: list[str] = []
        for t in self.tasks:
            cols.append(t.label_column)
            cols.extend(c for c in (t.mask, t.weight) if c is not None)
            if t.weight_expr is not None:
                from mtlrec.data.expressions import parse_expression

                cols.extend(parse_expression(t.weight_expr)[1])
        return list(dict.fromkeys(cols))

    def select_tasks(self, names: Sequence[str]) -> Schema:
        """A schema with only the named tasks (e.g. for a single-task baseline)."""
        keep = [self.task(n) for n in names]
        return self.model_copy(update={"tasks": tuple(keep)})

    # -- serialisation ---------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_defaults=False)

    @classmethod
    def from_json(cls, text: str) -> Schema:
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            raise ConfigError(f"invalid schema: {_first_error(e)}") from None

    @classmethod
    def from_dict(cls, data: object) -> Schema:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"invalid schema: {_first_error(e)}") from None

    def fingerprint(self) -> str:
        """Short hash of the canonical JSON; checkpoints record it to refuse another schema.

        Options added after a schema was first saved are left out while they hold their
        default (``vocab_size: null``), so an older run keeps its fingerprint.
        """
        data = self.model_dump(mode="json")
        for f in data["features"]:
            if f.get("vocab_size", 0) is None:
                del f["vocab_size"]
            if f.get("role") == "input":
                del f["role"]
        for t in data["tasks"]:
            if t.get("auxiliary") is False:
                del t["auxiliary"]
        canon = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _check_roles(schema: Schema) -> None:
    """Bias features and auxiliary tasks: something is left for the main model."""
    if all(f.role == "bias" for f in schema.features):
        raise ValueError("every feature has role 'bias': the main model would read nothing")
    if all(t.auxiliary for t in schema.tasks):
        raise ValueError("every task is auxiliary: nothing would be exported or served")
    roles: dict[str, set[str]] = {}
    for f in schema.features:
        if isinstance(f, _Categorical):
            roles.setdefault(f.table_name, set()).add(f.role)
    mixed = sorted(k for k, v in roles.items() if len(v) > 1)
    if mixed:
        raise ValueError(
            f"table {mixed[0]!r} is read by a bias feature and by an input feature: a bias "
            "feature needs a table of its own (the main model never reads it)"
        )


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else str(err["msg"])
