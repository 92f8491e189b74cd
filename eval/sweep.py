"""Resumable, shardable sweeps: YAML config → grid of paired cells → one atomic JSON per cell.

    chronovisor sweep configs/quickstart.yaml --out runs/quickstart [--set train.steps=20 ...]
    accelerate launch --multi_gpu --num_processes 2 -m chronovisor.cli sweep CONFIG --out RUN_DIR

Config schema (every key optional unless marked; unknown keys are errors)::

    name: quickstart                 # label (default: the file name)
    protocol: joint                  # joint | frozen | controller_only   (required)
    models: [mixtral-tiny]           # (required; ``model:`` for one) toy preset names, model
                                     # directories (with config.json) or hub ids (org/name)
    seeds: 3                         # a count (0..n-1) or a list of integers (required)
    data:    {source, num_train, num_heldout, num_warmup, path, tokenizer, max_length,
              heldout_fraction, + any ConversationConfig field: vocab_size, min_length, ...}
    train:   {steps, lr, weight_decay, batch_size, pretrain_steps, controller_lr}
    eval:    {batch_size, null_permutations, trajectory_every, streaming}
    load:    {device_map, torch_dtype}   # model directories / hub ids only
    controller: {PTConfig fields}        # fixed for every cell (not seed, not learnable)
    grid:                                # PTConfig fields -> lists; a mapping or a list of them
      eta: [0.01, 0.015]                 # (a list is a union of grids, as sklearn's ParameterGrid)
      pressure_scale: [0.5, 1.0]
      mode: [pt]                         # pressure | temperature | pt | loss_free (| off)
    batch_configs: 9                 # frozen only, opt-in: run up to 9 cells of a seed in one
                                     # stacked forward (run_cells_stacked); default 1 = one at a time

``mode: loss_free`` means DeepSeek's comparator (``dynamics=loss_free``, ``mode=pressure``). The
off arm (``mode=off``) of every (model, seed) is always run, once, and shared by all cells of that
seed. ``${NAME}`` (or ``${NAME:-default}``) in any string is replaced by the environment variable;
``--set key.sub=value`` (value parsed as YAML) edits the config before validation. Floats written
``1e-4`` (which YAML reads as a string) are accepted. Every value is validated — including every
grid combination through PTConfig's own checks — before any work, with errors naming the key.

``batch_configs: N`` (``frozen`` protocol, not streaming) is an execution setting, not part of the
experiment: the cells of a (model, seed) whose controllers differ only in η, P, mode (and the off
arm) are grouped into units of at most N and each unit runs through
:func:`~chronovisor.eval.protocols.run_cells_stacked` (the batch repeated once per configuration,
a stacked controller). The cell files are the same as one at a time (up to float32 rounding), so
it is left out of the config hash: a run directory can be resumed with or without it.

Run directory::

    RUN_DIR/manifest.json            config, its hash, cell ids, versions, git commit, times
    RUN_DIR/config.yaml              the resolved config
    RUN_DIR/cells/<cell_id>.json     one per finished cell (written last, atomically: the marker)
    RUN_DIR/cells/<cell_id>.routing.npz   held-out routing of that cell (for routing preservation)
    RUN_DIR/bases/                   pretrained frozen bases (frozen / controller_only)

Re-running the same command skips finished cells; an interrupted sweep loses at most the cells in
progress; with ``batch_configs`` a unit runs only its unfinished cells. Cells are bit-reproducible for a fixed device and torch thread count (``accelerate
launch`` sets OMP_NUM_THREADS=1 per process; a lone process uses torch's default): resuming under
another process layout is allowed, and the report flags on/off pairs whose numerics differ. Under ``accelerate launch`` each process takes every ``num_processes``-th cell (with
``batch_configs``: every ``num_processes``-th unit), so each cell is run exactly once. On a CPU-only machine accelerate starts several processes only through
its torchrun path, ``--multi_gpu`` (the name notwithstanding); the sweep then uses
``PartialState(cpu=True)`` (gloo) so the processes see their ranks.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chronovisor.controllers import PTConfig
from chronovisor.eval import protocols
from chronovisor.eval.protocols import CellSpec, DataSpec, EvalSpec, LoadSpec, TrainSpec
from chronovisor.eval.synthetic import ConversationConfig

MANIFEST = "manifest.json"
RESOLVED_CONFIG = "config.yaml"
CELLS_DIR = "cells"
ROUTING_SUFFIX = ".routing.npz"
MANIFEST_FORMAT = 1

_TOP_LEVEL = ("name", "protocol", "models", "model", "seeds", "data", "train", "eval", "load", "controller", "grid",
              "batch_configs")
# Top-level keys that change how cells are run, not their results: left out of the config hash.
_EXECUTION_KEYS = ("batch_configs",)
# PTConfig fields a config may not set: the seed comes from ``seeds``, learnable from the protocol.
_RESERVED_CONTROLLER_FIELDS = {
    "seed": "the controller seed is the cell's seed; list seeds at the top level",
    "learnable": "set by the protocol (True for controller_only, False otherwise)",
}
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
VARIANTS = ("off", "pressure", "temperature", "pt", protocols.LOSS_FREE)


class ConfigError(ValueError):
    """A sweep config is invalid; the message names the offending key."""


# ------------------------------------------------------------------------ loading helpers
def _expand_env(value: Any, where: str) -> Any:
    """Replace ``${NAME}`` / ``${NAME:-default}`` in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {key: _expand_env(item, f"{where}.{key}" if where else str(key)) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand_env(item, f"{where}[{i}]") for i, item in enumerate(value)]
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


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) to a copy of ``raw``."""
    result = json.loads(json.dumps(raw))
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"--set {override!r}: expected KEY=VALUE (e.g. train.steps=20)")
        key, text = override.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {override!r}: empty key")
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is not a mapping")
            node = child
        node[parts[-1]] = yaml.safe_load(text)
    return result


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind).replace("typing.", ""))


def _coerce(value: Any, kind: Any, where: str) -> Any:
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
                return _coerce(value, option, where)
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


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build_section(cls: type, values: Any, section: str, extra_types: dict[str, Any] | None = None) -> Any:
    """Instantiate a spec dataclass from a config section, naming the key on any error."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(values).__name__}")
    own_types = _field_types(cls)
    known = dict(own_types, **(extra_types or {}))
    checked = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key; known keys: {', '.join(sorted(known))}")
        checked[key] = _coerce(value, known[key], f"{section}.{key}")
    own = {key: value for key, value in checked.items() if key in own_types}
    try:
        return cls(**own), {key: value for key, value in checked.items() if key not in own_types}
    except ValueError as error:
        raise ConfigError(f"{section}: {error}") from None


# --------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: the resolved config and the specs every cell shares."""

    name: str
    protocol: str
    models: tuple[str, ...]
    seeds: tuple[int, ...]
    data: DataSpec
    train: TrainSpec
    eval: EvalSpec
    load: LoadSpec
    controller: dict[str, Any]
    grid: tuple[dict[str, tuple], ...]
    resolved: dict[str, Any]
    batch_configs: int = 1

    @property
    def config_hash(self) -> str:
        return protocols.stable_hash({key: value for key, value in self.resolved.items() if key not in _EXECUTION_KEYS})

    def controller_settings(self) -> list[dict[str, Any]]:
        """Every controller setting of the grid (PTConfig fields + ``mode`` label), deduplicated, in order."""
        settings: list[dict[str, Any]] = []
        for grid in self.grid:
            keys = list(grid)
            for combination in itertools.product(*(grid[key] for key in keys)):
                setting = dict(self.controller)
                setting.update(zip(keys, combination, strict=True))
                setting.setdefault("mode", "pt")
                if setting not in settings:
                    settings.append(setting)
        return settings

    def cells(self) -> list[CellSpec]:
        """Every cell of the sweep (on arms and their shared off arms), deduplicated, in a fixed order:
        by seed, then model, the off arm first, then the grid order."""
        cells: dict[str, CellSpec] = {}
        learnable = self.protocol == "controller_only"
        for seed in self.seeds:
            for model in self.models:
                common = dict(protocol=self.protocol, model=model, seed=seed, data=self.data, train=self.train,
                              eval=self.eval, load=self.load)
                off = CellSpec(controller=None, **common)
                cells.setdefault(off.cell_id, off)
                for setting in self.controller_settings():
                    if setting["mode"] == protocols.OFF:
                        continue
                    fields = {key: value for key, value in setting.items() if key != "mode"}
                    config = protocols.variant_config(setting["mode"], **fields, seed=seed, learnable=learnable)
                    cell = CellSpec(controller=config, **common)
                    cells.setdefault(cell.cell_id, cell)
        return list(cells.values())


def _models(raw: dict[str, Any]) -> tuple[str, ...]:
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


def _seeds(raw: dict[str, Any]) -> tuple[int, ...]:
    if "seeds" not in raw:
        raise ConfigError("seeds: required (a count, or a list of integers)")
    value = raw["seeds"]
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"seeds: a count must be at least 1, got {value}")
        return tuple(range(value))
    if not isinstance(value, list) or not value:
        raise ConfigError(f"seeds: expected a count or a non-empty list of integers, got {value!r}")
    for i, seed in enumerate(value):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seeds[{i}]: expected a non-negative integer, got {seed!r}")
    if len(set(value)) != len(value):
        raise ConfigError("seeds: duplicate seeds")
    return tuple(value)


def _controller_value(key: str, value: Any, where: str, field_types: dict[str, Any]) -> Any:
    if key in _RESERVED_CONTROLLER_FIELDS:
        raise ConfigError(f"{where}: not settable here ({_RESERVED_CONTROLLER_FIELDS[key]})")
    if key not in field_types:
        raise ConfigError(f"{where}: unknown PTConfig field; known fields: "
                          f"{', '.join(sorted(set(field_types) - set(_RESERVED_CONTROLLER_FIELDS)))}")
    if key == "mode":
        if value not in VARIANTS:
            raise ConfigError(f"{where}: must be one of {', '.join(VARIANTS)}, got {value!r}")
        return value
    return _coerce(value, field_types[key], where)


def _controller(raw: dict[str, Any]) -> dict[str, Any]:
    values = raw.get("controller") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"controller: expected a mapping of PTConfig fields, got {type(values).__name__}")
    field_types = _field_types(PTConfig)
    return {key: _controller_value(key, value, f"controller.{key}", field_types) for key, value in values.items()}


def _grid(raw: dict[str, Any]) -> tuple[dict[str, tuple], ...]:
    value = raw.get("grid") or {}
    grids = value if isinstance(value, list) else [value]
    field_types = _field_types(PTConfig)
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
            checked = tuple(_controller_value(key, item, f"{where}[{i}]", field_types) for i, item in enumerate(values))
            if len(set(checked)) != len(checked):
                raise ConfigError(f"{where}: duplicate values")
            axes[key] = checked
        result.append(axes)
    return tuple(result)


def parse_config(raw: Any, name: str = "sweep") -> SweepConfig:
    """Validate a parsed YAML config (after env expansion and overrides) into a :class:`SweepConfig`.

    Raises :class:`ConfigError` naming the key on the first problem, before any work is done.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of keys ({', '.join(_TOP_LEVEL)}), got {type(raw).__name__}")
    for key in raw:
        if key not in _TOP_LEVEL:
            raise ConfigError(f"{key}: unknown top-level key; known keys: {', '.join(_TOP_LEVEL)}")
    label = raw.get("name", name)
    if not isinstance(label, str) or not label:
        raise ConfigError(f"name: expected a non-empty string, got {label!r}")
    protocol = raw.get("protocol")
    if protocol not in protocols.PROTOCOLS:
        raise ConfigError(f"protocol: must be one of {', '.join(protocols.PROTOCOLS)}, got {protocol!r}")
    models = _models(raw)
    seeds = _seeds(raw)
    data_section = raw.get("data") or {}
    if isinstance(data_section, dict) and "generator" in data_section:
        raise ConfigError("data.generator: write the ConversationConfig fields directly under data")
    data, generator = _build_section(DataSpec, data_section, "data", extra_types=_field_types(ConversationConfig))
    if generator:
        try:
            ConversationConfig(**generator)
        except ValueError as error:
            raise ConfigError(f"data: {error}") from None
        data = dataclasses.replace(data, generator=generator)
    train, _ = _build_section(TrainSpec, raw.get("train"), "train")
    evaluation, _ = _build_section(EvalSpec, raw.get("eval"), "eval")
    load, _ = _build_section(LoadSpec, raw.get("load"), "load")
    controller = _controller(raw)
    grid = _grid(raw)
    batch_configs = _batch_configs(raw, protocol, evaluation)
    resolved = {
        "name": label,
        "protocol": protocol,
        "models": list(models),
        "seeds": list(seeds),
        "data": dataclasses.asdict(data),
        "train": dataclasses.asdict(train),
        "eval": dataclasses.asdict(evaluation),
        "load": dataclasses.asdict(load),
        "controller": controller,
        "grid": [{key: list(values) for key, values in axes.items()} for axes in grid],
    }
    if "batch_configs" in raw:
        resolved["batch_configs"] = batch_configs
    config = SweepConfig(label, protocol, models, seeds, data, train, evaluation, load, controller, grid, resolved,
                         batch_configs)
    settings = config.controller_settings()
    if all(setting["mode"] == protocols.OFF for setting in settings):
        raise ConfigError("grid.mode: no controller arm (only 'off'); list pressure, temperature, pt or loss_free")
    learnable = protocol == "controller_only"
    for setting in settings:
        if setting["mode"] == protocols.OFF:
            continue
        fields = {key: value for key, value in setting.items() if key != "mode"}
        try:
            protocols.variant_config(setting["mode"], **fields, learnable=learnable)
        except ValueError as error:
            shown = ", ".join(f"{key}={value}" for key, value in setting.items())
            raise ConfigError(f"grid/controller ({shown}): {error}") from None
    if protocol in ("joint", "controller_only") and train.steps < 1:
        raise ConfigError(f"train.steps: protocol {protocol} needs at least one step")
    if protocol == "frozen" and data.num_warmup < 1:
        raise ConfigError("data.num_warmup: protocol frozen needs a warm-up stream of at least one conversation")
    if data.source == "synthetic":
        for model in models:
            vocab = _model_config(model).get("vocab_size")
            if vocab is not None and data.conversation_config.vocab_size > vocab:
                raise ConfigError(f"data.vocab_size: {data.conversation_config.vocab_size} token ids do not fit the "
                                  f"{vocab}-token vocabulary of {model}")
    if evaluation.streaming:
        for model in models:
            if _model_config(model).get("is_encoder_decoder", False):
                raise ConfigError(f"eval.streaming: {model} is an encoder-decoder model; streaming evaluation "
                                  f"needs a decoder-only one")
    if data.source == "jsonl" and not Path(data.path).expanduser().is_file():
        raise ConfigError(f"data.path: file not found: {data.path}")
    return config


def _batch_configs(raw: dict[str, Any], protocol: str, evaluation: EvalSpec) -> int:
    value = raw.get("batch_configs", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"batch_configs: expected an integer >= 1 (configurations per stacked forward), got {value!r}")
    if value > 1 and protocol != "frozen":
        raise ConfigError(f"batch_configs: only the frozen protocol can stack configurations (protocol is {protocol}); "
                          f"remove the key or set it to 1")
    if value > 1 and evaluation.streaming:
        raise ConfigError("batch_configs: eval.streaming ticks per turn of one conversation and cannot be stacked")
    return value


def stack_units(cells: list[CellSpec], batch_configs: int) -> list[list[CellSpec]]:
    """The cells in units that run together (one unit per :func:`protocols.run_cells_stacked` call).

    ``batch_configs`` 1: one cell per unit. Otherwise the cells of one (model, seed, settings)
    whose controllers can share a stacked controller (:func:`protocols.stack_key`: e.g. the pt /
    pressure / temperature arms, and separately the loss_free arms) form a family, the off arm
    joining the first family of its seed; each family is split into the fewest near-equal units of
    at most ``batch_configs`` cells. Deterministic in its arguments, so every process computes the
    same units. Cells no stacked run accepts (other protocols, streaming) stay alone.
    """
    if batch_configs <= 1:
        return [[cell] for cell in cells]
    families: dict[tuple, list[CellSpec]] = {}
    off_arms: dict[str, list[CellSpec]] = {}
    for cell in cells:
        if cell.protocol != "frozen" or cell.eval.streaming:
            families[("alone", cell.cell_id)] = [cell]
        elif cell.is_off:
            off_arms.setdefault(protocols.stack_group_key(cell), []).append(cell)
        else:
            families.setdefault((protocols.stack_group_key(cell), protocols.stack_key(cell)), []).append(cell)
    for settings, arms in off_arms.items():
        family = next((key for key in families if key[0] == settings), None)
        if family is None:
            families[("off", settings)] = arms
        else:
            families[family] = arms + families[family]
    units = []
    for members in families.values():
        count = -(-len(members) // batch_configs)
        size, extra = divmod(len(members), count)
        start = 0
        for i in range(count):
            end = start + size + (i < extra)
            units.append(members[start:end])
            start = end
    return units


def shard_units(units: list[list[CellSpec]], process_index: int, num_processes: int) -> list[list[CellSpec]]:
    """This process's units: every ``num_processes``-th from ``process_index``."""
    return units[process_index::num_processes]


def _model_config(model: str) -> dict[str, Any]:
    """The HF config of a preset or model directory as a dict (a hub id: {} — known only once loaded)."""
    from chronovisor.wrappers.toy import TOY_PRESETS, toy_config

    if model in TOY_PRESETS:
        return toy_config(model).to_dict()
    config_file = Path(model).expanduser() / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> SweepConfig:
    """Read, expand (``${ENV}``), override (``--set``) and validate a YAML sweep config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    raw = apply_overrides(raw if raw is not None else {}, overrides)
    return parse_config(_expand_env(raw, ""), name=path.stem)


# ------------------------------------------------------------------------- the run directory
def cell_path(run_dir: Path, cell_id: str) -> Path:
    return run_dir / CELLS_DIR / f"{cell_id}.json"


def routing_path(run_dir: Path, cell_id: str) -> Path:
    return run_dir / CELLS_DIR / f"{cell_id}{ROUTING_SUFFIX}"


def is_finished(run_dir: Path, cell_id: str) -> bool:
    """True if the cell's JSON exists and is a complete record of this cell."""
    path = cell_path(run_dir, cell_id)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return record.get("cell_id") == cell_id and routing_path(run_dir, cell_id).is_file()


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same directory and ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_json(path: Path, value: Any) -> None:
    _atomic_write(path, lambda handle: handle.write((json.dumps(value, indent=2, default=_json_default) + "\n").encode()))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def save_cell(run_dir: Path, result: protocols.ArmResult) -> None:
    """Routing first, then the JSON record (whose presence marks the cell finished); both atomic."""
    import numpy as np

    cell_id = result.record["cell_id"]
    _atomic_write(routing_path(run_dir, cell_id), lambda handle: np.savez_compressed(
        handle, layer_names=np.asarray(list(result.routing)), **{f"layer{i}": ids for i, ids in enumerate(result.routing.values())}))
    write_json(cell_path(run_dir, cell_id), result.record)


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("chronovisor", "torch", "transformers", "accelerate", "numpy", "scipy", "pyyaml"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit() -> dict[str, Any] | None:
    """Commit of the source tree this package runs from (None outside a git checkout)."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True,
                                timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=source, capture_output=True, text=True,
                                check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check_run_dir(run_dir: Path, config: SweepConfig) -> dict[str, Any] | None:
    """The existing manifest, after checking it belongs to this config (else ConfigError)."""
    path = run_dir / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("config_hash") != config.config_hash:
        raise ConfigError(
            f"{run_dir} holds a sweep of another config (hash {str(manifest.get('config_hash'))[:12]}, this one "
            f"{config.config_hash[:12]}); resume with the same config and --set values, or use another --out")
    return manifest


@dataclass
class SweepOutcome:
    """What one process did: cells of its shard run now, skipped (already finished), and in total."""

    run_dir: Path
    ran: list[str]
    skipped: list[str]
    total_cells: int
    complete: bool


def run_sweep(config: SweepConfig, run_dir: str | Path, *, process_index: int = 0, num_processes: int = 1,
              device: Any = "cpu", progress: bool = True, command: list[str] | None = None) -> SweepOutcome:
    """Run this process's shard (every ``num_processes``-th cell from ``process_index``), skipping
    finished cells; the last process to find every cell finished stamps the manifest complete."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    manifest = _check_run_dir(run_dir, config)
    cells = config.cells()
    if process_index == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": config.name,
            "config": config.resolved,
            "config_hash": config.config_hash,
            "cells": [cell.cell_id for cell in cells],
            "versions": library_versions(),
            "git": git_commit(),
            "command": command or sys.argv,
            "num_processes": num_processes,
            "batch_configs": config.batch_configs,
            "started": (manifest or {}).get("started") or _now(),
            "resumed": (manifest or {}).get("resumed", []) + ([_now()] if manifest else []),
            "finished": None,
        }
        write_json(run_dir / MANIFEST, manifest)
        _atomic_write(run_dir / RESOLVED_CONFIG, lambda handle: handle.write(
            yaml.safe_dump(config.resolved, sort_keys=False).encode()))
    units = shard_units(stack_units(cells, config.batch_configs), process_index, num_processes)
    mine = [cell for unit in units for cell in unit]
    todo_units = [[cell for cell in unit if not is_finished(run_dir, cell.cell_id)] for unit in units]
    pending = {cell.cell_id for unit in todo_units for cell in unit}
    skipped = [cell.cell_id for cell in mine if cell.cell_id not in pending]
    ran = []
    bar = tqdm(total=len(mine), initial=len(skipped), desc=f"sweep {config.name} [{process_index + 1}/{num_processes}]",
               unit="cell", position=process_index, disable=not progress, dynamic_ncols=True)
    try:
        for todo in todo_units:
            if not todo:
                continue
            names = ", ".join(cell.cell_id for cell in todo)
            bar.set_postfix_str(names if len(todo) == 1 else f"{todo[0].cell_id} +{len(todo) - 1} stacked", refresh=True)
            started = time.perf_counter()
            try:
                if len(todo) == 1:
                    results = [protocols.run_cell(todo[0], run_dir, device=device)]
                else:
                    results = protocols.run_cells_stacked(todo, run_dir, device=device)
            except Exception as error:
                raise RuntimeError(f"{'cell' if len(todo) == 1 else 'stacked cells'} {names} failed: {error}") from error
            elapsed = (time.perf_counter() - started) / len(todo)
            for result in results:
                result.record["process_index"] = process_index
                result.record["wall_time_s"] = elapsed
                save_cell(run_dir, result)
                ran.append(result.record["cell_id"])
                bar.update(1)
    finally:
        bar.close()
    complete = all(is_finished(run_dir, cell.cell_id) for cell in cells)
    if complete:
        manifest = json.loads((run_dir / MANIFEST).read_text())
        if manifest.get("finished") is None:
            manifest["finished"] = _now()
            write_json(run_dir / MANIFEST, manifest)
    return SweepOutcome(run_dir, ran, skipped, len(cells), complete)


def distributed_shard() -> tuple[int, int, Any]:
    """(process_index, num_processes, device) from accelerate's PartialState.

    Without CUDA, ``PartialState(cpu=True)`` so that processes started by ``accelerate launch``
    (torchrun) join a gloo group and see their ranks instead of each believing it is alone.
    """
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and state.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but accelerate sees {state.num_processes}; "
                           f"each process would run every cell")
    return state.process_index, state.num_processes, state.device


def describe_cells(config: SweepConfig, run_dir: Path | None = None) -> str:
    """One line per cell (for ``--dry-run``): id and whether it is finished."""
    lines = []
    for cell in config.cells():
        state = ""
        if run_dir is not None:
            state = "done " if is_finished(run_dir, cell.cell_id) else "todo "
        lines.append(f"{state}{cell.cell_id}")
    return "\n".join(lines)


def main(args) -> int:
    """The ``chronovisor sweep`` command (see :func:`chronovisor.cli._add_sweep`)."""
    try:
        config = load_config(args.config, args.set or [])
    except ConfigError as error:
        print(f"chronovisor sweep: invalid config {args.config}: {error}", file=sys.stderr)
        return 2
    run_dir = Path(args.out)
    if args.dry_run:
        try:
            _check_run_dir(run_dir, config)
        except ConfigError as error:
            print(f"chronovisor sweep: {error}", file=sys.stderr)
            return 2
        print(describe_cells(config, run_dir if run_dir.is_dir() else None))
        return 0
    process_index, num_processes, device = distributed_shard()
    try:
        outcome = run_sweep(config, run_dir, process_index=process_index, num_processes=num_processes,
                            device=device, progress=not args.no_progress, command=sys.argv)
    except ConfigError as error:
        print(f"chronovisor sweep: {error}", file=sys.stderr)
        return 2
    print(f"[{process_index + 1}/{num_processes}] ran {len(outcome.ran)} cells, skipped {len(outcome.skipped)} "
          f"finished; run {'complete' if outcome.complete else 'incomplete'} ({outcome.total_cells} cells) "
          f"in {run_dir}", file=sys.stderr)
    return 0
