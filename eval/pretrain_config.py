"""The ``chronovisor pretrain`` config: the corpus slice, the tokenizer, the MoE's shape and the training run.

Schema (every key optional; unknown keys are errors)::

    name: realtext                   # label (default: the file name)
    seed: 0                          # weights, block order
    threads: 2                       # torch CPU threads (recorded: float sums depend on it)
    max_sources_per_kind: null       # a corpus slice (tests); null = the whole corpus
    vocab_size: 4096                 # the BPE vocabulary
    model: {hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
            intermediate_size, num_local_experts, num_experts_per_tok, router_aux_loss_coef}
    train: {seq_len, batch_size, steps, lr, warmup_steps, weight_decay}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chronovisor.eval.config_types import build, check_value, section_values
from chronovisor.eval.errors import ConfigError
from chronovisor.eval.overrides import load_config_file


@dataclass(frozen=True)
class MoeShape:
    """The Mixtral architecture to pretrain (``MixtralConfig`` fields of the same names)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 256
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok must lie in [1, num_local_experts={self.num_local_experts}]")
        if self.router_aux_loss_coef < 0:
            raise ValueError("router_aux_loss_coef must be >= 0 (0 turns the load-balancing loss off)")


@dataclass(frozen=True)
class PretrainSchedule:
    """AdamW with linear warm-up then cosine decay to zero over ``steps`` batches of ``batch_size``
    blocks of ``seq_len`` tokens."""

    seq_len: int = 256
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must lie in [0, steps={self.steps}]")


@dataclass(frozen=True)
class PretrainConfig:
    """A validated pretraining config (see the module docstring)."""

    name: str = "realtext"
    seed: int = 0
    threads: int = 2
    max_sources_per_kind: int | None = None
    vocab_size: int = 4096
    model: MoeShape = field(default_factory=MoeShape)
    train: PretrainSchedule = field(default_factory=PretrainSchedule)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SCALARS = {"name": str, "seed": int, "threads": int, "max_sources_per_kind": int | None, "vocab_size": int}


def load_pretrain_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Read and validate a pretraining config (``--set key.sub=value`` applied, ``${ENV}`` expanded).

    Args:
        path: the YAML file (its stem is the default name).
        overrides: ``KEY=VALUE`` strings (value parsed as YAML).

    Raises:
        ConfigError: one line naming the file and the key.
    """
    return load_config_file(path, overrides, "pretrain config", parse_pretrain_config)


def parse_pretrain_config(raw: Any, name: str) -> PretrainConfig:
    """Validate a parsed pretraining config; ``name`` is the default ``name``."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a mapping")
    for key in raw:
        if key not in (*_SCALARS, "model", "train"):
            raise ConfigError(f"{key}: unknown key; known keys: {', '.join([*_SCALARS, 'model', 'train'])}")
    scalars = {key: check_value(raw[key], kind, key) for key, kind in _SCALARS.items() if key in raw}
    scalars.setdefault("name", name)
    model = build(MoeShape, section_values(MoeShape, raw.get("model"), "model"), "model")
    train = build(PretrainSchedule, section_values(PretrainSchedule, raw.get("train"), "train"), "train")
    if scalars.get("vocab_size", PretrainConfig.vocab_size) < 512:
        raise ConfigError("vocab_size: must be at least 512")
    return PretrainConfig(**scalars, model=model, train=train)
