"""GraniteMoE (transformers 5.x): fp32 logits -> top-k -> softmax over the k -> input dtype.

Router: ``model.layers[i].block_sparse_moe.router`` -> ``GraniteMoeTopKRouter`` (every layer is
sparse). HF forward (``modeling_granitemoe.py``)::

    router_logits = F.linear(h, W).float()                                # [tokens, E], always fp32
    top_k_logits, top_k_index = router_logits.topk(top_k, dim=-1)         # [tokens, k]
    top_k_weights = softmax(top_k_logits, dim=-1).type_as(h)              # back to the input dtype
    return router_logits, top_k_weights, top_k_index

GraniteMoeShared / GraniteMoeHybrid have their own router classes and are not covered here.
"""

from __future__ import annotations

import torch

from chronovisor.wrappers.base import FamilyAdapter, Routing, topk_with_choice_bias
from chronovisor.wrappers.registry import register_family


def select_experts(router_logits: torch.Tensor, top_k: int, weights_dtype: torch.dtype,
                   selection_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GraniteMoE's selection on fp32 ``router_logits [tokens, E]``.

    Returns ``(top_k_weights [tokens, k] in weights_dtype, top_k_index [tokens, k] int64)``;
    ``weights_dtype`` is the dtype of the router's input (HF's ``.type_as(hidden_states)``).
    A ``selection_bias`` ([E] or [tokens, E]) is added to the logits for the choice only.
    """
    top_k_logits, top_k_index = topk_with_choice_bias(router_logits, top_k, selection_bias)   # [tokens, k]
    top_k_weights = torch.softmax(top_k_logits, dim=-1).to(weights_dtype)
    return top_k_weights, top_k_index


@register_family
class GraniteMoeAdapter(FamilyAdapter):
    family = "granitemoe"
    model_types = ("granitemoe",)
    router_classes = ("GraniteMoeTopKRouter",)
    selection_rule = "fp32 logits -> top-k -> softmax over the k -> input dtype"

    def route(self, module, args, output, z, selection_bias) -> Routing:
        hf_weights = output[1]                                                   # [tokens, k]
        # HF's weights are already `.type_as(hidden_states)`: their dtype is the input's.
        top_k_weights, top_k_index = select_experts(z, module.top_k, hf_weights.dtype, selection_bias)
        return self.topk_routing(z, top_k_weights, top_k_index)
