"""Mixtral (transformers 5.x): softmax -> top-k -> renormalise.

Router: ``model.layers[i].mlp.gate`` -> ``MixtralTopKRouter`` (every decoder layer is sparse).
HF forward (``modeling_mixtral.py``)::

    router_logits = F.linear(h.reshape(-1, H), W)                 # [tokens, E], model dtype
    router_probs = softmax(router_logits.float(), dim=-1)         # [tokens, E], fp32
    top_value, router_indices = topk(router_probs, top_k)         # [tokens, k]
    top_value /= top_value.sum(-1, keepdim=True)                  # always renormalised, fp32
    return router_logits, top_value, router_indices
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chronovisor.wrappers.base import FamilyAdapter, Routing, topk_with_choice_bias
from chronovisor.wrappers.registry import register_family


def select_experts(router_logits: torch.Tensor, top_k: int,
                   selection_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's selection on ``router_logits [tokens, E]``.

    Returns ``(router_scores [tokens, k] fp32, router_indices [tokens, k] int64)``. With a
    ``selection_bias`` ([E] or [tokens, E], on the logits' device) the top-k is taken over
    ``probs + bias`` and the weights are the unbiased probabilities of the chosen experts, renormalised.
    """
    router_probs = F.softmax(router_logits.float(), dim=-1)                     # [tokens, E] fp32
    router_top_value, router_indices = topk_with_choice_bias(router_probs, top_k, selection_bias)  # [tokens, k]
    router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    return router_top_value, router_indices


@register_family
class MixtralAdapter(FamilyAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    router_classes = ("MixtralTopKRouter",)
    selection_rule = "softmax(fp32) -> top-k -> renormalise"

    def route(self, module, args, output, z, selection_bias) -> Routing:
        router_scores, router_indices = select_experts(z, module.top_k, selection_bias)    # [tokens, k] each
        return self.topk_routing(z, router_scores, router_indices)
