"""Routing and loss metrics, computed on the host after the forwards.

Input convention (one MoE layer at a time; torch tensors or numpy arrays):
    expert_ids: [N, k] long, the top-k experts each of N tokens was routed to.
    turn_ids: [N] long, the turn (phase) of each token; −1 marks padding, which is excluded.
    conversation_ids: [N], which conversation each token belongs to.
    num_experts: E.
A [B, S, k] record with [B, S] turn ids is accepted too; its rows are then the conversations.

Separation follows the reference's definition so numbers stay comparable, but is only meaningful
next to its randomisation null (:func:`separation_test`): with turn-independent routing the
reference's "separation" is sampling noise of size ≈ (T−1)/T · (1 − k/E) / n_selections_per_turn,
and routing that is merely correlated in time inflates it further. The null re-draws the design's
random phase order of each conversation, so it is exact under any time correlation of the routing —
but only for data whose phase order was randomised per conversation; with one fixed order
(:func:`phase_order_is_fixed`) the phase is a function of the position and the two cannot be told
apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import entropy as _entropy

DEFAULT_PERMUTATIONS = 999  # p-values on a grid of 1/1000; cheap, the null relabels turn tables
DEAD_EXPERT_THRESHOLD = 0.01  # an expert is dead when it receives fewer than 1% of the tokens


def _numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _flatten_routing(expert_ids, turn_ids, num_experts: int, conversation_ids=None):
    """(experts [n, k], turns [n], conversations [n]) with padding removed, validated."""
    experts, turns = _numpy(expert_ids), _numpy(turn_ids)
    if experts.shape[:-1] != turns.shape:
        raise ValueError(
            f"expert_ids {tuple(experts.shape)} and turn_ids {tuple(turns.shape)} disagree on the token dimensions"
        )
    if conversation_ids is not None:
        conversations = _numpy(conversation_ids)
        if conversations.shape != turns.shape:
            raise ValueError(
                f"conversation_ids {tuple(conversations.shape)} must match turn_ids {tuple(turns.shape)}"
            )
    elif turns.ndim == 2:
        conversations = np.broadcast_to(np.arange(turns.shape[0])[:, None], turns.shape)
    else:
        conversations = np.zeros(turns.shape, dtype=np.int64)
    experts, turns, conversations = (
        experts.reshape(-1, experts.shape[-1]),
        turns.reshape(-1),
        conversations.reshape(-1),
    )
    keep = turns >= 0
    experts, turns, conversations = (
        experts[keep].astype(np.int64),
        turns[keep].astype(np.int64),
        conversations[keep],
    )
    if len(turns) == 0:
        raise ValueError("no routed tokens: every turn id is −1 (padding)")
    if experts.min() < 0 or experts.max() >= num_experts:
        raise ValueError(f"expert ids must lie in [0, {num_experts}) (got {experts.min()}..{experts.max()})")
    return experts, turns, conversations


def _turn_expert_counts(
    experts: np.ndarray, turns: np.ndarray, num_turns: int, num_experts: int
) -> np.ndarray:
    """[num_turns, E] number of top-k selections of each expert by tokens of each turn."""
    cells = (turns[:, None] * num_experts + experts).reshape(-1)
    return np.bincount(cells, minlength=num_turns * num_experts).reshape(num_turns, num_experts)


def _separation_of_counts(counts: np.ndarray) -> float:
    present = counts.sum(axis=1) > 0
    shares = counts[present] / counts[present].sum(axis=1, keepdims=True)
    return float(shares.var(axis=0).sum())


# ----------------------------------------------------------------------------------------------
# Turn specialisation
# ----------------------------------------------------------------------------------------------


def separation(expert_ids, turn_ids, num_experts: int) -> float:
    """The reference's separation Σ_k Var_turns(M[:, k]) (population variance, ddof=0).

    M[turn, k] is the share of the turn's top-k selections that went to expert k, taken over the
    turns that have tokens. Never report it alone: compare it with :func:`separation_test`.
    """
    experts, turns, _ = _flatten_routing(expert_ids, turn_ids, num_experts)
    return _separation_of_counts(_turn_expert_counts(experts, turns, int(turns.max()) + 1, num_experts))


@dataclass(frozen=True)
class _TurnTable:
    """Top-k selection counts per turn, a turn being one (conversation, phase label) pair."""

    counts: np.ndarray  # [G, E] selections per turn
    labels: np.ndarray  # [G] phase label of each turn, remapped to 0..T−1
    conversations: np.ndarray  # [G] conversation of each turn, 0..C−1, ascending
    order: np.ndarray  # [G] rank of each turn's first token inside its conversation
    num_labels: int


def _turn_table(turns: np.ndarray, conversations: np.ndarray, experts: np.ndarray | None, num_experts: int):
    """Aggregate tokens into turns once, so that a relabelling only has to move rows of a [G, E] table."""
    _, conversation = np.unique(conversations, return_inverse=True)
    label_values, label = np.unique(turns, return_inverse=True)
    conversation, label = conversation.reshape(-1), label.reshape(-1)
    num_labels = len(label_values)
    # One turn per distinct (conversation, label) pair; np.unique sorts the pairs by conversation.
    groups, group = np.unique(conversation * num_labels + label, return_inverse=True)
    group = group.reshape(-1)
    first_token = np.full(len(groups), len(turns))
    np.minimum.at(first_token, group, np.arange(len(turns)))
    group_conversation = groups // num_labels
    # Rank of each turn's start among its conversation's turns (groups are sorted by conversation).
    by_start = np.lexsort((first_token, group_conversation))
    block_start = np.searchsorted(group_conversation, group_conversation)
    order = np.empty(len(groups), dtype=np.int64)
    order[by_start] = np.arange(len(groups)) - block_start[by_start]
    counts = None
    if experts is not None:
        k = experts.shape[1]
        cells = (np.repeat(group, k) * num_experts + experts.reshape(-1)).astype(np.int64)
        counts = np.bincount(cells, minlength=len(groups) * num_experts).reshape(len(groups), num_experts)
    return _TurnTable(counts, groups % num_labels, group_conversation, order, num_labels)


def _separation_of_labellings(table: _TurnTable, labellings: np.ndarray) -> np.ndarray:
    """Separation [P] of the routing under each row of labellings [P, G] (a phase label per turn)."""
    num_labellings, num_groups = labellings.shape
    counts = table.counts.astype(float)
    labels = np.arange(table.num_labels)[None, :, None]
    result = np.empty(num_labellings)
    # Chunks keep the [chunk, T, G] one-hot to a few MB whatever the number of permutations.
    chunk = max(1, (1 << 20) // max(1, table.num_labels * num_groups))
    for start in range(0, num_labellings, chunk):
        one_hot = (labellings[start : start + chunk, None, :] == labels).astype(float)
        per_label = one_hot @ counts  # [chunk, T, E]: exact, the counts are small integers
        # Every labelling keeps each conversation's set of labels, so no label is left without tokens.
        shares = per_label / per_label.sum(axis=2, keepdims=True)
        result[start : start + len(one_hot)] = shares.var(axis=1).sum(axis=1)
    return result


def _within_conversation_permutations(table: _TurnTable, n_permutations: int, seed: int) -> np.ndarray:
    """[P, G] labellings: each conversation's turn labels permuted uniformly, independently."""
    rng = np.random.default_rng(seed)
    # Sorting (conversation + uniform[0, 1)) shuffles positions only inside each conversation's block.
    keys = table.conversations[None, :] + rng.random((n_permutations, len(table.labels)))
    return table.labels[np.argsort(keys, axis=1)]


def _order_is_fixed(table: _TurnTable) -> bool:
    num_conversations = int(table.conversations.max()) + 1
    position = np.full((num_conversations, table.num_labels), np.nan)
    position[table.conversations, table.labels] = table.order
    # before[c, a, b] = +1 if conversation c has a before b, −1 if after, 0 if it lacks either.
    before = np.nan_to_num(np.sign(position[:, None, :] - position[:, :, None]))
    return bool(not np.any((before > 0).any(axis=0) & (before < 0).any(axis=0)))


def phase_order_is_fixed(turn_ids, conversation_ids=None) -> bool:
    """Whether all conversations visit their phases in one common order.

    The rule: the order is fixed when no two conversations put a pair of phases in opposite order
    (each conversation's phases ordered by their first token; conversations may skip phases). Then
    the phase is a function of the position in the conversation, any position effect on routing
    (drift, warm-up, context length) looks exactly like phase specialisation, and a report must say
    that separation cannot be told apart from position. Data whose generator drew the phase order at
    random per conversation comes out False except by a negligible chance. Accepts [N] ids with
    [N] conversation ids, or [B, S] ids whose rows are the conversations; −1 (padding) is ignored.
    """
    turns = _numpy(turn_ids)
    if conversation_ids is None:
        if turns.ndim != 2:
            raise ValueError("conversation_ids are needed unless turn_ids is [B, S] with one conversation per row")
        conversations = np.broadcast_to(np.arange(turns.shape[0])[:, None], turns.shape)
    else:
        conversations = _numpy(conversation_ids)
        if conversations.shape != turns.shape:
            raise ValueError(f"conversation_ids {conversations.shape} must match turn_ids {turns.shape}")
    turns, conversations = turns.reshape(-1), conversations.reshape(-1)
    keep = turns >= 0
    if not keep.any():
        raise ValueError("no labelled tokens: every turn id is −1 (padding)")
    return _order_is_fixed(_turn_table(turns[keep], conversations[keep], None, 0))


@dataclass(frozen=True)
class SeparationTest:
    """Separation against its within-conversation phase-order randomisation null.

    separation: the observed separation; null_mean, null_std (ddof=1): of the null samples.
    excess: separation − null_mean; z: excess / null_std (descriptive only: the null is skewed,
        use p_value for the test).
    p_value: one-sided Monte Carlo permutation p, (1 + #{null ≥ observed}) / (1 + n_permutations).
    phase_order_fixed: :func:`phase_order_is_fixed` of the data; when True the test cannot tell
        phase from position and the p-value is not a valid test of phase specialisation.
    num_conversations, num_turns: the units that were permuted.
    null_samples: [n_permutations] separations of the permuted labellings.
    """

    separation: float
    null_mean: float
    null_std: float
    excess: float
    z: float
    p_value: float
    n_permutations: int
    phase_order_fixed: bool
    num_conversations: int
    num_turns: int
    null_samples: np.ndarray = field(repr=False, compare=False)


def separation_test(
    expert_index,
    turn_ids,
    conversation_ids,
    num_experts: int,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> SeparationTest:
    """Randomisation test of "routing does not depend on the phase" through the separation.

    expert_index [N] or [N, k], turn_ids [N] (phase label per token, −1 = ignore) and
    conversation_ids [N]; or [B, S(, k)] arrays with conversation_ids None, one conversation per row.
    A turn is one (conversation, phase label) pair: each phase is one contiguous turn. The null keeps
    every turn's tokens and routing where they are and permutes the phase labels of each
    conversation's turns uniformly at random, independently per conversation — it re-draws the
    design's random phase order. The test is exact (level ≤ α for any routing process, however
    correlated in time) when, and only when, the data generator drew each conversation's phase
    order uniformly at random. With one fixed phase order (see ``phase_order_is_fixed`` in the
    result) position drift alone rejects it: report such data as "separation cannot be told apart
    from position". With a single conversation every relabelling only permutes the rows of M, so the
    p-value is 1: the power comes from comparing conversations.

    Replaces the token-level shuffle of turn labels, which broke the time correlation of routing and
    rejected turn-blind AR(1) routing in nearly every replicate.
    """
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be at least 1 (got {n_permutations})")
    experts = _numpy(expert_index)
    turns = _numpy(turn_ids)
    if experts.shape == turns.shape:
        experts = experts[..., None]  # top-1 given as [N]
    if conversation_ids is None and turns.ndim != 2:
        raise ValueError("conversation_ids are needed unless turn_ids is [B, S] with one conversation per row")
    experts, turns, conversations = _flatten_routing(experts, turns, num_experts, conversation_ids)
    table = _turn_table(turns, conversations, experts, num_experts)
    observed = float(_separation_of_labellings(table, table.labels[None, :])[0])
    samples = _separation_of_labellings(table, _within_conversation_permutations(table, n_permutations, seed))
    # A relabelling that reproduces the data gives the same value up to rounding: count it as a tie.
    at_least = int(np.sum(samples >= observed - 1e-12 * abs(observed)))
    null_mean = float(samples.mean())
    null_std = float(samples.std(ddof=1)) if n_permutations > 1 else math.nan
    excess = observed - null_mean
    return SeparationTest(
        separation=observed,
        null_mean=null_mean,
        null_std=null_std,
        excess=excess,
        z=excess / null_std if null_std > 0 else math.nan,
        p_value=(1 + at_least) / (1 + n_permutations),
        n_permutations=n_permutations,
        phase_order_fixed=_order_is_fixed(table),
        num_conversations=int(table.conversations.max()) + 1,
        num_turns=len(table.labels),
        null_samples=samples,
    )


def uncertainty_coefficient(expert_ids, turn_ids, num_experts: int) -> float:
    """Theil's uncertainty coefficient U(turn | expert) = I(expert; turn) / H(turn), in [0, 1].

    Plug-in estimate over all top-k selections. It is the fraction of the turn's entropy that the
    expert choice removes: 1 means each expert serves a single turn, 0 means routing ignores the
    turn. (It is not a symmetric "normalised mutual information", which would divide by a mean of
    H(turn) and H(expert).) The plug-in estimate is biased upwards by ≈ (E−1)(T−1) / (2·n·H(turn))
    nats for n selections.
    """
    experts, turns, _ = _flatten_routing(expert_ids, turn_ids, num_experts)
    joint = _turn_expert_counts(experts, turns, int(turns.max()) + 1, num_experts).astype(float)
    h_turn = _entropy(joint.sum(axis=1))
    if h_turn == 0:
        return math.nan  # a single turn: nothing to explain
    return float(_mutual_information_of_counts(joint) / h_turn)


def mutual_information(expert_ids, labels, num_experts: int) -> float:
    """Plug-in mutual information I(expert; label) in bits over all top-k selections.

    ``labels`` is any per-token class (a turn, a domain), −1 on padding; shapes as in
    :func:`separation`. 0 when routing ignores the label; at most log2 of the number of labels.
    Biased upwards by ≈ (E−1)(L−1) / (2·n·ln 2) bits for n selections.
    """
    experts, classes, _ = _flatten_routing(expert_ids, labels, num_experts)
    joint = _turn_expert_counts(experts, classes, int(classes.max()) + 1, num_experts).astype(float)
    return float(_mutual_information_of_counts(joint) / math.log(2))


def _mutual_information_of_counts(joint: np.ndarray) -> float:
    """I(row; column) in nats of a contingency table of counts (clipped at 0 against rounding)."""
    mutual = _entropy(joint.sum(axis=1)) + _entropy(joint.sum(axis=0)) - _entropy(joint.reshape(-1))
    return max(float(mutual), 0.0)


# ----------------------------------------------------------------------------------------------
# Load balance
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadBalance:
    """Load-balance summary of one layer.

    load: [E] share of top-k selections per expert (sums to 1).
    max_vio: (max load − mean load) / mean load.
    cv: std / mean of the loads (population std).
    load_entropy: entropy of ``load`` / log E (1 = perfectly balanced).
    token_entropy: mean over tokens of the router distribution's entropy / log E (NaN without probs).
    dead_fraction: fraction of experts that receive fewer than ``dead_threshold`` of the tokens.
    """

    load: np.ndarray
    max_vio: float
    cv: float
    load_entropy: float
    token_entropy: float
    dead_fraction: float


def load_balance(
    expert_ids,
    num_experts: int,
    router_probs=None,
    valid=None,
    dead_threshold: float = DEAD_EXPERT_THRESHOLD,
) -> LoadBalance:
    """Load balance of one layer from expert_ids [N, k] (and router_probs [N, E], valid [N] bool)."""
    experts = _numpy(expert_ids).reshape(-1, _numpy(expert_ids).shape[-1])
    keep = np.ones(len(experts), dtype=bool) if valid is None else _numpy(valid).reshape(-1).astype(bool)
    experts = experts[keep]
    if len(experts) == 0:
        raise ValueError("load_balance needs at least one valid token")
    if experts.min() < 0 or experts.max() >= num_experts:
        raise ValueError(f"expert ids must lie in [0, {num_experts}) (got {experts.min()}..{experts.max()})")
    counts = np.bincount(experts.reshape(-1), minlength=num_experts).astype(float)
    load = counts / counts.sum()
    mean = load.mean()
    token_entropy = math.nan
    if router_probs is not None:
        probs = _numpy(router_probs).astype(float).reshape(-1, num_experts)[keep]
        token_entropy = float(_entropy(probs, axis=1).mean() / math.log(num_experts))
    return LoadBalance(
        load=load,
        max_vio=float((load.max() - mean) / mean),
        cv=float(load.std() / mean),
        load_entropy=float(_entropy(load) / math.log(num_experts)),
        token_entropy=token_entropy,
        # counts / tokens: the share of tokens that include the expert in their top-k.
        dead_fraction=float((counts / len(experts) < dead_threshold).mean()),
    )


def routing_preservation(expert_ids, reference_expert_ids, valid=None) -> float:
    """Mean over tokens of |top-k ∩ reference top-k| / k (OLMoE's router saturation vs a reference run).

    Order inside a token's top-k does not matter. 1 = the controller changed no selection.
    """
    experts, reference = _numpy(expert_ids), _numpy(reference_expert_ids)
    if experts.shape != reference.shape:
        raise ValueError(
            f"expert_ids {experts.shape} and reference_expert_ids {reference.shape} differ in shape"
        )
    k = experts.shape[-1]
    experts, reference = experts.reshape(-1, k), reference.reshape(-1, k)
    if valid is not None:
        keep = _numpy(valid).reshape(-1).astype(bool)
        experts, reference = experts[keep], reference[keep]
    overlap = (experts[:, :, None] == reference[:, None, :]).any(axis=-1).sum(axis=-1)
    return float((overlap / k).mean())


# ----------------------------------------------------------------------------------------------
# Temperature fields and loss
# ----------------------------------------------------------------------------------------------


def expert_variance(field) -> np.ndarray | float:
    """Variance across experts (last axis, ddof=0) of a T̄ field: [E] → scalar, [L, E] → [L]."""
    variance = _numpy(field).astype(float).var(axis=-1)
    return float(variance) if variance.ndim == 0 else variance


def delta_loss_pct(loss_on, loss_off) -> np.ndarray | float:
    """Relative loss change in percent, 100 · (on − off) / off; negative = the controller helps."""
    on, off = _numpy(loss_on).astype(float), _numpy(loss_off).astype(float)
    if np.any(off <= 0):
        raise ValueError("loss_off must be positive (a cross-entropy of zero or less means a broken run)")
    delta = 100.0 * (on - off) / off
    return float(delta) if delta.ndim == 0 else delta
