"""The P×T field equations, as pure functions of tensors.

Every function works on ``[..., L, E]`` tensors (layers × experts, with any leading dimensions,
e.g. a configuration axis), so the single controller and a stacked multi-configuration one share
exactly this code. Nothing here reads a tensor back to the host.

Notation: ``U`` usage, ``p = U / Σ_k U`` usage share, ``N`` experts, ``R`` coherence.
"""

from __future__ import annotations

import math

import torch

from chronovisor.controllers.config import PTConfig

TWO_PI = 2.0 * math.pi


def usage_share(usage: torch.Tensor) -> torch.Tensor:
    """p[..., k] = U_k / Σ_j U_j, and all zero while Σ_j U_j = 0.  ``[..., E] -> [..., E]``."""
    total = usage.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, usage / torch.where(total > 0, total, 1.0), 0.0)


def pressure(usage: torch.Tensor, scale: torch.Tensor | float, gain: float) -> torch.Tensor:
    """Fast pressure b = P · clip(gain · (1/N − p), −1, 1); zero while no usage was seen.

    Under-used experts (p < 1/N) get positive pressure, so |b| ≤ P = ``scale`` (a float or a
    tensor broadcastable against ``usage``).  ``[..., E] -> [..., E]``.
    """
    num_experts = usage.shape[-1]
    seen = usage.sum(dim=-1, keepdim=True) > 0
    raw = (gain * (1.0 / num_experts - usage_share(usage))).clamp(-1.0, 1.0)
    return torch.where(seen, raw, 0.0) * scale


def coherence(phases: torch.Tensor) -> torch.Tensor:
    """Kuramoto order parameter R = |mean over layers and experts of e^{iφ}|.

    ``[..., L, E] -> [..., 1, 1]`` (kept broadcastable against the fields).
    """
    cos = torch.cos(phases).mean(dim=(-2, -1), keepdim=True)
    sin = torch.sin(phases).mean(dim=(-2, -1), keepdim=True)
    return torch.sqrt(cos * cos + sin * sin)


def advance_phases(phases: torch.Tensor, counts: torch.Tensor, weight_sums: torch.Tensor,
                   step: float) -> torch.Tensor:
    """φ ← (φ + step · mean routing weight of this tick's selections) mod 2π; unselected experts stay."""
    mean_weight = weight_sums / counts.clamp_min(1.0)
    return torch.remainder(phases + step * mean_weight, TWO_PI)


def fast_temperature(usage: torch.Tensor, coherence_value: torch.Tensor, config: PTConfig) -> torch.Tensor:
    """T_fast = clip(T0 (1 + β_R(1−R)) (1 + β_d d_k / max_j d_j) (1 + β_rel (1 − rel_k)), T_min, T_max).

    d_k = |p_k − 1/N| (divisor 1 when max d = 0); rel_k = U_k / max_j U_j (1 while Σ U = 0).
    ``usage [..., L, E]``, ``coherence_value`` broadcastable (``[..., 1, 1]``) ``-> [..., L, E]``.
    """
    num_experts = usage.shape[-1]
    deviation = (usage_share(usage) - 1.0 / num_experts).abs()
    max_deviation = deviation.amax(dim=-1, keepdim=True)
    relative_deviation = deviation / torch.where(max_deviation > 0, max_deviation, 1.0)
    max_usage = usage.amax(dim=-1, keepdim=True)
    reliability = torch.where(max_usage > 0, usage / torch.where(max_usage > 0, max_usage, 1.0), 1.0)
    temperature = (
        config.base_temperature
        * (1.0 + config.beta_coherence * (1.0 - coherence_value))
        * (1.0 + config.beta_deviation * relative_deviation)
        * (1.0 + config.beta_reliability * (1.0 - reliability))
    )
    return temperature.clamp(config.fast_temperature_min, config.fast_temperature_max)


def ema(field: torch.Tensor, target: torch.Tensor, rate: torch.Tensor | float) -> torch.Tensor:
    """(1 − rate) · field + rate · target."""
    return field + rate * (target - field)


def paper_temperature_target(usage: torch.Tensor, kappa: float) -> torch.Tensor:
    """The write-up's target f(u) = 1 + tanh(κ (u − 1/N)); 1 while no usage was seen."""
    num_experts = usage.shape[-1]
    seen = usage.sum(dim=-1, keepdim=True) > 0
    target = 1.0 + torch.tanh(kappa * (usage_share(usage) - 1.0 / num_experts))
    return torch.where(seen, target, 1.0)


def commitment_credit(loss_window: torch.Tensor, scale: float) -> torch.Tensor:
    """Delayed-commitment credit c ∈ [0, 1] from the last 2W losses (oldest first, NaN = no signal).

    c = clip(scale · (mean(older W) − mean(newer W)) / |mean(older W)|, 0, 1): the relative
    improvement of the mean loss over the last W ticks versus the W before. A half with no
    finite loss gives c = 0, so without a loss signal nothing commits.  ``[..., 2W] -> [..., 1, 1]``.
    """
    window = loss_window.shape[-1] // 2
    older = torch.nanmean(loss_window[..., :window], dim=-1)
    newer = torch.nanmean(loss_window[..., window:], dim=-1)
    improvement = (older - newer) / older.abs().clamp_min(1e-12)
    credit = torch.nan_to_num(scale * improvement, nan=0.0, posinf=0.0, neginf=0.0)
    return credit.clamp(0.0, 1.0)[..., None, None]


def loss_free_bias_update(counts: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek's sign rule increment u · sign(mean load − load_k) for this tick's loads ``[..., E]``."""
    return rate * torch.sign(counts.mean(dim=-1, keepdim=True) - counts)
