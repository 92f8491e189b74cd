"""Reading a JSON file that must hold one object, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in ``path``.

    Args:
        path: the file (it must exist).
        error: the exception class raised, with a message naming the file, when the file is empty,
            truncated, not UTF-8 or not JSON, or holds something other than an object.
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{path}: not valid JSON ({problem}); the file is empty, truncated or corrupt") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value
