"""SwitchTransformers (transformers 5.x): softmax -> argmax (top-1) -> per-sequence capacity mask.

Routers: ``{encoder,decoder}.block[i].layer[-1].mlp.router`` -> ``SwitchTransformersTop1Router``,
in the sparse blocks only (``i % sparse_step == 1``, or every block when the step is 1; the step is
``num_layers // num_sparse_{encoder,decoder}_layers``). Controller layers: encoder routers first,
then decoder routers, each in block order. Padding masks are read where each stack receives
its ``attention_mask`` (the encoder gets the model's ``attention_mask``, the decoder its
``decoder_attention_mask``), so ``generate`` and direct encoder calls are covered too.

HF forward (``modeling_switch_transformers.py``; the router sees ``[B, S, H]``, not flattened)::

    h = h.to(router_dtype)                                   # fp32 by default; in place jitter in training
    router_logits = classifier(h)                            # [B, S, E], router_dtype
    router_probs = softmax(router_logits, dim=-1, dtype=router_dtype).to(input_dtype)
    expert_index = one_hot(argmax(router_probs, -1), E)      # [B, S, E]
    token_priority = cumsum(expert_index, dim=-2)            # position in the expert's queue, per sequence
    expert_index = expert_index * (token_priority <= expert_capacity)
    router_probs = max(router_probs, -1).values.unsqueeze(-1)   # [B, S, 1], weight = top prob, no renorm
    return expert_index, router_probs, router_logits

Quirks of 5.x worth knowing (all reproduced, none changed):

* a token over capacity gets an all-zero dispatch row and a **zero** MoE output (residual only);
  v4 instead passed ``router_probs * hidden`` through;
* argmax is taken on the probabilities *after* the cast to the input dtype (bf16 ties possible);
* ``output_router_logits`` records ``router_logits`` (index 2). The z-loss and the aux loss are
  computed from those logits, with expert indices from their plain argmax (capacity ignored), and
  **only when the sparse step is > 1**: with every block sparse both losses come back as 0;
* the router rebinds ``self.classifier = self.classifier.to(router_dtype)`` on every call.

Counting: the controller observes the router's *choice* (the argmax) for every real token,
including tokens the capacity limit then drops (``Routing.dispatched`` marks those, and
``RoutingRecorder.counts(dispatched_only=True)`` excludes them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chronovisor.wrappers.base import FamilyAdapter, RouterSite, Routing, int_attr, layout_error
from chronovisor.wrappers.registry import register_family


def select_experts(router_logits: torch.Tensor, *, expert_capacity: int, router_dtype: torch.dtype,
                   input_dtype: torch.dtype, selection_bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Switch's top-1 selection with capacity on ``router_logits [B, S, E]``.

    Returns ``(expert_index [B, S, E] int64, capacity-masked one-hot; router_probs [B, S, 1] in
    input_dtype; chosen [B, S] int64, the argmax before the capacity mask)``. A
    ``selection_bias`` ([E], or [B*S, E] from a stacked controller) is added to the probabilities for the choice only; the weight is then
    the unbiased probability of the chosen expert.
    """
    num_experts = router_logits.shape[-1]
    router_probs = F.softmax(router_logits, dim=-1, dtype=router_dtype).to(input_dtype)   # [B, S, E]
    if selection_bias is None:
        chosen = torch.argmax(router_probs, dim=-1)                                          # [B, S]
    else:
        bias = selection_bias if selection_bias.dim() == 1 else selection_bias.reshape(router_probs.shape)
        chosen = torch.argmax(router_probs.float() + bias, dim=-1)
    expert_index = F.one_hot(chosen, num_classes=num_experts)                                # [B, S, E]
    token_priority = torch.cumsum(expert_index, dim=-2)
    expert_capacity_mask = token_priority <= expert_capacity
    expert_index = expert_index * expert_capacity_mask
    if selection_bias is None:
        router_probs = torch.max(router_probs, dim=-1).values.unsqueeze(-1)                  # [B, S, 1]
    else:
        router_probs = router_probs.gather(-1, chosen.unsqueeze(-1))
    return expert_index, router_probs, chosen


@register_family
class SwitchTransformersAdapter(FamilyAdapter):
    family = "switch_transformers"
    model_types = ("switch_transformers",)
    router_classes = ("SwitchTransformersTop1Router",)
    selection_rule = ("softmax(router_dtype) -> argmax (top-1) -> per-sequence expert capacity mask; "
                      "weight = top probability (no renormalisation)")

    def router_sites(self, model, routers, mask_source) -> list[RouterSite]:
        """Encoder routers first, then decoder routers (each in block order); the mask source of a
        router is its ``SwitchTransformersStack``, the innermost one whose path prefixes it."""
        found = []
        for path, module in routers:
            stack_path, is_decoder = _owning_stack(model, path)
            found.append((is_decoder, path, module, stack_path))
        found.sort(key=lambda item: item[0])          # stable: encoder routers first, then decoder
        return [RouterSite(layer=i, path=path, module=module,
                           stack="decoder" if is_decoder else "encoder",
                           mask_source=stack_path)
                for i, (is_decoder, path, module, stack_path) in enumerate(found)]

    def router_shape(self, site):
        module = site.module
        num_experts = int_attr(self, site, "num_experts", minimum=2)
        int_attr(self, site, "expert_capacity", minimum=0)
        classifier = getattr(module, "classifier", None)
        if not isinstance(classifier, nn.Linear) or classifier.out_features != num_experts:
            raise layout_error(self, site, f"'classifier' should be an nn.Linear with {num_experts} outputs")
        if not isinstance(getattr(module, "dtype", None), torch.dtype):
            raise layout_error(self, site, "attribute 'dtype' (the router dtype) should be a torch.dtype")
        return num_experts, 1

    def router_logits(self, output):
        router_logits = output[2]                                                 # [B, S, E]
        return router_logits.reshape(-1, router_logits.shape[-1])                # [B*S, E]

    def hf_routing(self, module, args, output):
        expert_index, router_probs, router_logits = output                       # [B,S,E], [B,S,1], [B,S,E]
        num_experts = router_logits.shape[-1]
        # The argmax choice is not in the output for dropped tokens (their row is all zero): redo it.
        probs = F.softmax(router_logits, dim=-1, dtype=module.dtype).to(router_probs.dtype)
        chosen = torch.argmax(probs, dim=-1).reshape(-1, 1)                      # [B*S, 1]
        dispatched = expert_index.reshape(-1, num_experts).sum(dim=-1, keepdim=True) > 0
        return Routing(output, chosen, router_probs.reshape(-1, 1), dispatched)

    def route(self, module, args, output, z, selection_bias) -> Routing:
        hf_expert_index, hf_router_probs, router_logits = output
        z = z.reshape(router_logits.shape)                                       # [B, S, E]
        expert_index, router_probs, chosen = select_experts(
            z,
            expert_capacity=module.expert_capacity,
            router_dtype=module.dtype,
            input_dtype=hf_router_probs.dtype,           # HF casts the probabilities to the input dtype
            selection_bias=selection_bias,
        )
        num_experts = z.shape[-1]
        dispatched = expert_index.reshape(-1, num_experts).sum(dim=-1, keepdim=True) > 0   # [B*S, 1]
        return Routing((expert_index, router_probs, z), chosen.reshape(-1, 1), router_probs.reshape(-1, 1),
                       dispatched)

    def constant_single_weight(self, module):
        return False                      # the weight is the top softmax probability, not renormalised


def _owning_stack(model: nn.Module, path: str) -> tuple[str, bool]:
    """``(path, is_decoder)`` of the innermost ``SwitchTransformersStack`` that contains ``path``
    (``("", False)`` when none does)."""
    parts = path.split(".")
    for length in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:length])
        module = model.get_submodule(prefix) if prefix else model
        if type(module).__name__ == "SwitchTransformersStack":
            return prefix, bool(getattr(module, "is_decoder", False))
    return "", False
