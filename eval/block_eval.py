"""Held-out next-token loss of a causal LM over token blocks (a bare HF model or a ChronovisorModel)."""

from __future__ import annotations

import torch

from chronovisor.eval.data import next_token_labels
from chronovisor.eval.inputs import token_cross_entropy


def block_loss(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over every block's tokens after its first.

    Args:
        model: called as ``model(input_ids=..., use_cache=False)``; evaluated in ``no_grad``.
        ids: ``[N, seq_len]`` blocks.
        batch_size: blocks per forward.
    """
    if len(ids) == 0:
        raise ValueError("block_loss: no blocks to evaluate (the split is shorter than one block; lower seq_len)")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            batch = ids[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            loss_sum, scored = token_cross_entropy(logits, next_token_labels(batch))
            total += float(loss_sum)
            count += scored
    return total / count
