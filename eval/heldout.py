"""The held-out evaluation every protocol ends with: loss and per-layer routing metrics.

Held-out conversations come from the same generator world as the training ones, another sample
stream. By default the fields are frozen as the protocol left them (no ticks), one forward per
batch; the loss is the mean cross-entropy over real next-token targets (padding masked) and the
routing of every MoE layer is kept. With ``eval.streaming`` the conversations instead go turn by
turn through the KV cache and the controller ticks after every turn (online adaptation;
decoder-only models). Routing metrics of Switch use the decoder routers (those that see one token
per decoder position).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from chronovisor.eval import data as data_lib
from chronovisor.eval import metrics
from chronovisor.eval.inputs import (
    ModelInputs,
    in_order_batches,
    is_encoder_decoder,
    model_inputs,
    repeat_groups,
)
from chronovisor.eval.record import HeldoutMetrics, LayerMeans, LayerMetrics
from chronovisor.eval.specs import EvalSpec
from chronovisor.eval.train_loop import Tick

#: One held-out forward: the conversation indices of the batch and its inputs.
HeldoutBatch = tuple[list[int], ModelInputs]


class HeldoutAccumulator:
    """Collects per-position losses and routing of held-out forwards (whole batches or single turns)."""

    def __init__(self) -> None:
        self.loss_sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}
        self.layer_ids: dict[str, list[np.ndarray]] = {}
        self.turn_ids: list[np.ndarray] = []
        self.conversation_ids: list[np.ndarray] = []

    def add(self, logits: torch.Tensor, targets: torch.Tensor, turn_ids: torch.Tensor, record,
            conversations: list[int]) -> torch.Tensor:
        """Add one forward: logits ``[B, S, V]``, targets/turn_ids ``[B, S]``, B = len(conversations),
        ``record`` its :class:`~chronovisor.model.RoutingRecord` (or one group's :class:`GroupRouting`).

        Returns the forward's mean loss over its scored targets (NaN if none).
        """
        losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets,
                                                   ignore_index=data_lib.IGNORE_INDEX, reduction="none")  # [B, S]
        scored = targets != data_lib.IGNORE_INDEX
        for row, conversation in enumerate(conversations):
            self.loss_sums[conversation] = self.loss_sums.get(conversation, 0.0) + float(losses[row][scored[row]].sum())
            self.counts[conversation] = self.counts.get(conversation, 0) + int(scored[row].sum())
        turns = turn_ids.reshape(-1).cpu().numpy()
        real = turns >= 0
        for name, stack, index in zip(record.layer_names, record.layer_stacks, record.expert_index, strict=True):
            # Only routers that see one token per conversation position: for Switch the decoder
            # (its encoder routers see the single pad token of each conversation).
            if stack != "decoder" or index.shape[0] != turns.size:
                continue
            self.layer_ids.setdefault(name, []).append(index.numpy()[real])
        self.turn_ids.append(turns[real])
        self.conversation_ids.append(np.repeat(np.asarray(conversations), turn_ids.shape[1])[real])
        return losses[scored].mean()

    def mean_loss(self) -> float:
        """Mean CE over every scored target added so far."""
        return sum(self.loss_sums.values()) / sum(self.counts.values())

    def finish(self, spec: EvalSpec, num_experts: int, seed: int) -> tuple[HeldoutMetrics, dict[str, np.ndarray]]:
        """The metrics and the routing (``[N_real, k]`` int16 expert ids per analysed layer)."""
        if not self.layer_ids:
            raise RuntimeError("no MoE layer routed the held-out tokens (routing record has no matching layer)")
        turns = np.concatenate(self.turn_ids)
        conversations = np.concatenate(self.conversation_ids)
        routing = {name: np.concatenate(chunks).astype(np.int16) for name, chunks in self.layer_ids.items()}
        layers = []
        for name, experts in routing.items():
            test = metrics.separation_test(experts, turns, conversations, num_experts,
                                           n_permutations=spec.null_permutations, seed=seed)
            balance = metrics.load_balance(experts, num_experts)
            layers.append(LayerMetrics(
                layer=name,
                separation=test.separation,
                null_mean=test.null_mean,
                null_std=test.null_std,
                excess_separation=test.excess,
                excess_z=test.z,
                separation_p=test.p_value,
                uncertainty_coefficient=metrics.uncertainty_coefficient(experts, turns, num_experts),
                max_vio=balance.max_vio,
                load_cv=balance.cv,
                load_entropy=balance.load_entropy,
                dead_fraction=balance.dead_fraction,
                load=balance.load.tolist(),
            ))
        means = LayerMeans(**{f.name: float(np.mean([getattr(layer, f.name) for layer in layers]))
                              for f in dataclasses.fields(LayerMeans)})
        order = sorted(self.counts)
        total, count = sum(self.loss_sums.values()), sum(self.counts.values())
        record = HeldoutMetrics(
            loss=total / count,
            tokens=count,
            per_conversation_loss=[self.loss_sums[i] / max(self.counts[i], 1) for i in order],
            streaming=spec.streaming,
            routing_layers=list(routing),
            phase_order_fixed=metrics.phase_order_is_fixed(turns, conversations),
            layers=layers,
            mean_over_layers=means,
        )
        return record, routing


@dataclass
class GroupRouting:
    """One group's slice of a stacked forward's :class:`~chronovisor.model.RoutingRecord`."""

    layer_names: list[str]
    layer_stacks: list[str]
    expert_index: list[torch.Tensor]


def split_routing(record, groups: int) -> list:
    """Group c's routing: the c-th of ``groups`` equal consecutive blocks of every layer's tokens
    (the record itself for one group)."""
    if groups == 1:
        return [record]
    blocks = [index.view(groups, -1, index.shape[-1]) for index in record.expert_index]
    return [GroupRouting(record.layer_names, record.layer_stacks, [block[g] for block in blocks])
            for g in range(groups)]


def heldout_batches(model: torch.nn.Module, heldout: data_lib.ConversationBatch, batch_size: int,
                    device: torch.device) -> Iterator[HeldoutBatch]:
    """The held-out conversations in order, ``batch_size`` per forward, as inputs of ``model`` (the HF model)."""
    for indices in in_order_batches(len(heldout), batch_size):
        yield indices, model_inputs(model, heldout.select(indices), device)


def run_heldout(wrapped, batches: Iterable[HeldoutBatch], accumulators: list[HeldoutAccumulator]) -> None:
    """One forward per batch, the fields frozen; group c of the controller goes to ``accumulators[c]``."""
    groups = len(accumulators)
    wrapped.eval()
    with torch.no_grad():
        for indices, inputs in batches:
            with wrapped.record_routing() as record:
                output = wrapped(**repeat_groups(inputs.kwargs, groups), use_cache=False)
            rows = inputs.targets.shape[0]
            for g, (accumulator, routing) in enumerate(zip(accumulators, split_routing(record, groups), strict=True)):
                accumulator.add(output.logits[g * rows:(g + 1) * rows], inputs.targets, inputs.turn_ids, routing,
                                indices)


def noncausal_losses(wrapped, batches: Iterable[HeldoutBatch], groups: int = 1) -> list[float] | None:
    """Expert Choice models only (None for every other model): each group's held-out loss with
    capacity routing, where every expert chooses among all of a sequence's tokens, later ones
    included. The causal loss (threshold routing) stays the reported one; this is reported beside
    it so the size of the future-token leak is visible. One forward per batch, fields as the causal
    evaluation left them, no ticks (the selections it observes are never stepped into the fields).
    """
    model = wrapped.model
    if not callable(getattr(model, "set_inference_routing", None)):
        return None
    accumulators = [HeldoutAccumulator() for _ in range(groups)]
    previous = model.config.inference_routing
    model.set_inference_routing("capacity")
    try:
        run_heldout(wrapped, batches, accumulators)
    finally:
        model.set_inference_routing(previous)
    return [accumulator.mean_loss() for accumulator in accumulators]


def evaluate_heldout(wrapped, heldout: data_lib.ConversationBatch, spec: EvalSpec, device: torch.device,
                     num_experts: int, seed: int,
                     tick: Tick | None = None) -> tuple[HeldoutMetrics, dict[str, np.ndarray]]:
    """Held-out loss and per-layer routing metrics of one arm.

    Args:
        wrapped: the wrapped model (a single controller).
        heldout: the held-out conversations.
        spec: batch size, permutations, streaming.
        device: where the inputs go.
        num_experts, seed: for the routing metrics and their permutation null.
        tick: with ``spec.streaming``, ``tick(turn, loss)`` after every turn (decoder-only models).

    Returns:
        (metrics, routing) as described in :class:`~chronovisor.eval.record.ArmResult`; for an
        Expert Choice model ``metrics.noncausal_loss`` too (:func:`noncausal_losses`).
    """
    metrics, routing = _evaluate_causal(wrapped, heldout, spec, device, num_experts, seed, tick)
    noncausal = noncausal_losses(wrapped, heldout_batches(wrapped.model, heldout, spec.batch_size, device))
    if noncausal is not None:
        metrics = dataclasses.replace(metrics, noncausal_loss=noncausal[0])
    return metrics, routing


def _evaluate_causal(wrapped, heldout: data_lib.ConversationBatch, spec: EvalSpec, device: torch.device,
                     num_experts: int, seed: int, tick: Tick | None) -> tuple[HeldoutMetrics, dict[str, np.ndarray]]:
    accumulator = HeldoutAccumulator()
    if not spec.streaming:
        run_heldout(wrapped, heldout_batches(wrapped.model, heldout, spec.batch_size, device), [accumulator])
        return accumulator.finish(spec, num_experts, seed)
    if is_encoder_decoder(wrapped.model):
        raise ValueError("eval.streaming needs a decoder-only model (the encoder-decoder layout has no "
                         "per-turn KV-cache path here)")
    wrapped.eval()
    with torch.no_grad():
        turn = 0
        for index in range(len(heldout)):
            for loss in _stream_conversation(wrapped, heldout.select([index]), index, device, accumulator):
                if tick is not None:
                    tick(turn, loss)
                turn += 1
    return accumulator.finish(spec, num_experts, seed)


def _stream_conversation(wrapped, conversation: data_lib.ConversationBatch, index: int, device: torch.device,
                         accumulator: HeldoutAccumulator) -> Iterator[torch.Tensor]:
    """Feed one conversation turn by turn through the KV cache; yields each turn's mean loss.

    Position t of a turn is scored against x_{t+1}, so the last position of a turn predicts the
    first token of the next one, exactly as in the single full forward.
    """
    conversation = conversation.to(device)
    tokens = conversation.input_ids[0]
    length = int(conversation.lengths[0])
    bounds = [*conversation.turn_boundaries[0], length]
    cache = DynamicCache(config=wrapped.model.config)  # filled in place, turn after turn
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        targets = torch.full((1, end - start), data_lib.IGNORE_INDEX, dtype=torch.long, device=device)
        last = min(end, length - 1)
        targets[0, : last - start] = tokens[start + 1: last + 1]
        with wrapped.record_routing() as record:
            output = wrapped(input_ids=tokens[start:end][None], attention_mask=torch.ones(1, end, dtype=torch.long, device=device),
                             cache=cache, use_cache=True)
        yield accumulator.add(output.logits, targets, conversation.turn_ids[:, start:end], record, [index])
