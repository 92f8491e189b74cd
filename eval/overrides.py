"""The config text before validation: ``${ENV}`` expansion and ``--set KEY=VALUE`` overrides."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from chronovisor.eval.errors import ConfigError
from chronovisor.eval.yaml_text import load_yaml

T = TypeVar("T")
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def parse_assignment(text: str, placeholder: str = "KEY", example: str = "train.steps=20") -> tuple[str, Any]:
    """``"key=value"`` → (key, value parsed as YAML, see :func:`~chronovisor.eval.yaml_text.load_yaml`:
    ``off`` stays a string); :class:`ConfigError` showing the expected form or the YAML error."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"--set {text!r}: expected {placeholder}=VALUE (e.g. {example})")
    return key.strip(), load_yaml(value, f"--set {text!r}")


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) to a copy of ``raw``."""
    result = json.loads(json.dumps(raw))
    for override in overrides:
        key, value = parse_assignment(override)
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"--set {override!r}: empty key")
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is not a mapping")
            node = child
        node[parts[-1]] = value
    return result


def expand_env(value: Any, where: str) -> Any:
    """Replace ``${NAME}`` / ``${NAME:-default}`` in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {key: expand_env(item, f"{where}.{key}" if where else str(key)) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_env(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set (the config uses ${{{name}}})")

    return _ENV_PATTERN.sub(substitute, value)


def load_config_file(path: str | Path, overrides: Iterable[str], what: str, parse: Callable[[Any, str], T]) -> T:
    """Read a YAML config, apply ``--set`` overrides, expand ``${ENV}`` and validate it with ``parse``.

    Args:
        path: the YAML file (an empty file is ``{}``).
        overrides: ``KEY=VALUE`` strings (see :func:`apply_overrides`).
        what: how a missing file is named in the error, e.g. ``"config file"``.
        parse: ``parse(raw, name)`` validates the parsed YAML (``name``: the file's stem) and raises
            :class:`ConfigError` naming the key.

    Raises:
        ConfigError: the file is missing or not YAML, or an override, variable or key is bad (one line
            naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    raw = load_yaml(text, str(path))
    try:
        return parse(expand_env(apply_overrides(raw if raw is not None else {}, overrides), ""), path.stem)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
