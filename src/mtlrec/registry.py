"""The one place where names become classes: models, balancing strategies, fusions.

Strings live only at the boundary (YAML, CLI); inside, a registry entry carries the class, its
parameter model (a pydantic class that rejects unknown keys) and a one-line description.

Example:
    >>> from mtlrec.registry import MODELS
    >>> "mmoe" in MODELS.names()
    True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from mtlrec.errors import ConfigError

T = TypeVar("T")


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

    def get(self, name: str) -> Entry[T]:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose from: {', '.join(self.names())}"
            ) from None

    def parse_params(self, name: str, params: dict[str, Any] | BaseModel | None) -> BaseModel:
        """Validate parameters for an entry (unknown keys rejected)."""
        entry = self.get(name)
        if entry.params is None:
            if params:
                raise ConfigError(f"{self.kind} {name!r} takes no parameters")
            return BaseModel()
        if isinstance(params, entry.params):
            return params
        try:
            return entry.params.model_validate(dict(params or {}))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{self.kind} {name!r} parameter {loc}: {err['msg']}") from None


MODELS: Registry[Any] = Registry("model", "mtlrec.models")
WEIGHTINGS: Registry[Any] = Registry("balancing strategy", "mtlrec.weighting")
FUSIONS: Registry[Any] = Registry("fusion", "mtlrec.fusion")
