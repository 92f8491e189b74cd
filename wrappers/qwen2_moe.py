"""Qwen2-MoE (transformers 5.x): softmax -> top-k -> optional renormalise -> cast to the logits' dtype.

Router: ``model.layers[i].mlp.gate`` -> ``Qwen2MoeTopKRouter``. Only sparse layers have one:
layer ``i`` is sparse when ``i not in config.mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``;
dense layers are skipped, so the controller's layer index counts MoE routers only. The shared
expert and its sigmoid ``shared_expert_gate`` (an ``nn.Linear``) are left alone.
HF forward (``modeling_qwen2_moe.py``)::

    router_logits = F.linear(h.reshape(-1, H), W)                     # [tokens, E], model dtype
    router_probs = softmax(router_logits, dtype=float32, dim=-1)      # [tokens, E], fp32
    top_value, router_indices = topk(router_probs, top_k)             # [tokens, k]
    if norm_topk_prob: top_value /= top_value.sum(-1, keepdim=True)   # config default False
    top_value = top_value.to(router_logits.dtype)
    return router_logits, top_value, router_indices

Qwen3-MoE and OLMoE have the same router code in 5.x; their modules reuse :func:`select_experts`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chronovisor.wrappers.base import FamilyAdapter, Routing, require_attr, topk_with_choice_bias
from chronovisor.wrappers.registry import register_family


def select_experts(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool,
                   selection_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-MoE's selection on ``router_logits [tokens, E]``.

    Returns ``(router_scores [tokens, k] in router_logits.dtype, router_indices [tokens, k] int64)``.
    A ``selection_bias`` ([E] or [tokens, E]) is added to the fp32 probabilities for the choice only.
    """
    router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)         # [tokens, E] fp32
    router_top_value, router_indices = topk_with_choice_bias(router_probs, top_k, selection_bias)  # [tokens, k]
    if norm_topk_prob:
        router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    router_top_value = router_top_value.to(router_logits.dtype)
    return router_top_value, router_indices


@register_family
class Qwen2MoeAdapter(FamilyAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    router_classes = ("Qwen2MoeTopKRouter",)
    selection_rule = "softmax(fp32) -> top-k -> renormalise if norm_topk_prob -> cast to logits dtype"

    def router_shape(self, site):
        require_attr(self, site, "norm_topk_prob", bool, "a bool")
        return super().router_shape(site)

    def route(self, module, args, output, z, selection_bias) -> Routing:
        router_scores, router_indices = select_experts(z, module.top_k, module.norm_topk_prob, selection_bias)
        return self.topk_routing(z, router_scores, router_indices)

    def constant_single_weight(self, module):
        return bool(module.norm_topk_prob)

