"""The one place where names become classes: models, balancing strategies, fusions.

Strings live only at the boundary (YAML, CLI); inside, a registry entry carries the class, its
parameter model (a pydantic class that rejects unknown keys) and a one-line description.

Example:
    >>> from mtlrec.registry import MODELS
    >>> "mmoe" in MODELS.names()
    True
"""

from __future__ import annotations

import difflib
import importlib
import json
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from mtlrec.errors import ConfigError

T = TypeVar("T")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when ``choices`` holds a name close to ``name``, else ``""``.

    Example:
        >>> did_you_mean("mmoee", ["mmoe", "omoe", "ple"])
        " (did you mean 'mmoe'?)"
    """
    by_lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.72)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of a registry entry, for ``mtlrec list NAME``."""

    name: str
    type: str
    default: str
    help: str


def _type_name(annotation: Any) -> str:
    """A short readable type: ``int``, ``list[int]`` (a variable-length tuple, written as a
    YAML list), ``float | None``."""
    if annotation is None or annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin is None:
        return getattr(annotation, "__name__", str(annotation))
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"list[{_type_name(args[0])}]"  # written as a YAML list
    inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
    return f"{getattr(origin, '__name__', str(origin))}[{inner}]"


def _constraints(metadata: list[Any]) -> str:
    marks = {
        "ge": ">=",
        "gt": ">",
        "le": "<=",
        "lt": "<",
        "min_length": "len >=",
        "max_length": "len <=",
    }
    out = []
    for m in metadata:
        for attr, sym in marks.items():
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return ", ".join(out)


def describe_params(params: type[BaseModel] | None) -> list[ParamInfo]:
    """The parameters of a pydantic ``Params`` class: name, type (with its bounds), default
    and description, in declaration order."""
    if params is None:
        return []
    out = []
    for name, f in params.model_fields.items():
        typ = _type_name(f.annotation)
        bounds = _constraints(list(f.metadata))
        if bounds:
            typ += f" ({bounds})"
        if f.is_required():
            default = "required"
        else:
            value = f.get_default(call_default_factory=True)
            default = json.dumps(value, default=str)  # as JSON (YAML flow style reads it)
        out.append(ParamInfo(name, typ, default, f.description or ""))
    return out


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    cls: type[T]
    params: type[BaseModel] | None
    description: str
    paper: str


class Registry(Generic[T]):
    """Name -> class, filled by the ``register`` decorator of each implementation.

    Args:
        kind: what the entries are, for messages ("model", "balancing strategy").
        package: imported on first use so that every entry has registered itself.
    """

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False

    def register(
        self, name: str, *, params: type[BaseModel] | None = None, paper: str = ""
    ) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name in self._entries and self._entries[name].cls is not cls:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = (cls.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, cls, params, doc[0] if doc else "", paper)
            return cls

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.package)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        self._load()
        return [self._entries[n] for n in sorted(self._entries)]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def get(self, name: str) -> Entry[T]:
        """The entry of ``name``.

        Raises:
            ConfigError: unknown name (the message suggests the closest registered one).
        """
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}; choose "
                f"from: {', '.join(self.names())}"
            ) from None

    def param_names(self, name: str) -> list[str]:
        """The parameter names an entry takes (declaration order)."""
        params = self.get(name).params
        return [] if params is None else list(params.model_fields)

    def describe(self, name: str) -> list[ParamInfo]:
        """Name, type, default and help of every parameter of an entry."""
        return describe_params(self.get(name).params)

    def parse_params(self, name: str, params: dict[str, Any] | BaseModel | None) -> BaseModel:
        """Validate parameters for an entry (unknown keys rejected).

        Raises:
            ConfigError: an unknown parameter (the message suggests the closest one and lists
                what the entry takes) or an invalid value.
        """
        entry = self.get(name)
        if entry.params is None:
            if params:
                keys = ", ".join(repr(k) for k in dict(params))
                raise ConfigError(f"{self.kind} {name!r} takes no parameters (got {keys})")
            return BaseModel()
        if isinstance(params, entry.params):
            return params
        try:
            return entry.params.model_validate(dict(params or {}))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
                known = self.param_names(name)
                raise ConfigError(
                    f"{self.kind} {name!r} has no parameter {loc}{did_you_mean(loc, known)}; "
                    f"it takes: {', '.join(known)} (mtlrec list {name})"
                ) from None
            raise ConfigError(f"{self.kind} {name!r} parameter {loc}: {err['msg']}") from None


MODELS: Registry[Any] = Registry("model", "mtlrec.models")
WEIGHTINGS: Registry[Any] = Registry("balancing strategy", "mtlrec.weighting")
FUSIONS: Registry[Any] = Registry("fusion", "mtlrec.fusion")
