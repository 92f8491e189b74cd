"""Qwen3-MoE (transformers 5.x): the Qwen2-MoE router (softmax -> top-k -> optional renormalise).

Router: ``model.layers[i].mlp.gate`` -> ``Qwen3MoeTopKRouter``; sparse layers as in Qwen2-MoE
(``mlp_only_layers``, ``decoder_sparse_step``), no shared expert. The router's forward is
line-for-line the one of ``Qwen2MoeTopKRouter`` (``modeling_qwen3_moe.py``)::

    router_logits = F.linear(h.reshape(-1, H), W)                     # [tokens, E], model dtype
    router_probs = softmax(router_logits, dtype=float32, dim=-1)
    top_value, router_indices = topk(router_probs, top_k)
    if norm_topk_prob: top_value /= top_value.sum(-1, keepdim=True)   # Qwen3 checkpoints: True
    top_value = top_value.to(router_logits.dtype)
"""

from __future__ import annotations

from chronovisor.wrappers.qwen2_moe import Qwen2MoeAdapter
from chronovisor.wrappers.registry import register_family


@register_family
class Qwen3MoeAdapter(Qwen2MoeAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    router_classes = ("Qwen3MoeTopKRouter",)

