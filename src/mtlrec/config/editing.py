"""Editing a config before it is validated: dotted overrides, switching the model (keeping
the parameters the new model takes), and the closest valid key for an unknown one."""

from __future__ import annotations

import copy
import types
import typing
import warnings
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import BaseModel

from mtlrec.config.sections import ConfigWarning
from mtlrec.errors import ConfigError


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a type: ``A | B | None`` -> ``[A, B, None]`` (Annotated unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


def _is_model(x: Any) -> bool:
    return isinstance(x, type) and issubclass(x, BaseModel)


def _step(annotation: Any, part: Any) -> Any:
    """The type found at ``part`` (a key, an index or a union tag) below ``annotation``."""
    members = _members(annotation)
    for m in members:
        if _is_model(m):
            for name, f in m.model_fields.items():
                if part in (name, f.alias):
                    return f.annotation
        origin = typing.get_origin(m)
        args = typing.get_args(m)
        if isinstance(part, int) and origin in (list, tuple, Sequence) and args:
            return args[0]
        if isinstance(part, str) and origin is dict and len(args) == 2:
            return args[1]
    for m in members:  # a discriminated union: pydantic puts the tag in the path
        if _is_model(m) and any(
            typing.get_origin(f.annotation) is typing.Literal
            and part in typing.get_args(f.annotation)
            for f in m.model_fields.values()
        ):
            return m
    return None


def _key_hint(root: type[BaseModel], loc: Sequence[Any]) -> str:
    """For an unknown key at ``loc``: the closest valid key there, or the valid keys."""
    from mtlrec.registry import did_you_mean

    node: Any = root
    for part in loc[:-1]:
        node = _step(node, part)
        if node is None:
            return ""
    keys = [
        f.alias or name
        for m in _members(node)
        if _is_model(m)
        for name, f in m.model_fields.items()
    ]
    if not keys:
        return ""
    hint = did_you_mean(str(loc[-1]), keys)
    return hint if hint else f" (valid keys here: {', '.join(keys)})"


def switch_model_params(
    name: str,
    params: dict[str, Any],
    *,
    keep: dict[str, Any] | None = None,
    previous: str | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """The parameters of another model's section that model ``name`` takes.

    Args:
        name: the new model.
        params: the parameters written for the previous model.
        keep: parameters given for the new model itself (kept as they are).
        previous: the previous model's name, for messages.
        strict: raise instead of dropping.

    Returns:
        ``params`` without the keys the new model does not take, updated by ``keep``; a
        :class:`ConfigWarning` names the dropped keys.

    Raises:
        ConfigError: ``name`` is unknown, or ``strict`` and some parameter would be dropped
            (the message lists the new model's parameters).
    """
    from mtlrec.registry import MODELS

    takes = MODELS.param_names(name)
    keep = dict(keep or {})
    dropped = [k for k in params if k not in takes and k not in keep]
    was = f" (written for {previous!r})" if previous else ""
    if dropped and strict:
        raise ConfigError(
            f"model.params{was}: model {name!r} has no parameter "
            f"{', '.join(dropped)}; it takes: {', '.join(takes) or 'none'} (mtlrec list {name})"
        )
    if dropped:
        warnings.warn(
            f"model {name!r} has no parameter {', '.join(dropped)}: dropped from "
            f"model.params{was}; kept: {', '.join(k for k in params if k in takes) or 'none'} "
            f"(mtlrec list {name} shows its parameters; --strict refuses instead)",
            ConfigWarning,
            stacklevel=3,
        )
    return {**{k: v for k, v in params.items() if k in takes}, **keep}


def _switched_model(
    raw: Any, data: Any, overrides: Sequence[str], *, strict: bool
) -> dict[str, Any]:
    """``data`` (``raw`` with ``overrides`` applied) with its model parameters switched when an
    override changed ``model.name``."""
    old, new = raw.get("model") if isinstance(raw, dict) else None, None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        new = data["model"]
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return data
    name, before = new.get("name"), old.get("name")
    params = new.get("params")
    if not isinstance(name, str) or name == before or not isinstance(params, dict):
        return data
    keys = [o.partition("=")[0] for o in overrides]
    if any(k in ("model", "model.params") for k in keys):
        return data  # the whole section or its parameters were given anew
    given = {k.split(".", 2)[2] for k in keys if k.startswith("model.params.")}
    keep = {k: params[k] for k in given if k in params}
    kept = switch_model_params(
        name,
        params,
        keep=keep,
        previous=before if isinstance(before, str) else None,
        strict=strict,
    )
    return {**data, "model": {**new, "params": kept}}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out
