"""Specification of the routing and loss metrics."""

import math

import numpy as np
import pytest
import torch

from chronovisor.eval.data import ConversationConfig, ConversationGenerator
from chronovisor.eval.metrics import (
    delta_loss_pct,
    excess_separation,
    expert_variance,
    load_balance,
    normalized_mutual_information,
    routing_preservation,
    separation,
    separation_null,
    temporal_variance,
    turn_expert_matrix,
)

NUM_EXPERTS, TOP_K = 8, 2


def random_top_k(num_tokens: int, seed: int, num_experts: int = NUM_EXPERTS, k: int = TOP_K) -> torch.Tensor:
    """[N, k] distinct experts per token, uniformly at random (routing that ignores the turn)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, num_experts, generator=generator).topk(k, dim=-1).indices


@pytest.fixture(scope="module")
def turn_ids():
    """[B, S] phase ids of real synthetic conversations (−1 on padding)."""
    return ConversationGenerator(ConversationConfig(), seed=0).sample(8).turn_ids


# ----------------------------------------------------------------------------------------------
# Separation and its null
# ----------------------------------------------------------------------------------------------


def test_turn_expert_matrix_holds_each_turns_selection_shares():
    experts = torch.tensor([[0, 1], [0, 2], [3, 1]])
    turns = torch.tensor([0, 0, 2])
    matrix = turn_expert_matrix(experts, turns, num_experts=4)
    np.testing.assert_allclose(matrix[0], [0.5, 0.25, 0.25, 0.0])
    assert np.isnan(matrix[1]).all()  # turn 1 has no tokens
    np.testing.assert_allclose(matrix[2], [0.0, 0.5, 0.0, 0.5])


def test_separation_is_the_sum_over_experts_of_the_population_variance_across_turns():
    experts = random_top_k(70, seed=0)
    turns = torch.arange(70) % 7
    matrix = turn_expert_matrix(experts, turns, NUM_EXPERTS)
    assert separation(experts, turns, NUM_EXPERTS) == pytest.approx(np.var(matrix, axis=0, ddof=0).sum())


def test_padding_tokens_do_not_count():
    experts, turns = random_top_k(700, seed=1), torch.arange(700) % 7
    padded_experts = torch.cat([experts, torch.zeros(50, TOP_K, dtype=torch.long)])
    padded_turns = torch.cat([turns, torch.full((50,), -1)])
    assert separation(padded_experts, padded_turns, NUM_EXPERTS) == separation(experts, turns, NUM_EXPERTS)


def test_null_of_uniform_top2_routing_is_the_reference_noise_floor():
    """7 turns × 1100 tokens, uniform top-2 of 8: E[sep] = (6/7)(1 − 2/8)/2200 = 2.92e-4 (reference §7)."""
    turns = torch.arange(7).repeat_interleave(1100)
    null = separation_null(random_top_k(len(turns), seed=2), turns, NUM_EXPERTS, n_permutations=200, seed=0)
    assert null.mean == pytest.approx((6 / 7) * (1 - 2 / 8) / 2200, rel=0.1)
    assert null.std == pytest.approx(0.63e-4, rel=0.3)


def test_turn_independent_routing_sits_at_its_null(turn_ids):
    experts = random_top_k(turn_ids.numel(), seed=3).reshape(*turn_ids.shape, TOP_K)
    result = excess_separation(experts, turn_ids, NUM_EXPERTS, n_permutations=200, seed=0)
    assert result.separation > 0  # the raw metric reports noise as "separation" ...
    assert abs(result.z) < 3  # ... which its null explains


def test_phase_locked_routing_is_far_above_its_null(turn_ids):
    """Half the tokens send their first choice to the expert of their phase."""
    experts = random_top_k(turn_ids.numel(), seed=4).reshape(*turn_ids.shape, TOP_K)
    locked = torch.rand(turn_ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    phase_expert = turn_ids.clamp(min=0) % NUM_EXPERTS
    second_choice = torch.where(experts[..., 1] == phase_expert, experts[..., 0], experts[..., 1])
    experts = torch.where(locked[..., None], torch.stack([phase_expert, second_choice], dim=-1), experts)
    result = excess_separation(experts, turn_ids, NUM_EXPERTS, n_permutations=200, seed=0)
    assert result.z > 20
    assert result.excess > 10 * result.null_mean


def test_within_conversation_null_does_not_credit_conversation_effects_to_turns():
    """Conversation 1 reaches only turn 0 and uses other experts: turn-blind, yet a global shuffle flags it."""
    turns = torch.cat([torch.arange(3).repeat_interleave(400), torch.zeros(400, dtype=torch.long)])
    conversations = torch.cat([torch.zeros(1200, dtype=torch.long), torch.ones(400, dtype=torch.long)])
    experts = random_top_k(1600, seed=5, num_experts=4)
    experts[1200:] += 4  # conversation 1 routes to experts 4..7 only
    within = excess_separation(experts, turns, NUM_EXPERTS, conversation_ids=conversations, seed=0)
    globally = excess_separation(experts, turns, NUM_EXPERTS, conversation_ids=torch.zeros(1600), seed=0)
    assert abs(within.z) < 3
    assert globally.z > 20


def test_separation_null_is_reproducible_for_a_seed(turn_ids):
    experts = random_top_k(turn_ids.numel(), seed=6).reshape(*turn_ids.shape, TOP_K)
    first = separation_null(experts, turn_ids, NUM_EXPERTS, n_permutations=20, seed=9)
    second = separation_null(experts, turn_ids, NUM_EXPERTS, n_permutations=20, seed=9)
    np.testing.assert_array_equal(first.samples, second.samples)


def test_out_of_range_expert_ids_are_rejected():
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 8\)"):
        separation(torch.tensor([[0, 8]]), torch.tensor([0]), NUM_EXPERTS)


# ----------------------------------------------------------------------------------------------
# Normalised mutual information
# ----------------------------------------------------------------------------------------------


def test_nmi_of_turn_independent_routing_is_near_zero():
    turns = torch.arange(20_000) % 7
    assert normalized_mutual_information(random_top_k(20_000, seed=7), turns, NUM_EXPERTS) < 0.005


def test_nmi_of_a_deterministic_turn_to_expert_map_is_one():
    turns = torch.arange(700) % 7
    assert normalized_mutual_information(turns[:, None], turns, num_experts=7) == pytest.approx(1.0)


def test_nmi_of_disjoint_top2_expert_pairs_per_turn_is_one():
    turns = torch.arange(400) % 4
    experts = torch.stack([2 * turns, 2 * turns + 1], dim=-1)
    assert normalized_mutual_information(experts, turns, NUM_EXPERTS) == pytest.approx(1.0)


def test_nmi_ignores_how_experts_are_numbered():
    turns = torch.arange(700) % 7
    experts = random_top_k(700, seed=8)
    experts[:, 0] = turns
    relabelled = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])[experts]
    assert normalized_mutual_information(relabelled, turns, NUM_EXPERTS) == pytest.approx(
        normalized_mutual_information(experts, turns, NUM_EXPERTS)
    )


# ----------------------------------------------------------------------------------------------
# Load balance and routing preservation
# ----------------------------------------------------------------------------------------------


def test_perfectly_balanced_routing_has_no_violation():
    experts = torch.arange(800).reshape(400, 2) % NUM_EXPERTS
    result = load_balance(experts, NUM_EXPERTS)
    np.testing.assert_allclose(result.load, np.full(NUM_EXPERTS, 1 / NUM_EXPERTS))
    assert result.max_vio == pytest.approx(0) and result.cv == pytest.approx(0)
    assert result.load_entropy == pytest.approx(1) and result.dead_fraction == 0
    assert math.isnan(result.token_entropy)


def test_collapsed_routing_has_maximal_violation_and_dead_experts():
    result = load_balance(torch.zeros(100, 1, dtype=torch.long), NUM_EXPERTS)
    assert result.max_vio == pytest.approx(NUM_EXPERTS - 1)
    assert result.load_entropy == pytest.approx(0)
    assert result.dead_fraction == pytest.approx((NUM_EXPERTS - 1) / NUM_EXPERTS)


def test_dead_experts_are_those_below_the_token_share_threshold():
    experts = torch.cat([torch.zeros(995, 1), torch.ones(5, 1)]).long()  # expert 1 gets 0.5% of tokens
    assert load_balance(experts, 2).dead_fraction == 0.5
    assert load_balance(experts, 2, dead_threshold=0.001).dead_fraction == 0


def test_token_entropy_of_uniform_router_probabilities_is_one():
    probs = torch.full((10, NUM_EXPERTS), 1 / NUM_EXPERTS)
    assert load_balance(
        random_top_k(10, seed=9), NUM_EXPERTS, router_probs=probs
    ).token_entropy == pytest.approx(1)


def test_load_balance_excludes_invalid_tokens():
    experts = torch.tensor([[0], [1], [1]])
    result = load_balance(experts, 2, valid=torch.tensor([True, True, False]))
    np.testing.assert_allclose(result.load, [0.5, 0.5])


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        (torch.tensor([[0, 1], [2, 3]]), 1.0),  # identical
        (torch.tensor([[1, 0], [3, 2]]), 1.0),  # same sets, other order
        (torch.tensor([[0, 5], [6, 3]]), 0.5),  # one of two kept per token
        (torch.tensor([[4, 5], [6, 7]]), 0.0),  # all changed
    ],
)
def test_routing_preservation_is_the_shared_share_of_top_k(changed, expected):
    assert routing_preservation(changed, torch.tensor([[0, 1], [2, 3]])) == pytest.approx(expected)


def test_routing_preservation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        routing_preservation(torch.zeros(3, 2), torch.zeros(3, 1))


# ----------------------------------------------------------------------------------------------
# Temperature fields and loss
# ----------------------------------------------------------------------------------------------


def test_expert_variance_is_taken_across_the_last_axis():
    assert expert_variance(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2 / 3)
    np.testing.assert_allclose(expert_variance(np.array([[1.0, 1.0], [0.0, 2.0]])), [0.0, 1.0])


def test_temporal_variance_uses_the_last_window_steps():
    trajectory = np.array([10.0, 0.0, 1.0, 2.0])
    assert temporal_variance(trajectory) == pytest.approx(np.var(trajectory))
    assert temporal_variance(trajectory, window=3) == pytest.approx(2 / 3)


def test_delta_loss_pct_is_relative_to_the_controller_off_loss():
    assert delta_loss_pct(0.9, 1.0) == pytest.approx(-10.0)
    np.testing.assert_allclose(delta_loss_pct([2.2, 1.8], [2.0, 2.0]), [10.0, -10.0])
    with pytest.raises(ValueError, match="loss_off must be positive"):
        delta_loss_pct(1.0, 0.0)
