"""YAML values checked against dataclass annotations: the types of a config's sections.

Ranges and cross-field rules are the dataclasses' own checks (their ``__post_init__``);
:func:`build` reports them as a :class:`ConfigError` naming the section.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from chronovisor.eval.errors import ConfigError


def check_value(value: Any, kind: Any, where: str) -> Any:
    """Check ``value`` against a (resolved) annotation; numeric strings count as floats."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return check_value(value, option, where)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got the string {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def section_values(cls: type, values: Any, section: str, extra_types: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config section's values, type-checked against ``cls``'s fields (and ``extra_types``)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(values).__name__}")
    known = dict(field_types(cls), **(extra_types or {}))
    for key in values:
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key; known keys: {', '.join(sorted(known))}")
    return {key: check_value(value, known[key], f"{section}.{key}") for key, value in values.items()}


def build(cls: type, values: dict[str, Any], section: str) -> Any:
    """``cls(**values)``; its own range checks raise a ConfigError naming the section."""
    try:
        return cls(**values)
    except ValueError as error:
        raise ConfigError(f"{section}: {error}") from None
