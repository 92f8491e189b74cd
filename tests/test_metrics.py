"""Specification of the routing and loss metrics."""

import itertools
import math

import numpy as np
import pytest
import torch

from chronovisor.eval.metrics import (
    delta_loss_pct,
    expert_variance,
    load_balance,
    phase_order_is_fixed,
    routing_preservation,
    separation,
    separation_test,
    uncertainty_coefficient,
)

NUM_EXPERTS, TOP_K = 8, 2


def random_top_k(num_tokens: int, seed: int, num_experts: int = NUM_EXPERTS, k: int = TOP_K) -> torch.Tensor:
    """[N, k] distinct experts per token, uniformly at random (routing that ignores the turn)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, num_experts, generator=generator).topk(k, dim=-1).indices


# ----------------------------------------------------------------------------------------------
# Separation and its randomisation test
# ----------------------------------------------------------------------------------------------


def separation_by_hand(experts, turns) -> float:
    """Oracle: Σ_k population variance over the present turns of the turn's selection share of k."""
    selections: dict[int, list[int]] = {}
    for token_experts, turn in zip(experts, turns, strict=True):
        if turn >= 0:
            selections.setdefault(int(turn), []).extend(int(e) for e in np.atleast_1d(token_experts))
    shares = [[chosen.count(k) / len(chosen) for k in range(NUM_EXPERTS)] for chosen in selections.values()]
    total = 0.0
    for k in range(NUM_EXPERTS):
        column = [row[k] for row in shares]
        mean = sum(column) / len(column)
        total += sum((value - mean) ** 2 for value in column) / len(column)
    return total


def conversations_with_random_phase_order(num_conversations, num_phases, turn_length, seed):
    """(turns [N], conversations [N]): contiguous equal-length turns, phase order drawn per conversation."""
    rng = np.random.default_rng(seed)
    orders = rng.permuted(np.tile(np.arange(num_phases), (num_conversations, 1)), axis=1)
    turns = np.repeat(orders.reshape(-1), turn_length)
    conversations = np.repeat(np.arange(num_conversations), num_phases * turn_length)
    return turns, conversations


def test_separation_of_a_hand_computed_example():
    # Turn 0 shares (½, ¼, ¼, 0), turn 2 shares (0, ½, 0, ½): variances 1/16, 1/64, 1/64, 1/16.
    experts = torch.tensor([[0, 1], [0, 2], [3, 1]])
    assert separation(experts, torch.tensor([0, 0, 2]), num_experts=4) == pytest.approx(5 / 32)


def test_separation_is_the_sum_over_experts_of_the_population_variance_across_turns():
    experts, turns = random_top_k(70, seed=0), torch.arange(70) % 7
    assert separation(experts, turns, NUM_EXPERTS) == pytest.approx(separation_by_hand(experts, turns))


def test_padding_tokens_do_not_count():
    experts, turns = random_top_k(700, seed=1), torch.arange(700) % 7
    padded_experts = torch.cat([experts, torch.zeros(50, TOP_K, dtype=torch.long)])
    padded_turns = torch.cat([turns, torch.full((50,), -1)])
    assert separation(padded_experts, padded_turns, NUM_EXPERTS) == separation(experts, turns, NUM_EXPERTS)


def test_out_of_range_expert_ids_are_rejected():
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 8\)"):
        separation(torch.tensor([[0, 8]]), torch.tensor([0]), NUM_EXPERTS)


def test_separation_test_reports_the_observed_separation_and_its_excess_over_the_null_mean():
    turns, conversations = conversations_with_random_phase_order(6, 7, 10, seed=0)
    experts = random_top_k(len(turns), seed=2)
    result = separation_test(experts, turns, conversations, NUM_EXPERTS, n_permutations=50, seed=0)
    assert result.separation == pytest.approx(separation(experts, turns, NUM_EXPERTS), rel=1e-12)
    assert result.null_mean == pytest.approx(result.null_samples.mean())
    assert result.null_std == pytest.approx(result.null_samples.std(ddof=1))
    assert result.excess == pytest.approx(result.separation - result.null_mean)
    assert (result.num_conversations, result.num_turns, len(result.null_samples)) == (6, 42, 50)


def test_separation_test_p_value_matches_exact_enumeration_of_all_phase_orders():
    """3 conversations × 3 phases: all 3!³ = 216 relabellings, separations by the pure-Python oracle."""
    turns, conversations = conversations_with_random_phase_order(3, 3, 4, seed=1)
    experts = random_top_k(len(turns), seed=3).numpy()
    experts[turns == 0, 0] = 0  # some phase dependence, so that p is neither tiny nor 1
    observed = separation_by_hand(experts, turns)
    exact = []
    for orders in itertools.product(itertools.permutations(range(3)), repeat=3):
        relabelled = np.concatenate([np.array(orders[c])[turns[conversations == c]] for c in range(3)])
        exact.append(separation_by_hand(experts, relabelled))
    exact = np.array(exact)
    exact_p = np.mean(exact >= observed - 1e-12)
    n = 20_000
    result = separation_test(experts, turns, conversations, NUM_EXPERTS, n_permutations=n, seed=0)
    assert 0.05 < exact_p < 0.95
    assert result.p_value == pytest.approx(exact_p, abs=4 * math.sqrt(exact_p * (1 - exact_p) / n) + 1 / n)
    assert result.null_mean == pytest.approx(exact.mean(), rel=0.01)
    assert set(np.round(result.null_samples, 12)) <= set(np.round(exact, 12))


def test_with_one_conversation_every_relabelling_gives_the_observed_separation_so_p_is_one():
    turns = torch.arange(7).repeat_interleave(30)
    experts = random_top_k(len(turns), seed=4)
    experts[turns == 3, 0] = 0  # strongly phase-locked, yet one conversation cannot show it
    result = separation_test(experts, turns, torch.zeros(len(turns)), NUM_EXPERTS, n_permutations=20, seed=0)
    np.testing.assert_allclose(result.null_samples, result.separation, rtol=1e-12)
    assert result.p_value == 1.0


def test_phase_locked_routing_gets_the_smallest_attainable_p_value():
    turns, conversations = conversations_with_random_phase_order(16, 7, 30, seed=2)
    experts = random_top_k(len(turns), seed=5).numpy()
    locked = np.random.default_rng(0).random(len(turns)) < 0.5
    experts[locked, 0] = turns[locked]  # half the tokens send their first choice to their phase's expert
    experts[locked & (experts[:, 1] == turns), 1] = 7
    result = separation_test(experts, turns, conversations, NUM_EXPERTS, n_permutations=99, seed=0)
    assert result.p_value == pytest.approx(1 / 100)
    assert result.excess > 10 * result.null_mean


def test_separation_test_does_not_depend_on_the_order_in_which_tokens_are_listed():
    turns, conversations = conversations_with_random_phase_order(5, 7, 8, seed=3)
    experts = random_top_k(len(turns), seed=6).numpy()
    shuffle = np.random.default_rng(1).permutation(len(turns))
    listed = separation_test(experts, turns, conversations, NUM_EXPERTS, n_permutations=30, seed=7)
    shuffled = separation_test(experts[shuffle], turns[shuffle], conversations[shuffle], NUM_EXPERTS,
                               n_permutations=30, seed=7)
    np.testing.assert_allclose(shuffled.null_samples, listed.null_samples, rtol=1e-12)
    assert shuffled.p_value == listed.p_value


def test_separation_test_is_reproducible_for_a_seed():
    turns, conversations = conversations_with_random_phase_order(4, 7, 5, seed=4)
    experts = random_top_k(len(turns), seed=7)
    first = separation_test(experts, turns, conversations, NUM_EXPERTS, n_permutations=20, seed=9)
    second = separation_test(experts, turns, conversations, NUM_EXPERTS, n_permutations=20, seed=9)
    np.testing.assert_array_equal(first.null_samples, second.null_samples)
    assert first == second


def test_separation_test_accepts_a_padded_batch_whose_rows_are_the_conversations():
    turns, conversations = conversations_with_random_phase_order(4, 7, 5, seed=5)
    experts = random_top_k(len(turns), seed=8).numpy()
    batch_turns = np.pad(turns.reshape(4, 35), ((0, 0), (0, 3)), constant_values=-1)
    batch_experts = np.pad(experts.reshape(4, 35, TOP_K), ((0, 0), (0, 3), (0, 0)))
    flat = separation_test(experts, turns, conversations, NUM_EXPERTS, n_permutations=20, seed=0)
    batched = separation_test(batch_experts, batch_turns, None, NUM_EXPERTS, n_permutations=20, seed=0)
    np.testing.assert_allclose(batched.null_samples, flat.null_samples, rtol=1e-12)


def test_separation_test_accepts_top1_expert_ids_given_as_a_vector():
    turns, conversations = conversations_with_random_phase_order(3, 7, 5, seed=6)
    experts = random_top_k(len(turns), seed=9, k=1)
    vector = separation_test(experts[:, 0], turns, conversations, NUM_EXPERTS, n_permutations=10, seed=0)
    column = separation_test(experts, turns, conversations, NUM_EXPERTS, n_permutations=10, seed=0)
    assert vector == column


def test_separation_test_needs_conversation_ids_for_flat_tokens():
    with pytest.raises(ValueError, match="conversation_ids are needed"):
        separation_test(random_top_k(14, seed=0), torch.arange(14) % 7, None, NUM_EXPERTS)


def test_phase_order_is_fixed_when_every_conversation_visits_the_phases_in_one_order():
    turns = np.tile(np.arange(7).repeat(3), 4)
    assert phase_order_is_fixed(turns, np.arange(len(turns)) // 21)


def test_phase_order_is_fixed_allows_conversations_that_skip_phases():
    turns = np.array([0, 0, 1, 2, 2, 0, 2, 1, 1, 2])  # (0, 1, 2), (0, 2), (1, 2)
    conversations = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    assert phase_order_is_fixed(turns, conversations)


def test_phase_order_is_not_fixed_when_two_conversations_order_a_pair_of_phases_differently():
    turns = np.array([0, 1, 2, 0, 2, 1])
    assert not phase_order_is_fixed(turns, np.array([0, 0, 0, 1, 1, 1]))


def test_separation_test_flags_a_fixed_phase_order_and_not_a_random_one():
    random_turns, conversations = conversations_with_random_phase_order(16, 7, 5, seed=7)
    fixed_turns = np.tile(np.arange(7).repeat(5), 16)
    experts = random_top_k(len(conversations), seed=10)
    assert not separation_test(experts, random_turns, conversations, NUM_EXPERTS, 10).phase_order_fixed
    assert separation_test(experts, fixed_turns, conversations, NUM_EXPERTS, 10).phase_order_fixed


def test_phase_order_is_fixed_reads_a_padded_batch_row_by_row():
    assert phase_order_is_fixed(torch.tensor([[0, 1, 2, -1], [0, 0, 2, 2]]))
    assert not phase_order_is_fixed(torch.tensor([[0, 1, 2, -1], [2, 1, 1, -1]]))


# ----------------------------------------------------------------------------------------------
# Uncertainty coefficient
# ----------------------------------------------------------------------------------------------


def test_uncertainty_coefficient_of_turn_independent_routing_is_near_zero():
    turns = torch.arange(20_000) % 7
    assert uncertainty_coefficient(random_top_k(20_000, seed=7), turns, NUM_EXPERTS) < 0.005


def test_uncertainty_coefficient_of_a_deterministic_turn_to_expert_map_is_one():
    turns = torch.arange(700) % 7
    assert uncertainty_coefficient(turns[:, None], turns, num_experts=7) == pytest.approx(1.0)


def test_uncertainty_coefficient_of_disjoint_top2_expert_pairs_per_turn_is_one():
    turns = torch.arange(400) % 4
    experts = torch.stack([2 * turns, 2 * turns + 1], dim=-1)
    assert uncertainty_coefficient(experts, turns, NUM_EXPERTS) == pytest.approx(1.0)


def test_uncertainty_coefficient_is_the_mutual_information_over_the_turn_entropy():
    """Two turns, one expert each half the time: I = H(turn) − H(turn | expert), by hand."""
    experts = torch.tensor([[0], [0], [0], [1], [1], [1], [1], [0]])
    turns = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # p(turn, expert) = (3/8, 1/8; 1/8, 3/8): H(turn) = log 2, H(turn | expert) = H(3/4, 1/4).
    conditional = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = (math.log(2) - conditional) / math.log(2)
    assert uncertainty_coefficient(experts, turns, num_experts=2) == pytest.approx(expected)


def test_uncertainty_coefficient_ignores_how_experts_are_numbered():
    turns = torch.arange(700) % 7
    experts = random_top_k(700, seed=8)
    experts[:, 0] = turns
    relabelled = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])[experts]
    assert uncertainty_coefficient(relabelled, turns, NUM_EXPERTS) == pytest.approx(
        uncertainty_coefficient(experts, turns, NUM_EXPERTS)
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


def test_delta_loss_pct_is_relative_to_the_controller_off_loss():
    assert delta_loss_pct(0.9, 1.0) == pytest.approx(-10.0)
    np.testing.assert_allclose(delta_loss_pct([2.2, 1.8], [2.0, 2.0]), [10.0, -10.0])
    with pytest.raises(ValueError, match="loss_off must be positive"):
        delta_loss_pct(1.0, 0.0)
