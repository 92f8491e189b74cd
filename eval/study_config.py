"""The ``chronovisor study`` config: the frozen real-text study's arms, adaptation streams, budgets and seeds.

Schema (every key optional but ``base``; unknown keys are errors)::

    name: realtext_study
    base: runs/realtext              # a `chronovisor pretrain` run directory (model/ and corpus/)
    seeds: 5                         # a count (0..n-1) or a list
    threads: 2
    arms: [off, placebo, pt, controller_only, router_only, lora]
    adapt: [mixed, prose, code]      # the stream each arm adapts on (mixed: both domains)
    steps: 40                        # adaptation batches: warm-up ticks (placebo, pt) or AdamW steps
    batch_size: 8                    # blocks per adaptation batch
    eval_blocks: 48                  # held-out blocks per domain, drawn per seed
    eval_batch_size: 16
    eta: 0.015                       # the controller (placebo, pt, controller_only)
    pressure_scale: 0.5
    controller_lr: 0.01              # controller_only: the offsets
    router_lr: 0.001                 # router_only: the router weights
    lora_lr: 0.001                   # lora: the adapters
    lora_rank: 4                     # lora: rank on q/k/v/o projections of every layer
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chronovisor.eval.config_types import build, section_values
from chronovisor.eval.corpus import DOMAINS
from chronovisor.eval.errors import ConfigError
from chronovisor.eval.overrides import load_config_file

OFF_ARM = "off"
#: Every arm of the study; ``off`` is the paired reference and always runs.
STUDY_ARMS = ("off", "placebo", "pt", "controller_only", "router_only", "lora")
#: Adaptation streams: both domains' training blocks, or one domain's.
ADAPT_STREAMS = ("mixed", *DOMAINS)


@dataclass(frozen=True)
class StudyConfig:
    """A validated study config (see the module docstring)."""

    base: str
    name: str = "realtext_study"
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    threads: int = 2
    arms: list[str] = dataclasses.field(default_factory=lambda: list(STUDY_ARMS))
    adapt: list[str] = dataclasses.field(default_factory=lambda: list(ADAPT_STREAMS))
    steps: int = 40
    batch_size: int = 8
    eval_blocks: int = 48
    eval_batch_size: int = 16
    eta: float = 0.015
    pressure_scale: float = 0.5
    controller_lr: float = 0.01
    router_lr: float = 1e-3
    lora_lr: float = 1e-3
    lora_rank: int = 4

    def __post_init__(self) -> None:
        unknown = [arm for arm in self.arms if arm not in STUDY_ARMS]
        if unknown or OFF_ARM not in self.arms:
            raise ValueError(f"arms must include off and be drawn from {', '.join(STUDY_ARMS)} (got {self.arms})")
        if not self.adapt or any(stream not in ADAPT_STREAMS for stream in self.adapt):
            raise ValueError(f"adapt must be a non-empty list from {', '.join(ADAPT_STREAMS)} (got {self.adapt})")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
            raise ValueError(f"seeds must be a count or a non-empty list of integers (got {self.seeds})")
        for name in ("threads", "steps", "batch_size", "eval_blocks", "eval_batch_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_study_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Read and validate a study config (``--set key=value`` applied, ``${ENV}`` expanded).

    Args:
        path: the YAML file (its stem is the default name).
        overrides: ``KEY=VALUE`` strings (value parsed as YAML).

    Raises:
        ConfigError: one line naming the file and the key.
    """
    return load_config_file(path, overrides, "study config", parse_study_config)


def parse_study_config(raw: Any, name: str) -> StudyConfig:
    """Validate a parsed study config; ``name`` is the default ``name``; ``seeds: N`` means 0..N−1."""
    values = section_values(StudyConfig, raw, "study")
    values.setdefault("name", name)
    if "base" not in values:
        raise ConfigError("base: required: the `chronovisor pretrain` run directory (model/ and corpus/)")
    if isinstance(values.get("seeds"), int) and not isinstance(values["seeds"], bool):
        values["seeds"] = list(range(values["seeds"]))
    return build(StudyConfig, values, "study")
