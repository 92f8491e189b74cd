"""OLMoE (transformers 5.x): the Qwen2-MoE router (softmax -> top-k -> optional renormalise).

Router: ``model.layers[i].mlp.gate`` -> ``OlmoeTopKRouter``; every layer is sparse. The router's
forward is line-for-line the one of ``Qwen2MoeTopKRouter`` (``modeling_olmoe.py``)::

    router_logits = F.linear(h.reshape(-1, H), W)                     # [tokens, E], model dtype
    router_probs = softmax(router_logits, dtype=float32, dim=-1)
    top_value, router_indices = topk(router_probs, top_k)
    if norm_topk_prob: top_value /= top_value.sum(-1, keepdim=True)   # OLMoE default: False
    top_value = top_value.to(router_logits.dtype)
"""

from __future__ import annotations

from chronovisor.wrappers.qwen2_moe import Qwen2MoeAdapter
from chronovisor.wrappers.registry import register_family


@register_family
class OlmoeAdapter(Qwen2MoeAdapter):
    family = "olmoe"
    model_types = ("olmoe",)
    router_classes = ("OlmoeTopKRouter",)

