"""PTConfig: every knob of the P×T controller, validated at construction.

Defaults are the reference code's constants (its code, where its docs differ).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MODES = ("off", "pressure", "temperature", "pt")
DYNAMICS = ("reference", "paper", "delayed", "loss_free")
USAGE_KINDS = ("cumulative", "ema")
PAPER_COUPLINGS = ("divide", "bias")


@dataclass(frozen=True)
class PTConfig:
    """Configuration of a :class:`~chronovisor.controllers.PTController`.

    Main knobs:
        eta: geological (slow-field) rate η; the global field moves at ``eta * eta_global_factor``.
        pressure_scale: P, the bound on the pressure |b| ≤ P.
        mode: which fields reach the router: ``off`` (identity, statistics still recorded),
            ``pressure`` (b only), ``temperature`` (T only), ``pt`` (both).
        dynamics: ``reference`` (the reference code's math), ``paper`` (the write-up's EMA form),
            ``delayed`` (reference, but T̄ commits only in proportion to loss-improvement credit),
            ``loss_free`` (DeepSeek's auxiliary-loss-free sign rule; selection-only bias).
        usage: ``cumulative`` (lifetime counts, the reference's "fossilized" headline runs) or ``ema``.
        update_every: b, T_fast and T̄ recompute every this many ticks (usage and phases every tick).
        seed: seeds the controller's own generator (initial oscillator phases).
        learnable: add zero-initialised trainable offsets δb[l,k] and δlogT[l,k].
    """

    eta: float = 0.015
    pressure_scale: float = 0.5
    mode: str = "pt"
    dynamics: str = "reference"
    usage: str = "cumulative"
    usage_decay: float = 0.95
    update_every: int = 5
    seed: int = 0
    learnable: bool = False

    # Constants of the reference code.
    eta_global_factor: float = 0.5
    pressure_gain: float = 2.0
    phase_step: float = 0.1
    base_temperature: float = 1.0
    beta_coherence: float = 0.5
    beta_deviation: float = 0.3
    beta_reliability: float = 0.2
    fast_temperature_min: float = 0.3
    fast_temperature_max: float = 3.0
    temperature_min: float = 0.1
    temperature_max: float = 10.0

    # `paper` preset: T̄ target f(u) = 1 + tanh(κ (u − 1/N)); coupling (ℓ + b)/T̄ or ℓ + b/T̄.
    paper_kappa: float = 10.0
    paper_coupling: str = "divide"

    # `delayed` preset: credit c = clip(scale · (mean(prev W losses) − mean(last W)) / mean(prev W), 0, 1).
    credit_window: int = 10
    credit_scale: float = 10.0

    # `loss_free` preset: b ← b + u · sign(mean load − load_k) each tick.
    loss_free_rate: float = 0.001

    def __post_init__(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"PTConfig.{name}: {message} (got {getattr(self, name)!r})")

        for name, choices in (
            ("mode", MODES),
            ("dynamics", DYNAMICS),
            ("usage", USAGE_KINDS),
            ("paper_coupling", PAPER_COUPLINGS),
        ):
            if getattr(self, name) not in choices:
                fail(name, f"must be one of {', '.join(choices)}")
        for name in (
            "eta", "pressure_scale", "usage_decay", "eta_global_factor", "pressure_gain", "phase_step",
            "base_temperature", "beta_coherence", "beta_deviation", "beta_reliability",
            "fast_temperature_min", "fast_temperature_max", "temperature_min", "temperature_max",
            "paper_kappa", "credit_scale", "loss_free_rate",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(name, "must be a finite number")
        for name in ("eta", "usage_decay", "eta_global_factor"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "must lie in [0, 1]")
        for name in ("pressure_scale", "pressure_gain", "phase_step", "beta_coherence", "beta_deviation",
                     "beta_reliability", "paper_kappa", "credit_scale", "loss_free_rate"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        for name in ("base_temperature", "fast_temperature_min", "temperature_min"):
            if getattr(self, name) <= 0:
                fail(name, "must be > 0")
        if self.fast_temperature_max < self.fast_temperature_min:
            fail("fast_temperature_max", "must be >= fast_temperature_min")
        if self.temperature_max < self.temperature_min:
            fail("temperature_max", "must be >= temperature_min")
        for name in ("update_every", "credit_window", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, "must be an integer")
        if not -(2**63) <= self.seed < 2**63:
            fail("seed", "must lie in [-2**63, 2**63) (a torch generator seed)")
        if self.update_every < 1:
            fail("update_every", "must be >= 1")
        if self.credit_window < 1:
            fail("credit_window", "must be >= 1")
        if not isinstance(self.learnable, bool):
            fail("learnable", "must be a bool")
        if self.dynamics == "paper" and self.usage != "ema":
            fail("usage", "the paper dynamics is defined on the EMA usage share u; set usage='ema'")
        if self.dynamics == "loss_free" and self.mode == "temperature":
            fail("mode", "the loss_free dynamics has no temperature field; use off, pressure or pt")

    def replace(self, **changes: Any) -> PTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"PTConfig: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
        return cls(**data)
