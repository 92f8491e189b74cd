"""The config text before validation: ``${ENV}`` expansion and ``--set KEY=VALUE`` overrides."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

from chronovisor.eval.errors import ConfigError
from chronovisor.eval.yaml_text import load_yaml

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
