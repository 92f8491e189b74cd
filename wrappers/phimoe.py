"""PhiMoE (transformers 5.x): ``sparsemixer`` (two masked top-1 rounds; Gumbel sampling in training).

Router: ``model.layers[i].mlp.router`` -> ``PhimoeTopKRouter``, a subclass of ``nn.Linear`` whose
forward returns a tuple (so its hook sees the tuple, not the bare logits). Every layer is sparse.
HF forward (``modeling_phimoe.py``)::

    if training and input_jitter_noise > 0: h *= U(1 - eps, 1 + eps)          # in place
    router_logits = nn.Linear.forward(h)                                      # [tokens, E], model dtype
    routing_weights, selected_experts = sparsemixer(router_logits, jitter_eps=router_jitter_noise,
                                                    training=self.training, top_k=top_k)
    return router_logits, routing_weights, selected_experts                   # [tokens, 2] each

``sparsemixer`` always picks exactly two experts, whatever ``top_k`` says. Eval: round 1 takes the
argmax; experts whose logit is more than ``2 * jitter_eps`` (relative) below the max are masked and
the weight is the masked softmax at the argmax; round 2 repeats on the logits with the first pick
removed. Training: each round samples with Gumbel noise (global RNG) and uses a custom autograd
function (Heun's third-order straight-through estimate).

Chronovisor calls HF's own ``sparsemixer`` on z, so both eval and training are exact (training
draws fresh Gumbel noise for the re-run, after HF's own draw was discarded: the RNG stream
advances twice per router call). There is no choice-only variant of sparsemixer, so the
``loss_free`` comparator (``selection_bias``) is not supported for this family.
"""

from __future__ import annotations

from chronovisor.wrappers.base import FamilyAdapter, Routing, int_attr, layout_error, require_attr
from chronovisor.wrappers.registry import register_family


@register_family
class PhimoeAdapter(FamilyAdapter):
    family = "phimoe"
    model_types = ("phimoe",)
    router_classes = ("PhimoeTopKRouter",)
    selection_rule = ("sparsemixer: two masked top-1 rounds (argmax in eval, Gumbel sampling in training), "
                      "weight = masked softmax at the pick; always 2 experts")
    supports_selection_bias = False

    def router_shape(self, site):
        num_experts = int_attr(self, site, "num_experts", minimum=2)
        int_attr(self, site, "top_k")
        if getattr(site.module, "out_features", None) != num_experts:
            raise layout_error(self, site, f"out_features should equal num_experts={num_experts}")
        require_attr(self, site, "router_jitter_noise", (int, float), "a number")
        return num_experts, 2                                   # sparsemixer always selects two

    def route(self, module, args, output, z, selection_bias) -> Routing:
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        routing_weights, selected_experts = sparsemixer(
            z, jitter_eps=module.router_jitter_noise, training=module.training, top_k=module.top_k
        )                                                                        # [tokens, 2] each
        return self.topk_routing(z, routing_weights, selected_experts)

    def constant_single_weight(self, module):
        return False                      # sparsemixer always mixes two experts

