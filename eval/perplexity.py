"""Held-out perplexity with the controller on and off on the same tokens (``chronovisor eval``).

Every batch runs twice: first with the controller disabled (the exact base model), then with it
on. The controller is frozen by default (it steers with the fields it was loaded with and
observes nothing); with ``online`` it steps after every batch (online adaptation, the batches in
file order). Each sequence gives its mean next-token NLL under both arms; the paired difference
on − off per sequence gets a Student-t interval (:func:`~chronovisor.eval.stats.paired_t_interval`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from chronovisor.eval import data as data_lib
from chronovisor.eval.inputs import model_inputs
from chronovisor.eval.stats import DEFAULT_CONFIDENCE, TInterval, paired_t_interval


@dataclass(frozen=True)
class PerplexityComparison:
    """Perplexity on vs off over the same tokens, and the paired per-sequence difference.

    Attributes:
        sequences, tokens: scored sequences and next-token targets (padding excluded).
        perplexity_on, perplexity_off: exp(total NLL / tokens) of each arm.
        nll_on, nll_off: mean NLL per token (nats) of each arm.
        delta_nll: the per-sequence mean-NLL difference on − off: mean, t-interval, p-value
            (negative = the controller lowers the loss).
        online: whether the controller stepped after every batch.
    """

    sequences: int
    tokens: int
    perplexity_on: float
    perplexity_off: float
    nll_on: float
    nll_off: float
    delta_nll: TInterval
    online: bool

    def line(self) -> str:
        """One table line: perplexities, relative change and the difference's interval."""
        delta = self.delta_nll
        change = 100.0 * (self.perplexity_on / self.perplexity_off - 1.0)
        interval = (f"[{delta.low:+.5f}, {delta.high:+.5f}] p={delta.p_value:.3g}" if math.isfinite(delta.low)
                    else f"(no interval: {delta.reason})")
        return (f"| ppl on {self.perplexity_on:.4f} | ppl off {self.perplexity_off:.4f} | {change:+.3f}% "
                f"| Δnll/token on−off {delta.mean:+.5f} {interval} ({100 * delta.confidence:.0f}%) "
                f"| {self.sequences} seqs, {self.tokens} tokens | {'online' if self.online else 'frozen'} |")


def sequence_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NLL sum and scored-target count: logits ``[B, S, V]``, targets ``[B, S]`` → two ``[B]``."""
    losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets,
                                               ignore_index=data_lib.IGNORE_INDEX, reduction="none")
    return losses.sum(dim=1), (targets != data_lib.IGNORE_INDEX).sum(dim=1)


@torch.no_grad()
def compare_perplexity(wrapped, batch: data_lib.ConversationBatch, *, batch_size: int = 8, online: bool = False,
                       device: torch.device | str = "cpu",
                       confidence: float = DEFAULT_CONFIDENCE) -> PerplexityComparison:
    """Perplexity of ``wrapped`` with its controller on and off on every sequence of ``batch``.

    Args:
        wrapped: a :class:`~chronovisor.model.ChronovisorModel` (its step mode is left as it was).
        batch: the held-out sequences (e.g. :func:`~chronovisor.eval.text_datasets.as_conversation_batch`).
        batch_size: sequences per forward.
        online: step the controller after every batch (default: frozen, no step, nothing observed).
        device: where the inputs go (the model is expected there already).
        confidence: of the interval.
    """
    sums = {"on": [], "off": []}
    counts = []
    for chunk in data_lib.iterate_batches(batch, batch_size):
        inputs = model_inputs(wrapped, chunk, torch.device(device))
        with wrapped.disable_controller():
            off, count = sequence_nll(wrapped.model(**inputs.kwargs, use_cache=False).logits, inputs.targets)
        with nullcontext() if online else wrapped.attachment.frozen():
            on, _ = sequence_nll(wrapped.model(**inputs.kwargs, use_cache=False).logits, inputs.targets)
        if online:
            wrapped.controller.step()
        sums["off"].append(off)
        sums["on"].append(on)
        counts.append(count)
    count = torch.cat(counts).double().cpu()
    total_on, total_off = (torch.cat(sums[arm]).double().cpu() for arm in ("on", "off"))
    scored = count > 0
    if not bool(scored.any()):
        raise ValueError("no sequence has a next-token target (every sequence is a single token)")
    tokens = int(count.sum())
    nll_on, nll_off = float(total_on.sum()) / tokens, float(total_off.sum()) / tokens
    deltas = ((total_on - total_off)[scored] / count[scored]).numpy()
    return PerplexityComparison(
        sequences=int(scored.sum()), tokens=tokens, perplexity_on=math.exp(nll_on), perplexity_off=math.exp(nll_off),
        nll_on=nll_on, nll_off=nll_off, delta_nll=paired_t_interval(deltas, confidence), online=online)

