"""GPT-OSS (transformers 5.x): top-k on the raw logits -> softmax over the k, in the logits' dtype.

Router: ``model.layers[i].mlp.router`` -> ``GptOssTopKRouter`` (every layer is sparse). It has a
real ``bias`` [E] parameter; Chronovisor leaves it alone and acts on the logits it produced.
HF forward (``modeling_gpt_oss.py``)::

    router_logits = F.linear(h, W, bias)                                      # [tokens, E], model dtype
    top_value, router_indices = topk(router_logits, top_k)                    # [tokens, k]
    router_scores = softmax(top_value, dim=1, dtype=top_value.dtype)          # in the logits' dtype
    return router_logits, router_scores, router_indices

Caveat: ``GptOssMLP`` carries ``@use_kernel_forward_from_hub("MegaBlocksMoeMLP")``; with the
``kernels`` package and ``use_kernels=True`` the whole MLP forward is replaced and the router (and
so its hook) may never run. Chronovisor assumes the default (no hub kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chronovisor.wrappers.base import FamilyAdapter, Routing, topk_with_choice_bias
from chronovisor.wrappers.registry import register_family


def select_experts(router_logits: torch.Tensor, top_k: int,
                   selection_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS's selection on ``router_logits [tokens, E]``.

    Returns ``(router_scores [tokens, k] in router_logits.dtype, router_indices [tokens, k] int64)``.
    A ``selection_bias`` ([E] or [tokens, E]) is added (in fp32) to the logits for the choice only;
    the softmax runs over the unbiased logits of the chosen experts.
    """
    router_top_value, router_indices = topk_with_choice_bias(router_logits, top_k, selection_bias)  # [tokens, k]
    router_scores = F.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
    return router_scores, router_indices


@register_family
class GptOssAdapter(FamilyAdapter):
    family = "gpt_oss"
    model_types = ("gpt_oss",)
    router_classes = ("GptOssTopKRouter",)
    selection_rule = "top-k on logits -> softmax over the k (logits dtype)"

    def route(self, module, args, output, z, selection_bias) -> Routing:
        router_scores, router_indices = select_experts(z, module.top_k, selection_bias)    # [tokens, k] each
        return self.topk_routing(z, router_scores, router_indices)
