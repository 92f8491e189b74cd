"""Specification of the seed-level statistics."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from chronovisor.eval.stats import (
    holm_correction,
    holm_family,
    minimum_detectable_effect,
    paired_contrast,
    paired_t_interval,
    paired_t_power,
    robustness,
    seeds_needed,
    signed_rank_p,
    wilson_interval,
)

# ----------------------------------------------------------------------------------------------
# Wilson interval
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (3, 3, (0.4385, 1.0)),
        (0, 10, (0.0, 0.2775)),
        (5, 10, (0.2366, 0.7634)),
    ],
)
def test_wilson_interval_matches_known_values(k, n, expected):
    assert wilson_interval(k, n) == pytest.approx(expected, abs=1e-4)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match="k must lie in"):
        wilson_interval(4, 3)
    with pytest.raises(ValueError, match="n must be at least 1"):
        wilson_interval(0, 0)


# ----------------------------------------------------------------------------------------------
# Paired t-interval
# ----------------------------------------------------------------------------------------------

COVERAGE_SAMPLES, COVERAGE_SEEDS = 20_000, 10


def t_interval_coverage(samples: np.ndarray, true_mean: float, confidence: float = 0.95) -> float:
    """Share of rows of samples [R, n] whose t-interval (closed form, vectorised) covers true_mean."""
    n = samples.shape[1]
    half_width = scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * samples.std(axis=1, ddof=1) / math.sqrt(n)
    return float(np.mean(np.abs(samples.mean(axis=1) - true_mean) <= half_width))


def test_t_interval_matches_scipys_t_interval_and_one_sample_t_test():
    deltas = [-1.2, 0.3, -0.8, -2.0, 0.1, -0.4]
    result = paired_t_interval(deltas, confidence=0.9)
    low, high = scipy_stats.t.interval(0.9, 5, loc=np.mean(deltas), scale=scipy_stats.sem(deltas))
    assert (result.low, result.high) == pytest.approx((low, high))
    assert result.p_value == pytest.approx(scipy_stats.ttest_1samp(deltas, 0.0).pvalue)
    assert (result.mean, result.sd, result.n) == pytest.approx((np.mean(deltas), np.std(deltas, ddof=1), 6))


def test_t_interval_equals_the_vectorised_oracle_used_for_the_coverage_simulation():
    deltas = np.random.default_rng(0).normal(size=(1, 10))
    result = paired_t_interval(deltas[0])
    half_width = scipy_stats.t.ppf(0.975, 9) * deltas.std(ddof=1) / math.sqrt(10)
    assert (result.low, result.high) == pytest.approx((deltas.mean() - half_width, deltas.mean() + half_width))


def test_t_interval_covers_the_mean_of_normal_differences_at_the_nominal_rate_with_ten_seeds():
    """Exact for normal data. 20 000 samples: binomial SE 0.0015, so ±0.006 is a 4-SE band that the
    percentile bootstrap's 89.5% misses by 30 SE."""
    samples = np.random.default_rng(1).normal(0.3, 2.0, size=(COVERAGE_SAMPLES, COVERAGE_SEEDS))
    assert abs(t_interval_coverage(samples, 0.3) - 0.95) <= 0.006


def test_t_interval_stays_close_to_nominal_for_skewed_differences_with_ten_seeds():
    """Gamma(shape 4) differences (skewness 1): the t-interval undercovers slightly, ≈ 0.937
    (binomial SE 0.0017); the band [0.925, 0.955] allows for that, not for the bootstrap's ≈ 0.89."""
    samples = np.random.default_rng(2).gamma(4.0, 0.5, size=(COVERAGE_SAMPLES, COVERAGE_SEEDS)) - 1.0
    assert 0.925 <= t_interval_coverage(samples, 1.0) <= 0.955


def test_t_interval_of_one_seed_is_nan_with_a_reason():
    result = paired_t_interval([-0.5])
    assert result.mean == -0.5 and math.isnan(result.low) and math.isnan(result.high)
    assert "one seed" in result.reason


def test_t_interval_of_identical_differences_has_zero_width_and_no_p_value():
    result = paired_t_interval([0.25, 0.25, 0.25])
    assert (result.low, result.mean, result.high, result.sd) == (0.25, 0.25, 0.25, 0.0)
    assert math.isnan(result.p_value) and "all differences equal" in result.reason


def test_t_interval_rejects_failed_runs():
    with pytest.raises(ValueError, match="NaN or inf"):
        paired_t_interval([0.1, math.nan, 0.2])


# ----------------------------------------------------------------------------------------------
# Signed-rank test
# ----------------------------------------------------------------------------------------------


def test_signed_rank_p_is_exact_for_all_positive_differences():
    """Six positive differences: the only as-extreme sign patterns are all + or all −, p = 2/2^6."""
    assert signed_rank_p([0.5, 1.0, 1.5, 2.0, 2.5, 3.0]).p_value == pytest.approx(2 / 64)


def test_signed_rank_p_is_nan_when_all_differences_are_zero():
    result = signed_rank_p([0.0, 0.0, 0.0])
    assert math.isnan(result.p_value) and result.reason == "all differences are zero"


def test_signed_rank_p_is_nan_for_a_single_seed():
    result = signed_rank_p([1.0])
    assert math.isnan(result.p_value) and result.reason == "fewer than two seeds"


# ----------------------------------------------------------------------------------------------
# Paired contrasts between arms
# ----------------------------------------------------------------------------------------------


def test_paired_contrast_is_the_t_interval_and_signed_rank_test_of_the_per_seed_differences():
    pt = np.array([-2.0, -1.5, -2.5, -1.0, -1.8])
    pressure = np.array([-1.0, -1.2, -1.1, -0.2, -1.9])
    result = paired_contrast(pt, pressure)
    assert result.interval == paired_t_interval(pt - pressure)
    assert result.signed_rank == signed_rank_p(pt - pressure)
    assert result.mean == pytest.approx(np.mean(pt - pressure))


def test_paired_contrast_uses_the_pairing_by_seed():
    """A shared seed effect cancels in a − b: the paired interval is far narrower than the spread of either arm."""
    seed_effect = np.array([-5.0, 3.0, 0.0, 8.0, -2.0, 1.0])
    result = paired_contrast(seed_effect + 1.0 + np.array([0.1, -0.1, 0.0, 0.05, -0.05, 0.0]), seed_effect)
    assert 0.9 < result.interval.low < result.interval.high < 1.1
    assert result.interval.p_value < 1e-5


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], "got 3 and 2"),
        ([1.0], [2.0], "at least two seeds"),
        ([1.0, math.nan], [2.0, 3.0], "NaN or inf"),
        ([1.0, 2.0], [math.inf, 3.0], "NaN or inf"),
    ],
)
def test_paired_contrast_names_what_is_wrong_with_its_input(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_contrast(a, b)


# ----------------------------------------------------------------------------------------------
# Holm correction
# ----------------------------------------------------------------------------------------------


def test_holm_correction_matches_a_hand_computed_example():
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → raised to 0.06 (monotone).
    adjusted = holm_correction([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])


def test_holm_correction_caps_at_one_and_leaves_nan_out_of_the_family():
    adjusted = holm_correction([0.2, math.nan, 0.6])
    assert math.isnan(adjusted[1])
    np.testing.assert_allclose(adjusted[[0, 2]], [0.4, 0.6])  # m = 2, not 3
    np.testing.assert_allclose(holm_correction([0.5, 0.9]), [1.0, 1.0])


def test_holm_family_adjusts_a_named_family_and_keeps_the_names():
    adjusted = holm_family({"pt vs off": 0.01, "pressure vs off": 0.04, "pt vs pressure": 0.03, "T vs off": 0.005})
    assert adjusted == pytest.approx({"pt vs off": 0.03, "pressure vs off": 0.06, "pt vs pressure": 0.06,
                                      "T vs off": 0.02})


# ----------------------------------------------------------------------------------------------
# Robustness
# ----------------------------------------------------------------------------------------------


def test_robustness_counts_seeds_that_improve_loss_and_excess_separation():
    result = robustness(delta_loss=[-1.0, -0.5, 0.2, -0.1], delta_excess_separation=[0.1, -0.1, 0.3, 0.2])
    assert (result.successes, result.n, result.fraction) == (2, 4, 0.5)
    assert (result.low, result.high) == pytest.approx(wilson_interval(2, 4))


def test_robustness_of_three_out_of_three_is_still_a_wide_interval():
    result = robustness([-1.0, -2.0, -3.0], [1.0, 2.0, 3.0])
    assert result.fraction == 1.0
    assert result.low == pytest.approx(0.4385, abs=1e-4)


def test_robustness_counts_a_failed_run_as_no_improvement():
    assert robustness([math.nan, -1.0], [1.0, 1.0]).successes == 1


# ----------------------------------------------------------------------------------------------
# Noise floor and power
# ----------------------------------------------------------------------------------------------


def test_power_of_ten_seeds_at_one_sd_matches_statsmodels():
    """statsmodels TTestPower().power(effect_size=1.0, nobs=10, alpha=0.05) = 0.8031."""
    assert paired_t_power(1.0, 1.0, 10) == pytest.approx(0.8031, abs=1e-4)


def test_power_matches_a_simulation_of_paired_t_tests():
    """20 000 simulated 12-seed experiments at d = 0.7: binomial SE ≤ 0.0036, so a 4-SE band."""
    samples = np.random.default_rng(3).normal(0.7, 1.0, size=(20_000, 12))
    rejected = scipy_stats.ttest_1samp(samples, 0.0, axis=1).pvalue < 0.05
    assert paired_t_power(0.7, 1.0, 12) == pytest.approx(rejected.mean(), abs=0.015)


def test_minimum_detectable_effect_inverts_the_power():
    effect = minimum_detectable_effect(sd=1.0, n=10, power=paired_t_power(1.0, 1.0, 10))
    assert effect == pytest.approx(1.0, abs=1e-6)
    assert paired_t_power(minimum_detectable_effect(0.3, 6), 0.3, 6) == pytest.approx(0.8, abs=1e-8)


def test_minimum_detectable_effect_of_two_seeds_is_finite_where_scipys_far_lower_tail_is_nan():
    """df = 1: scipy's nct.cdf gives NaN at noncentrality 8 (true value < 1e-15); the power ignores it."""
    mde = minimum_detectable_effect(1.0, 2)
    assert math.isfinite(mde) and mde > 8
    assert paired_t_power(mde, 1.0, 2) == pytest.approx(0.8, abs=1e-9)
    assert minimum_detectable_effect(1e-7, 2) == pytest.approx(mde * 1e-7, rel=1e-6)


def test_minimum_detectable_effect_is_in_the_units_of_the_sd():
    assert minimum_detectable_effect(sd=2.5, n=8) == pytest.approx(2.5 * minimum_detectable_effect(sd=1.0, n=8))


def test_minimum_detectable_effect_exceeds_the_normal_approximation():
    normal = (scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) / math.sqrt(10)
    assert normal < minimum_detectable_effect(1.0, 10) < 1.1 * normal + 0.1


@pytest.mark.parametrize(("effect", "expected"), [(1.0, 10), (0.5, 34), (0.8, 15)])
def test_seeds_needed_is_the_smallest_n_reaching_the_power(effect, expected):
    """G*Power's one-sample t-test sizes for d = 1, 0.5 and 0.8 at α = 0.05 two-sided, power 0.8."""
    n = seeds_needed(sd=1.0, effect=effect)
    assert n == expected
    assert paired_t_power(effect, 1.0, n) >= 0.8 > paired_t_power(effect, 1.0, n - 1)


def test_seeds_needed_is_at_least_the_normal_approximation():
    for effect in (0.3, 0.6, 1.2):
        normal = ((scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) / effect) ** 2
        assert seeds_needed(1.0, effect) >= normal


def test_seeds_needed_treats_an_effect_in_either_direction_alike():
    assert seeds_needed(2.0, -1.0) == seeds_needed(2.0, 1.0) == seeds_needed(1.0, 0.5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: minimum_detectable_effect(0.0, 10), "sd must be positive"),
        (lambda: minimum_detectable_effect(1.0, 1), "at least two seeds"),
        (lambda: minimum_detectable_effect(1.0, 10, power=0.01), "power must lie in"),
        (lambda: seeds_needed(1.0, 0.0), "effect must be non-zero"),
        (lambda: seeds_needed(1.0, 1.0, alpha=1.5), "alpha must lie in"),
    ],
)
def test_power_helpers_reject_impossible_designs(call, message):
    with pytest.raises(ValueError, match=message):
        call()
