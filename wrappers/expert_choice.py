"""Expert Choice (``chronovisor.expert_choice``): softmax over experts -> every expert takes its tokens.

Router: ``model.layers[i].mlp.gate`` -> ``ExpertChoiceRouter`` (every decoder layer is sparse). It
sees ``(hidden_states [B, S, H], token_mask [B, S] | None)`` and returns
``(router_logits [B*S, E], combine_weights [B*S, E] fp32, dispatch_mask [B*S, E] bool)``; the
selection (:func:`~chronovisor.expert_choice.expert_choice_routing`) is re-run here on the
modulated logits with the router's own settings: capacity routing in training (each expert takes
the top-C_b tokens of each sequence), the router's ``inference_routing`` in eval mode (per-expert
thresholds, causal; or capacity). See ``docs/expert_choice.md`` for what P×T means here.

Counting: the controller counts what the experts *process*, the dispatch mask ``[tokens, E]``
(usage U_e = tokens expert e took; padding excluded), through :meth:`ExpertChoiceAdapter.observed`.
The per-token :class:`Routing` the recorder keeps is a summary with the fixed width the routing
metrics need: each token's ``top_k`` (= round(capacity factor)) experts, those that took it
first (by weight), then its best-scoring other experts with ``dispatched = False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chronovisor.expert_choice import INFERENCE_ROUTINGS, expert_choice_routing
from chronovisor.wrappers.base import FamilyAdapter, Routing, int_attr, layout_error, module_tensor
from chronovisor.wrappers.registry import register_family


def token_summary(output: tuple, top_k: int) -> Routing:
    """The recorder's ``[tokens, top_k]`` view of an Expert Choice router output (see the module doc)."""
    router_logits, combine_weights, dispatch_mask = output                     # [n, E] each
    scores = F.softmax(router_logits.float(), dim=-1)                          # [n, E] in [0, 1]
    rank = scores + dispatch_mask.to(scores.dtype)                             # taken experts first
    expert_index = torch.topk(rank, top_k, dim=-1).indices                     # [n, k]
    return Routing(output, expert_index, combine_weights.gather(-1, expert_index),
                   dispatch_mask.gather(-1, expert_index))


@register_family
class ExpertChoiceAdapter(FamilyAdapter):
    family = "expert_choice"
    model_types = ("expert_choice",)
    router_classes = ("ExpertChoiceRouter",)
    selection_rule = ("softmax over experts -> each expert takes tokens: its top C = ceil(c*n/E) of each "
                      "sequence (training / capacity routing, not causal) or every token scoring >= its "
                      "threshold (threshold routing, causal); weight = the softmax score; top-k = round(c) is "
                      "nominal (a token gets 0..E experts)")
    supports_selection_bias = False           # no choice-only bias: the loss_free comparator is refused

    def router_shape(self, site):
        num_experts = int_attr(self, site, "num_experts", minimum=2)
        top_k = int_attr(self, site, "top_k")
        factor = getattr(site.module, "capacity_factor", None)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= num_experts:
            raise layout_error(self, site, f"attribute 'capacity_factor' should be a number in (0, {num_experts}]")
        if getattr(site.module, "inference_routing", None) not in INFERENCE_ROUTINGS:
            raise layout_error(self, site, f"attribute 'inference_routing' should be one of {INFERENCE_ROUTINGS}")
        if top_k > num_experts:
            raise layout_error(self, site, f"attribute 'top_k' ({top_k}) exceeds num_experts ({num_experts})")
        return num_experts, top_k

    def hf_routing(self, module, args, output):
        return token_summary(output, module.top_k)

    def route(self, module, args, output, z, selection_bias) -> Routing:
        hidden_states = args[0]                                                 # [B, S, H]
        token_mask = args[1] if len(args) > 1 else None                         # [B, S] or None
        routing = module.routing
        threshold = module_tensor(module, "threshold") if routing == "threshold" else None
        combine_weights, dispatch_mask = expert_choice_routing(
            z, hidden_states.shape[0], module.capacity_factor, routing, threshold, token_mask)
        return token_summary((z, combine_weights, dispatch_mask), module.top_k)

    def observed(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every (token, expert) pair, counted where the expert took the token: ``[tokens, E]`` each."""
        _, combine_weights, dispatch_mask = routing.output
        tokens, num_experts = dispatch_mask.shape
        expert_index = torch.arange(num_experts, device=dispatch_mask.device).expand(tokens, num_experts)
        return expert_index, combine_weights, dispatch_mask

    def constant_single_weight(self, module):
        return False                       # the weight is the softmax score, never renormalised
