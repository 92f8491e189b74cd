"""Model-family adapters: hook a P×T controller into the MoE routers of HF transformers models.

Public surface (the lead's ``chronovisor.model`` builds on these)::

    from chronovisor.wrappers import describe, attach, build_toy

    info = describe(model)          # ModelInfo: family, router paths, num_layers, num_experts, top_k, ...
    attachment = attach(model, controller)      # Attachment: hooks on every router (prepend=True)
    with attachment.disabled(): ...             # exact base model (paired on/off evaluation)
    with attachment.record_routing() as rec: ...   # per-token [tokens, k] expert ids, on device
    attachment.remove()

One module per family (``mixtral``, ``switch_transformers``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``,
``deepseek_v3``, ``gpt_oss``, ``granitemoe``, ``phimoe``), all registered in ``registry``; the
shared hook machinery is in ``base``; toy presets in ``toy``.
"""

from chronovisor.wrappers.base import (
    Attachment,
    FamilyAdapter,
    RouterLayoutError,
    RouterSite,
    Routing,
    RoutingRecorder,
    UnsupportedModelError,
    WrapperError,
)
from chronovisor.wrappers.registry import ADAPTERS, ModelInfo, attach, describe, detect, supported_families
from chronovisor.wrappers.toy import TOY_PRESETS, ToyPreset, build_toy, list_presets, toy_config

__all__ = [
    "ADAPTERS",
    "Attachment",
    "FamilyAdapter",
    "ModelInfo",
    "RouterLayoutError",
    "RouterSite",
    "Routing",
    "RoutingRecorder",
    "TOY_PRESETS",
    "ToyPreset",
    "UnsupportedModelError",
    "WrapperError",
    "attach",
    "build_toy",
    "describe",
    "detect",
    "list_presets",
    "supported_families",
    "toy_config",
]
