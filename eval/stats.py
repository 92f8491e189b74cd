"""Seed-level statistics for paired controller-on vs controller-off runs.

Each seed gives one paired difference (same init, data and order; controller on minus off). With
the 3–10 seeds a sweep can afford, report intervals and exact tests rather than mean ± SD:
Wilson intervals for success fractions, a paired bootstrap CI for the mean difference, a Wilcoxon
signed-rank p-value, and Holm's correction across the cells of a grid (field-anchors.md §5).
Undefined results (too few seeds, no non-zero difference) come back as NaN with a stated reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 10_000


def _values(values) -> np.ndarray:
    return np.asarray(values, dtype=float).reshape(-1)


def wilson_interval(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval (no continuity correction) for k successes out of n trials."""
    if n < 1:
        raise ValueError(f"n must be at least 1 (got {n})")
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, n={n}] (got {k})")
    interval = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


@dataclass(frozen=True)
class BootstrapCI:
    """Mean of paired differences with a bootstrap interval; ``reason`` explains a NaN interval."""

    mean: float
    low: float
    high: float
    n: int
    reason: str = ""


def paired_bootstrap_ci(
    deltas,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    method: str = "percentile",
) -> BootstrapCI:
    """Bootstrap CI of the mean of per-seed paired differences (on − off).

    Resampling the differences resamples whole pairs, which is the paired bootstrap. ``method`` is
    passed to ``scipy.stats.bootstrap`` ("percentile", "basic" or "BCa"); percentile is the default
    because BCa's acceleration estimate is unstable with a handful of seeds.
    """
    values = _values(deltas)
    if np.isnan(values).any():
        raise ValueError("deltas contain NaN; drop or fix failed runs before bootstrapping")
    if len(values) == 0:
        return BootstrapCI(math.nan, math.nan, math.nan, 0, "no seeds")
    mean = float(values.mean())
    if len(values) == 1:
        return BootstrapCI(mean, math.nan, math.nan, 1, "one seed: resampling it has no variability")
    if np.all(values == values[0]):
        # Every resample has the same mean; scipy would warn about a degenerate distribution.
        return BootstrapCI(mean, mean, mean, len(values), "all differences equal: zero-width interval")
    result = stats.bootstrap(
        (values,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method=method,
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return BootstrapCI(mean, float(interval.low), float(interval.high), len(values))


@dataclass(frozen=True)
class SignedRank:
    """Two-sided Wilcoxon signed-rank test of paired differences; ``reason`` explains a NaN p."""

    statistic: float
    p_value: float
    n: int
    reason: str = ""


def signed_rank_p(deltas) -> SignedRank:
    """Wilcoxon signed-rank test (two-sided, zero differences dropped; exact for small n in scipy)."""
    values = _values(deltas)
    if np.isnan(values).any():
        raise ValueError("deltas contain NaN; drop or fix failed runs before testing")
    nonzero = values[values != 0]
    if len(values) < 2:
        return SignedRank(math.nan, math.nan, len(values), "fewer than two seeds")
    if len(nonzero) == 0:
        return SignedRank(math.nan, math.nan, len(values), "all differences are zero")
    result = stats.wilcoxon(nonzero)
    return SignedRank(float(result.statistic), float(result.pvalue), len(values))


def holm_correction(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error), same order as given; NaN stays NaN.

    Sorting the m finite p-values ascending, p̃_(i) = max_{j <= i} min(1, (m − j + 1) · p_(j)).
    NaN entries (untestable cells) are left out of m.
    """
    values = _values(pvalues)
    adjusted = np.full_like(values, math.nan)
    finite = np.flatnonzero(~np.isnan(values))
    if np.any((values[finite] < 0) | (values[finite] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    order = finite[np.argsort(values[finite], kind="stable")]
    m = len(order)
    scaled = np.minimum(1.0, (m - np.arange(m)) * values[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


@dataclass(frozen=True)
class Robustness:
    """Fraction of seeds where the controller improved both loss and excess separation."""

    successes: int
    n: int
    fraction: float
    low: float
    high: float


def robustness(delta_loss, delta_excess_separation, confidence: float = DEFAULT_CONFIDENCE) -> Robustness:
    """Share of seeds with Δloss < 0 and Δexcess-separation > 0, with a Wilson interval.

    A NaN difference (a diverged or failed run) counts as no improvement.
    """
    loss, excess = _values(delta_loss), _values(delta_excess_separation)
    if loss.shape != excess.shape:
        raise ValueError(f"delta_loss has {len(loss)} seeds but delta_excess_separation has {len(excess)}")
    successes = int(np.sum((loss < 0) & (excess > 0)))
    low, high = wilson_interval(successes, len(loss), confidence)
    return Robustness(successes, len(loss), successes / len(loss), low, high)


def iqm(values) -> float:
    """Interquartile mean: the mean of the middle 50% (25% trimmed from each end)."""
    return float(stats.trim_mean(_values(values), 0.25))


def probability_of_improvement(x, y) -> float:
    """P(X > Y) + ½·P(X = Y) over all pairs (Mann–Whitney U / (n_x·n_y)).

    For losses, where lower is better, pass (loss_off, loss_on) to get P(on beats off).
    """
    first, second = _values(x), _values(y)
    if len(first) == 0 or len(second) == 0:
        raise ValueError("probability_of_improvement needs at least one value in each sample")
    return float(stats.mannwhitneyu(first, second).statistic / (len(first) * len(second)))
