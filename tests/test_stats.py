"""Specification of the seed-level statistics."""

import math

import numpy as np
import pytest

from chronovisor.eval.stats import (
    holm_correction,
    iqm,
    paired_bootstrap_ci,
    probability_of_improvement,
    robustness,
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
# Paired bootstrap
# ----------------------------------------------------------------------------------------------


def test_bootstrap_ci_of_a_large_normal_sample_matches_the_normal_interval():
    deltas = np.random.default_rng(0).normal(1.0, 2.0, size=400)
    result = paired_bootstrap_ci(deltas, n_resamples=5000, seed=0)
    half_width = 1.96 * deltas.std(ddof=1) / math.sqrt(len(deltas))
    assert result.mean == pytest.approx(deltas.mean())
    assert result.low == pytest.approx(deltas.mean() - half_width, abs=0.03)
    assert result.high == pytest.approx(deltas.mean() + half_width, abs=0.03)


def test_bootstrap_ci_is_reproducible_for_a_seed():
    deltas = [-1.2, 0.3, -0.8, -2.0, 0.1]
    assert paired_bootstrap_ci(deltas, seed=4) == paired_bootstrap_ci(deltas, seed=4)


def test_bootstrap_ci_of_one_seed_is_nan_with_a_reason():
    result = paired_bootstrap_ci([-0.5])
    assert result.mean == -0.5 and math.isnan(result.low) and math.isnan(result.high)
    assert "one seed" in result.reason


def test_bootstrap_ci_of_identical_differences_has_zero_width():
    result = paired_bootstrap_ci([0.25, 0.25, 0.25])
    assert (result.low, result.mean, result.high) == (0.25, 0.25, 0.25)


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


# ----------------------------------------------------------------------------------------------
# Robustness and summaries
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


def test_iqm_averages_the_middle_half():
    assert iqm([1, 2, 3, 4, 100, 200, 300, 400]) == pytest.approx((3 + 4 + 100 + 200) / 4)


def test_probability_of_improvement_counts_wins_and_half_ties():
    assert probability_of_improvement([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert probability_of_improvement([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert probability_of_improvement([2.0], [1.0, 2.0, 3.0]) == 0.5
