"""DeepSeek-V3 (transformers 5.x): sigmoid scores, group-limited top-k, bias for the choice only.

Router: ``model.layers[i].mlp.gate`` -> ``DeepseekV3TopkRouter``, only for
``i >= config.first_k_dense_replace`` (default 3; the first layers are dense MLPs and are skipped,
so the controller's layer index counts MoE routers only). A shared expert runs beside it.
HF forward (``modeling_deepseek_v3.py``)::

    router_logits = F.linear(h.view(-1, H).float(), W.float())             # [tokens, E], always fp32
    scores = router_logits.sigmoid()                                        # [tokens, E]
    scores_for_choice = scores + e_score_correction_bias                    # [E] fp32 buffer, choice only
    group_scores = scores_for_choice.view(-1, n_group, E // n_group).topk(2)[0].sum(-1)   # [tokens, G]
    group_idx = topk(group_scores, k=topk_group, sorted=False)[1]           # [tokens, topk_group]
    score_mask = the experts of the chosen groups                           # [tokens, E] (0/1)
    scores_for_choice = scores_for_choice.masked_fill(~score_mask, -inf)
    topk_indices = topk(scores_for_choice, k=top_k, sorted=False)[1]        # [tokens, k]
    topk_weights = scores.gather(1, topk_indices)                           # unbiased scores
    if norm_topk_prob: topk_weights /= topk_weights.sum(-1, keepdim=True) + 1e-20
    topk_weights = topk_weights * routed_scaling_factor
    return router_logits, topk_weights, topk_indices

Chronovisor's pressure and temperature act on ``router_logits`` (z = (ℓ + b) / T, then sigmoid), so
they change the choice *and* the weights. The ``loss_free`` comparator's selection bias is added on
top of the model's own ``e_score_correction_bias``, exactly where DeepSeek adds it (choice only).

The correction bias is the only tensor a hook reads from the module; it is [E] and read through
:func:`~chronovisor.wrappers.base.module_tensor`, which also finds it when accelerate offloaded it.
"""

from __future__ import annotations

import torch

from chronovisor.wrappers.base import (
    FamilyAdapter,
    Routing,
    int_attr,
    layout_error,
    module_tensor,
    require_attr,
)
from chronovisor.wrappers.registry import register_family


def select_experts(router_logits: torch.Tensor, *, top_k: int, num_group: int, topk_group: int,
                   norm_topk_prob: bool, routed_scaling_factor: float,
                   e_score_correction_bias: torch.Tensor,
                   selection_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's selection on fp32 ``router_logits [tokens, E]``.

    ``e_score_correction_bias`` is ``[E]`` and ``selection_bias`` ``[E]`` or ``[tokens, E]``, on the
    logits' device; both only change the choice. Returns ``(topk_weights [tokens, k] fp32, topk_indices [tokens, k] int64)``;
    like HF, the indices are not sorted.
    """
    num_experts = router_logits.shape[-1]
    scores = router_logits.sigmoid()                                            # [tokens, E]
    scores_for_choice = scores + e_score_correction_bias
    if selection_bias is not None:
        scores_for_choice = scores_for_choice + selection_bias
    group_scores = (
        scores_for_choice.view(-1, num_group, num_experts // num_group)         # [tokens, G, E/G]
        .topk(2, dim=-1)[0]
        .sum(dim=-1)
    )                                                                           # [tokens, G]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1)
        .expand(-1, num_group, num_experts // num_group)
        .reshape(-1, num_experts)
    )                                                                           # [tokens, E]
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_indices = torch.topk(scores_for_choice, k=top_k, dim=-1, sorted=False)[1]   # [tokens, k]
    topk_weights = scores.gather(1, topk_indices)
    if norm_topk_prob:
        denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
        topk_weights /= denominator
    topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_indices


@register_family
class DeepseekV3Adapter(FamilyAdapter):
    family = "deepseek_v3"
    model_types = ("deepseek_v3",)
    router_classes = ("DeepseekV3TopkRouter",)
    selection_rule = ("sigmoid(fp32) -> + e_score_correction_bias (choice only) -> group-limited top-k "
                      "-> unbiased weights, renormalised if norm_topk_prob, x routed_scaling_factor")

    def router_shape(self, site):
        num_experts, top_k = super().router_shape(site)
        num_group, topk_group = int_attr(self, site, "num_group"), int_attr(self, site, "topk_group")
        if num_experts % num_group or topk_group > num_group or num_experts // num_group < 2:
            raise layout_error(self, site, f"{num_experts} experts cannot form {num_group} groups of >= 2 "
                                           f"with topk_group={topk_group}")
        require_attr(self, site, "norm_topk_prob", bool, "a bool")
        require_attr(self, site, "routed_scaling_factor", (int, float), "a number")
        bias = getattr(site.module, "e_score_correction_bias", None)
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (num_experts,):
            raise layout_error(self, site, f"buffer 'e_score_correction_bias' should have shape [{num_experts}]")
        return num_experts, top_k

    def route(self, module, args, output, z, selection_bias) -> Routing:
        correction = module_tensor(module, "e_score_correction_bias").to(z.device)      # [E]
        topk_weights, topk_indices = select_experts(
            z,
            top_k=module.top_k,
            num_group=module.num_group,
            topk_group=module.topk_group,
            norm_topk_prob=module.norm_topk_prob,
            routed_scaling_factor=module.routed_scaling_factor,
            e_score_correction_bias=correction,
            selection_bias=selection_bias,
        )
        return self.topk_routing(z, topk_weights, topk_indices)

    def constant_single_weight(self, module):
        return bool(module.norm_topk_prob)

