"""The sweep config: read, expanded, overridden and validated here, and only here.

Schema (every key optional unless marked; unknown keys are errors)::

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
      mode: [pt]                         # placebo | pressure | temperature | pt | loss_free
                                     # | aux_loss (| off)
    batch_configs: 9                 # frozen only, opt-in: run up to 9 cells of a seed in one
                                     # stacked forward (a stack); default 1 = one at a time

``mode: loss_free`` means DeepSeek's comparator (``dynamics=loss_free``, ``mode=pressure``).
``mode: aux_loss`` is the standard baseline: the controller off, the model trained on CE plus its
family's auxiliary load-balancing loss and router z-loss (``joint`` only; the other PTConfig fields
of that grid combination do not apply to it). The off arm of every (model, seed) is always run, once, and shared by all cells of that seed.
``${NAME}`` (or ``${NAME:-default}``) in any string is replaced by the environment variable;
``--set key.sub=value`` (value parsed as YAML) edits the config before validation. Floats written
``1e-4`` (which YAML reads as a string) are accepted. Types are checked against the annotations of
the specs and of PTConfig; ranges by the specs' and PTConfig's own checks (every grid combination
included), all before any work, with errors naming the key.

``batch_configs`` is an execution setting, not part of the experiment (the cells are the same up
to float32 rounding), so it is left out of the config hash: a run can be resumed with or without it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chronovisor.controllers import PTConfig
from chronovisor.eval.config_types import build, check_value, field_types, section_values
from chronovisor.eval.errors import ConfigError
from chronovisor.eval.overrides import apply_overrides, expand_env
from chronovisor.eval.specs import (
    AUX_LOSS,
    OFF,
    PROTOCOLS,
    VARIANTS,
    CellSpec,
    Contrast,
    DataSpec,
    EvalSpec,
    LoadSpec,
    TrainSpec,
    arm_name,
    stable_hash,
    variant_arm,
    variant_config,
)
from chronovisor.eval.synthetic import ConversationConfig

_TOP_LEVEL = ("name", "protocol", "models", "model", "seeds", "primary", "data", "train", "eval", "load", "controller",
              "grid", "batch_configs")
# Top-level keys that change how cells are run, not their results: left out of the config hash.
_EXECUTION_KEYS = ("batch_configs",)
# PTConfig fields a config may not set: the seed comes from ``seeds``, learnable from the protocol.
_RESERVED_CONTROLLER_FIELDS = {
    "seed": "the controller seed is the cell's seed; list seeds at the top level",
    "learnable": "set by the protocol (True for controller_only, False otherwise)",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: the resolved config and the specs every cell shares.

    Attributes:
        stack_size: the config's ``batch_configs``: at most this many cells per stack.
        primary: the contrasts declared before running (``primary: [pt - off]``): the report applies
            Holm's correction across them and labels every other comparison exploratory.
        resolved: the config as plain data after defaults (written to the run directory, hashed).
    """

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
    stack_size: int = 1
    primary: tuple[Contrast, ...] = ()

    @property
    def config_hash(self) -> str:
        return stable_hash({key: value for key, value in self.resolved.items() if key not in _EXECUTION_KEYS})

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

    def pt_configs(self, seed: int) -> list[PTConfig]:
        """The PTConfig of every controller arm of ``seed``, in grid order (not ``off``, not ``aux_loss``)."""
        return [config for config, _ in self.arms(seed) if config is not None]

    def arms(self, seed: int) -> list[tuple[PTConfig | None, str]]:
        """``(pt_config, objective)`` of every arm of ``seed`` but the off arm, deduplicated, in grid
        order (:func:`~chronovisor.eval.specs.variant_arm`; ``aux_loss`` is ``(None, "aux_loss")``)."""
        learnable = self.protocol == "controller_only"
        arms: list[tuple[PTConfig | None, str]] = []
        for setting in self.controller_settings():
            if setting["mode"] == OFF:
                continue
            fields = {k: v for k, v in setting.items() if k != "mode"}
            arm = variant_arm(setting["mode"], **fields, seed=seed, learnable=learnable)
            if arm not in arms:
                arms.append(arm)
        return arms

    def cells(self) -> list[CellSpec]:
        """Every cell of the sweep (on arms and their shared off arms), deduplicated, in a fixed order:
        by seed, then model, the off arm first, then the grid order."""
        cells: dict[str, CellSpec] = {}
        for seed in self.seeds:
            for model in self.models:
                common = dict(protocol=self.protocol, model=model, seed=seed, data=self.data, train=self.train,
                              eval=self.eval, load=self.load)
                for config, objective in [(None, "ce"), *self.arms(seed)]:
                    cell = CellSpec(pt_config=config, objective=objective, **common)
                    cells.setdefault(cell.cell_id, cell)
        return list(cells.values())


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> SweepConfig:
    """Read, expand (``${ENV}``), override (``--set``) and validate a YAML sweep config.

    Args:
        path: the YAML file.
        overrides: ``KEY=VALUE`` strings (see :func:`apply_overrides`).

    Raises:
        ConfigError: one line naming the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    try:
        raw = apply_overrides(raw if raw is not None else {}, overrides)
        return parse_config(expand_env(raw, ""), name=path.stem)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


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
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    models = _models(raw)
    seeds = _seeds(raw)
    data = _data(raw.get("data"))
    train = build(TrainSpec, section_values(TrainSpec, raw.get("train"), "train"), "train")
    evaluation = build(EvalSpec, section_values(EvalSpec, raw.get("eval"), "eval"), "eval")
    load = build(LoadSpec, section_values(LoadSpec, raw.get("load"), "load"), "load")
    controller = _controller(raw)
    grid = _grid(raw)
    stack_size = _stack_size(raw, protocol, evaluation)
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
        resolved["batch_configs"] = stack_size
    primary = _primary(raw)
    if primary:
        resolved["primary"] = [contrast.name for contrast in primary]
    config = SweepConfig(label, protocol, models, seeds, data, train, evaluation, load, controller, grid, resolved,
                         stack_size, primary)
    _check_arms(config)
    _check_primary(config)
    _check_fits(config)
    return config


def parse_resolved(resolved: dict[str, Any], name: str = "sweep") -> SweepConfig:
    """Validate a config a run directory saved (its ``config.yaml``, :attr:`SweepConfig.resolved`)
    again: the generator fields go back directly under ``data`` (for synthetic data they carry
    ``max_length``), then :func:`parse_config`."""
    raw = dict(resolved)
    data = dict(raw.get("data") or {})
    generator = data.pop("generator", None) or {}
    if data.get("source", DataSpec.source) == "synthetic":
        data.pop("max_length", None)
    raw["data"] = {**data, **generator}
    return parse_config(raw, name=name)


def _data(section: Any) -> DataSpec:
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
def _primary(raw: dict[str, Any]) -> tuple[Contrast, ...]:
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


def _check_primary(config: SweepConfig) -> None:
    """Every arm a primary contrast names must be exactly one setting of the grid (or ``off``)."""
    arms = [arm_name(pt_config, objective) for pt_config, objective in config.arms(config.seeds[0])]
    for index, contrast in enumerate(config.primary):
        for arm in (contrast.arm, contrast.against):
            if arm != OFF and arms.count(arm) != 1:
                found = "is not an arm of the grid" if not arms.count(arm) else f"names {arms.count(arm)} settings"
                raise ConfigError(f"primary[{index}]: '{arm}' {found}; arms: {', '.join([OFF, *dict.fromkeys(arms)])}")


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


def _controller(raw: dict[str, Any]) -> dict[str, Any]:
    values = raw.get("controller") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"controller: expected a mapping of PTConfig fields, got {type(values).__name__}")
    types = field_types(PTConfig)
    return {key: _controller_value(key, value, f"controller.{key}", types) for key, value in values.items()}


def _grid(raw: dict[str, Any]) -> tuple[dict[str, tuple], ...]:
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


def _stack_size(raw: dict[str, Any], protocol: str, evaluation: EvalSpec) -> int:
    value = raw.get("batch_configs", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"batch_configs: expected an integer >= 1 (configurations per stacked forward), got {value!r}")
    if value > 1 and protocol != "frozen":
        raise ConfigError(f"batch_configs: only the frozen protocol can stack configurations (protocol is {protocol}); "
                          f"remove the key or set it to 1")
    if value > 1 and evaluation.streaming:
        raise ConfigError("batch_configs: eval.streaming ticks per turn of one conversation and cannot be stacked")
    return value


# ------------------------------------------------------------------------ cross-key checks
def _check_arms(config: SweepConfig) -> None:
    """At least one arm besides off, every grid combination a valid PTConfig for the protocol, and
    ``aux_loss`` only where it can act (``joint``, models whose config has ``router_aux_loss_coef``)."""
    settings = config.controller_settings()
    if all(setting["mode"] == OFF for setting in settings):
        raise ConfigError("grid.mode: no arm besides 'off'; list placebo, pressure, temperature, pt, loss_free "
                          "or aux_loss")
    learnable = config.protocol == "controller_only"
    for setting in settings:
        if setting["mode"] == OFF:
            continue
        if setting["mode"] == AUX_LOSS:
            _check_aux_loss(config)
            continue
        fields = {key: value for key, value in setting.items() if key != "mode"}
        try:
            variant_config(setting["mode"], **fields, learnable=learnable)
        except ValueError as error:
            shown = ", ".join(f"{key}={value}" for key, value in setting.items())
            raise ConfigError(f"grid/controller ({shown}): {error}") from None


def _check_aux_loss(config: SweepConfig) -> None:
    """``mode: aux_loss`` trains the model weights on the router losses: ``joint`` only, and every
    model's config must carry ``router_aux_loss_coef`` (hub ids are checked when loaded)."""
    if config.protocol != "joint":
        raise ConfigError(f"grid.mode: aux_loss needs protocol joint (protocol {config.protocol} trains no model "
                          f"weights, so a router loss cannot act); remove it from the grid")
    for model in config.models:
        values = _model_config(model)
        if values and values.get("router_aux_loss_coef") is None:
            raise ConfigError(f"grid.mode: aux_loss needs router_aux_loss_coef in the config of {model} "
                              f"(its family defines no auxiliary load-balancing loss)")


def _check_fits(config: SweepConfig) -> None:
    """Protocol, data and models agree: steps, warm-up stream, vocabulary, streaming, data file."""
    protocol, data = config.protocol, config.data
    if protocol in ("joint", "controller_only") and config.train.steps < 1:
        raise ConfigError(f"train.steps: protocol {protocol} needs at least one step")
    if protocol == "frozen" and data.num_warmup < 1:
        raise ConfigError("data.num_warmup: protocol frozen needs a warm-up stream of at least one conversation")
    if data.source == "synthetic":
        for model in config.models:
            vocab = _model_config(model).get("vocab_size")
            if vocab is not None and data.conversation_config.vocab_size > vocab:
                raise ConfigError(f"data.vocab_size: {data.conversation_config.vocab_size} token ids do not fit the "
                                  f"{vocab}-token vocabulary of {model}")
    if config.eval.streaming:
        for model in config.models:
            if _model_config(model).get("is_encoder_decoder", False):
                raise ConfigError(f"eval.streaming: {model} is an encoder-decoder model; streaming evaluation "
                                  f"needs a decoder-only one")
    if data.source == "jsonl" and not Path(data.path).expanduser().is_file():
        raise ConfigError(f"data.path: file not found: {data.path}")


def _model_config(model: str) -> dict[str, Any]:
    """The HF config of a preset or model directory as a dict (a hub id: {} — known only once loaded)."""
    from chronovisor.wrappers.toy import TOY_PRESETS, toy_config

    if model in TOY_PRESETS:
        return toy_config(model).to_dict()
    config_file = Path(model).expanduser() / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}
