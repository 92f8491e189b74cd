"""The sweep config: read, expanded, overridden and validated here, and only here.

Schema (every key optional unless marked; unknown keys are errors)::

    name: quickstart                 # label (default: the file name)
    protocol: joint                  # joint | frozen | controller_only   (required)
    models: [mixtral-tiny]           # (required; ``model:`` for one) toy preset names, model
                                     # directories (with config.json) or hub ids (org/name)
    seeds: 3                         # a count (0..n-1) or a list of integers (required)
    data:    {source, num_train, num_heldout, num_warmup, path, tokenizer, max_length,
              heldout_fraction, + any ConversationConfig field: vocab_size, min_length, ...}
    train:   {steps, lr, weight_decay, batch_size, pretrain_steps, controller_lr, compile}
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

``batch_configs`` and ``train.compile`` are execution settings, not part of the experiment (the
cells are the same up to float32 rounding), so they are left out of the config hash: a run can be
resumed with or without them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chronovisor.controllers import PTConfig
from chronovisor.eval.config_keys import (
    parse_controller,
    parse_data,
    parse_grid,
    parse_models,
    parse_primary,
    parse_seeds,
    parse_stack_size,
)
from chronovisor.eval.config_types import build, section_values
from chronovisor.eval.errors import ConfigError
from chronovisor.eval.jsonl import read_conversations
from chronovisor.eval.overrides import load_config_file
from chronovisor.eval.specs import (
    AUX_LOSS,
    OFF,
    PROTOCOLS,
    CellSpec,
    Contrast,
    DataSpec,
    EvalSpec,
    LoadSpec,
    TrainSpec,
    arm_name,
    identifying_train_settings,
    stable_hash,
    variant_arm,
    variant_config,
)
from chronovisor.json_file import read_json_object

_TOP_LEVEL = ("name", "protocol", "models", "model", "seeds", "primary", "data", "train", "eval", "load", "controller",
              "grid", "batch_configs")
# Top-level keys that change how cells are run, not their results: left out of the config hash.
_EXECUTION_KEYS = ("batch_configs",)


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
        experiment = {key: value for key, value in self.resolved.items() if key not in _EXECUTION_KEYS}
        experiment["train"] = identifying_train_settings(experiment["train"])
        return stable_hash(experiment)

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
        overrides: ``KEY=VALUE`` strings (see :func:`~chronovisor.eval.overrides.apply_overrides`).

    Raises:
        ConfigError: one line naming the file and the key.
    """
    return load_config_file(path, overrides, "config file", parse_config)


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
    models = parse_models(raw)
    seeds = parse_seeds(raw)
    data = parse_data(raw.get("data"))
    train = build(TrainSpec, section_values(TrainSpec, raw.get("train"), "train"), "train")
    if train.compile and protocol == "frozen":
        raise ConfigError("train.compile: the frozen protocol trains nothing per cell; remove it, or use the "
                          "joint or controller_only protocol")
    evaluation = build(EvalSpec, section_values(EvalSpec, raw.get("eval"), "eval"), "eval")
    load = build(LoadSpec, section_values(LoadSpec, raw.get("load"), "load"), "load")
    controller = parse_controller(raw)
    grid = parse_grid(raw)
    stack_size = parse_stack_size(raw, protocol, evaluation)
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
    primary = parse_primary(raw)
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


# ------------------------------------------------------------------------ cross-key checks
def _check_primary(config: SweepConfig) -> None:
    """Every arm a primary contrast names must be exactly one setting of the grid (or ``off``)."""
    arms = [arm_name(pt_config, objective) for pt_config, objective in config.arms(config.seeds[0])]
    for index, contrast in enumerate(config.primary):
        for arm in (contrast.arm, contrast.against):
            if arm != OFF and arms.count(arm) != 1:
                found = "is not an arm of the grid" if not arms.count(arm) else f"names {arms.count(arm)} settings"
                raise ConfigError(f"primary[{index}]: '{arm}' {found}; arms: {', '.join([OFF, *dict.fromkeys(arms)])}")


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
    if data.source == "jsonl":
        try:
            read_conversations(Path(data.path).expanduser())
        except (OSError, ValueError) as error:
            raise ConfigError(f"data.path: {error}") from None
    from chronovisor.model import check_model_directory
    from chronovisor.wrappers.toy import TOY_PRESETS

    for index, model in enumerate(config.models):
        if model not in TOY_PRESETS and Path(model).expanduser().is_dir():
            try:
                check_model_directory(Path(model).expanduser())
            except ValueError as error:
                raise ConfigError(f"models[{index}]: {model}: {' '.join(str(error).split())}") from None


def _model_config(model: str) -> dict[str, Any]:
    """The HF config of a preset or model directory as a dict (a hub id: {} — known only once loaded)."""
    from chronovisor.wrappers.toy import TOY_PRESETS, toy_config

    if model in TOY_PRESETS:
        return toy_config(model).to_dict()
    config_file = Path(model).expanduser() / "config.json"
    if not config_file.is_file():
        return {}
    return read_json_object(config_file, ConfigError)
