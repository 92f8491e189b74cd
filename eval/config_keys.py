"""One parser per top-level key of a sweep config (see :mod:`.config`, which validates across keys).

Each parser takes the raw (YAML-parsed) config, checks its key and raises :class:`ConfigError`
naming it; values are checked against the dataclass annotations (:mod:`.config_types`) and then by
the spec's or PTConfig's own constructor.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from chronovisor.controllers import PTConfig
from chronovisor.eval.config_types import build, check_value, field_types, section_values
from chronovisor.eval.errors import ConfigError
from chronovisor.eval.specs import VARIANTS, Contrast, DataSpec, EvalSpec
from chronovisor.eval.synthetic import ConversationConfig

# PTConfig fields a config may not set: the seed comes from ``seeds``, learnable from the protocol.
_RESERVED_CONTROLLER_FIELDS = {
    "seed": "the controller seed is the cell's seed; list seeds at the top level",
    "learnable": "set by the protocol (True for controller_only, False otherwise)",
}
#: Seeds seed torch and numpy generators: integers in [0, 2**63).
SEED_LIMIT = 2**63
#: The most seeds a count may ask for (each seed is at least two cells).
MAX_SEED_COUNT = 100_000
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_data(section: Any) -> DataSpec:
    """The data section: DataSpec fields and, next to them, the ConversationConfig (``generator``) fields.

    ``max_length`` is the longest conversation in tokens for both sources: the generator's bound for
    synthetic data, the truncation length for JSONL data.
    """
    if isinstance(section, dict) and "generator" in section:
        raise ConfigError("data.generator: write the ConversationConfig fields directly under data")
    values = section_values(DataSpec, section, "data", extra_types=field_types(ConversationConfig))
    own = {field.name for field in dataclasses.fields(DataSpec)}
    if values.get("source", DataSpec.source) == "synthetic":
        own.discard("max_length")
    generator = {key: value for key, value in values.items() if key not in own}
    build(ConversationConfig, generator, "data")
    return build(DataSpec, {**{key: value for key, value in values.items() if key in own}, "generator": generator},
                  "data")


# ------------------------------------------------------------------------------ top-level keys
def parse_primary(raw: dict[str, Any]) -> tuple[Contrast, ...]:
    value = raw.get("primary") or []
    if not isinstance(value, list):
        raise ConfigError(f"primary: expected a list of contrasts like [pt - off], got {value!r}")
    contrasts = []
    for index, text in enumerate(value):
        try:
            contrasts.append(Contrast.parse(text))
        except ValueError as error:
            raise ConfigError(f"primary[{index}]: {error}") from None
    if len(set(contrasts)) != len(contrasts):
        raise ConfigError("primary: a contrast is declared twice")
    return tuple(contrasts)


def parse_models(raw: dict[str, Any]) -> tuple[str, ...]:
    if "model" in raw and "models" in raw:
        raise ConfigError("model / models: give one of them, not both")
    key = "models" if "models" in raw else "model"
    if key not in raw:
        raise ConfigError("models: required (toy preset names, model directories or hub ids)")
    value = raw[key]
    models = [value] if isinstance(value, str) else value
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{key}: expected a name or a non-empty list of names, got {value!r}")
    from chronovisor.wrappers.toy import TOY_PRESETS

    for i, model in enumerate(models):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}: expected a model name, got {model!r}")
        if model in TOY_PRESETS:
            continue
        path = Path(model).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ConfigError(f"{where}: directory {model} has no config.json (not a model directory)")
            continue
        if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
            continue
        raise ConfigError(f"{where}: {model!r} is neither a toy preset ({', '.join(TOY_PRESETS)}), "
                          f"an existing model directory, nor a hub id")
    if len(set(models)) != len(models):
        raise ConfigError(f"{key}: duplicate entries")
    return tuple(models)


def parse_seeds(raw: dict[str, Any]) -> tuple[int, ...]:
    if "seeds" not in raw:
        raise ConfigError("seeds: required (a count, or a list of integers)")
    value = raw["seeds"]
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_SEED_COUNT:
            raise ConfigError(f"seeds: a count must lie in [1, {MAX_SEED_COUNT:,}], got {value}")
        return tuple(range(value))
    if not isinstance(value, list) or not value:
        raise ConfigError(f"seeds: expected a count or a non-empty list of integers, got {value!r}")
    for i, seed in enumerate(value):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
            raise ConfigError(f"seeds[{i}]: expected an integer in [0, 2**63) (a torch and numpy seed), got {seed!r}")
    if len(set(value)) != len(value):
        raise ConfigError("seeds: duplicate seeds")
    return tuple(value)


def _controller_value(key: str, value: Any, where: str, types: dict[str, Any]) -> Any:
    if key in _RESERVED_CONTROLLER_FIELDS:
        raise ConfigError(f"{where}: not settable here ({_RESERVED_CONTROLLER_FIELDS[key]})")
    if key not in types:
        raise ConfigError(f"{where}: unknown PTConfig field; known fields: "
                          f"{', '.join(sorted(set(types) - set(_RESERVED_CONTROLLER_FIELDS)))}")
    if key == "mode":
        if value not in VARIANTS:
            raise ConfigError(f"{where}: must be one of {', '.join(VARIANTS)}, got {value!r}")
        return value
    return check_value(value, types[key], where)


def parse_controller(raw: dict[str, Any]) -> dict[str, Any]:
    values = raw.get("controller") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"controller: expected a mapping of PTConfig fields, got {type(values).__name__}")
    types = field_types(PTConfig)
    return {key: _controller_value(key, value, f"controller.{key}", types) for key, value in values.items()}


def parse_grid(raw: dict[str, Any]) -> tuple[dict[str, tuple], ...]:
    value = raw.get("grid") or {}
    grids = value if isinstance(value, list) else [value]
    types = field_types(PTConfig)
    result = []
    for index, grid in enumerate(grids):
        section = f"grid[{index}]" if isinstance(value, list) else "grid"
        if not isinstance(grid, dict):
            raise ConfigError(f"{section}: expected a mapping of PTConfig field -> list of values")
        axes = {}
        for key, values in grid.items():
            where = f"{section}.{key}"
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: expected a non-empty list of values, got {values!r}")
            checked = tuple(_controller_value(key, item, f"{where}[{i}]", types) for i, item in enumerate(values))
            if len(set(checked)) != len(checked):
                raise ConfigError(f"{where}: duplicate values")
            axes[key] = checked
        result.append(axes)
    return tuple(result)


def parse_stack_size(raw: dict[str, Any], protocol: str, evaluation: EvalSpec) -> int:
    value = raw.get("batch_configs", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"batch_configs: expected an integer >= 1 (configurations per stacked forward), got {value!r}")
    if value > 1 and protocol != "frozen":
        raise ConfigError(f"batch_configs: only the frozen protocol can stack configurations (protocol is {protocol}); "
                          f"remove the key or set it to 1")
    if value > 1 and evaluation.streaming:
        raise ConfigError("batch_configs: eval.streaming ticks per turn of one conversation and cannot be stacked")
    return value
