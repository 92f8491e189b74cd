"""Routing and loss metrics, computed on the host after the forwards.

Input convention (one MoE layer at a time; torch tensors or numpy arrays):
    expert_ids: [N, k] long, the top-k experts each of N tokens was routed to.
    turn_ids: [N] long, the turn (phase) of each token; −1 marks padding, which is excluded.
    conversation_ids: [N] long, which conversation each token belongs to (for the permutation null).
    num_experts: E.
A [B, S, k] record with [B, S] turn ids is accepted too; its rows are then the conversations.

Separation follows the reference's definition so numbers stay comparable, but is reported next to
its permutation null: with turn-independent routing the reference's "separation" is pure sampling
noise of size ≈ (T−1)/T · (1 − k/E) / n_selections_per_turn, and it grows as routing becomes more
balanced — so only the excess over the null says anything about turn specialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import entropy as _entropy

DEFAULT_PERMUTATIONS = 200
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


def turn_expert_matrix(expert_ids, turn_ids, num_experts: int, num_turns: int | None = None) -> np.ndarray:
    """M [num_turns, E]: share of each turn's top-k selections that went to each expert.

    Rows sum to 1; the row of a turn with no tokens is NaN. ``num_turns`` defaults to max turn + 1.
    """
    experts, turns, _ = _flatten_routing(expert_ids, turn_ids, num_experts)
    if num_turns is None:
        num_turns = int(turns.max()) + 1
    elif turns.max() >= num_turns:
        raise ValueError(f"turn id {int(turns.max())} is out of range for num_turns={num_turns}")
    counts = _turn_expert_counts(experts, turns, num_turns, num_experts).astype(float)
    with np.errstate(invalid="ignore"):
        return counts / counts.sum(axis=1, keepdims=True)


def separation(expert_ids, turn_ids, num_experts: int) -> float:
    """The reference's separation Σ_k Var_turns(M[:, k]) (population variance, ddof=0).

    Taken over the turns that have tokens. Compare it with :func:`separation_null`, never alone.
    """
    experts, turns, _ = _flatten_routing(expert_ids, turn_ids, num_experts)
    return _separation_of_counts(_turn_expert_counts(experts, turns, int(turns.max()) + 1, num_experts))


@dataclass(frozen=True)
class SeparationNull:
    """Permutation null of the separation: mean, std (ddof=1) and the samples [n_permutations]."""

    mean: float
    std: float
    samples: np.ndarray


def separation_null(
    expert_ids,
    turn_ids,
    num_experts: int,
    conversation_ids=None,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> SeparationNull:
    """Separation with turn labels shuffled among the tokens of each conversation.

    Shuffling *within* conversations keeps every conversation's number of tokens per turn and its
    whole routing (topic, length) fixed, so the null differs from the data only in the pairing of
    tokens with turns — the exact exchangeability of "routing is independent of the turn". A global
    shuffle would also move conversation effects between turns (e.g. when long conversations alone
    reach late turns) and misattribute them to turns.
    """
    if n_permutations < 2:
        raise ValueError(f"n_permutations must be at least 2 (got {n_permutations})")
    experts, turns, conversations = _flatten_routing(expert_ids, turn_ids, num_experts, conversation_ids)
    num_turns = int(turns.max()) + 1
    by_conversation = np.argsort(conversations, kind="stable")
    grouped_turns, group = turns[by_conversation], conversations[by_conversation].astype(float)
    rng = np.random.default_rng(seed)
    samples = np.empty(n_permutations)
    shuffled = np.empty_like(turns)
    for i in range(n_permutations):
        # Sorting by (conversation + uniform[0, 1)) permutes positions only inside each conversation.
        within = np.argsort(group + rng.random(len(group)), kind="stable")
        shuffled[by_conversation] = grouped_turns[within]
        samples[i] = _separation_of_counts(_turn_expert_counts(experts, shuffled, num_turns, num_experts))
    return SeparationNull(mean=float(samples.mean()), std=float(samples.std(ddof=1)), samples=samples)


@dataclass(frozen=True)
class ExcessSeparation:
    """Separation against its permutation null: excess = separation − null mean, z = excess / null std."""

    separation: float
    null_mean: float
    null_std: float
    excess: float
    z: float


def excess_separation(
    expert_ids,
    turn_ids,
    num_experts: int,
    conversation_ids=None,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> ExcessSeparation:
    """Separation, its within-conversation permutation null, the excess and its z-score."""
    observed = separation(expert_ids, turn_ids, num_experts)
    null = separation_null(expert_ids, turn_ids, num_experts, conversation_ids, n_permutations, seed)
    excess = observed - null.mean
    z = excess / null.std if null.std > 0 else math.nan
    return ExcessSeparation(observed, null.mean, null.std, excess, z)


def normalized_mutual_information(expert_ids, turn_ids, num_experts: int) -> float:
    """I(expert; turn) / H(turn) over all top-k selections (plug-in estimate), in [0, 1].

    Normalised by H(turn): the fraction of the turn's uncertainty that the expert choice removes,
    so 1 means each expert serves a single turn, 0 means routing ignores the turn. The plug-in
    estimate is biased upwards by ≈ (E−1)(T−1) / (2·n·H(turn)) nats for n selections.
    """
    experts, turns, _ = _flatten_routing(expert_ids, turn_ids, num_experts)
    joint = _turn_expert_counts(experts, turns, int(turns.max()) + 1, num_experts).astype(float)
    h_turn = _entropy(joint.sum(axis=1))
    if h_turn == 0:
        return math.nan  # a single turn: nothing to explain
    mutual = h_turn + _entropy(joint.sum(axis=0)) - _entropy(joint.reshape(-1))
    return float(max(mutual, 0.0) / h_turn)


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


def temporal_variance(trajectory, window: int | None = None) -> np.ndarray | float:
    """Variance over time (axis 0, ddof=0) of a trajectory [T, ...], optionally of its last ``window`` steps."""
    values = _numpy(trajectory).astype(float)
    if window is not None:
        if window < 1:
            raise ValueError(f"window must be at least 1 (got {window})")
        values = values[-window:]
    variance = values.var(axis=0)
    return float(variance) if variance.ndim == 0 else variance


def delta_loss_pct(loss_on, loss_off) -> np.ndarray | float:
    """Relative loss change in percent, 100 · (on − off) / off; negative = the controller helps."""
    on, off = _numpy(loss_on).astype(float), _numpy(loss_off).astype(float)
    if np.any(off <= 0):
        raise ValueError("loss_off must be positive (a cross-entropy of zero or less means a broken run)")
    delta = 100.0 * (on - off) / off
    return float(delta) if delta.ndim == 0 else delta
