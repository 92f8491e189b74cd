"""Model-family adapters: hook a P×T controller into the MoE routers of HF transformers models.

Public surface (``chronovisor.model`` builds on these)::

    from chronovisor.wrappers import describe, attach, build_toy

    info = describe(model)          # ModelInfo: family, router paths, num_layers, num_experts, top_k, ...
    attachment = attach(model, controller)      # Attachment: hooks on every router (prepend=True)
    attachment = attach(model, controller, stacks=("decoder",))   # only the decoder's routers
    with attachment.disabled(): ...             # exact base model (paired on/off evaluation)
    with attachment.record_routing() as rec: ...   # per-token [tokens, k] expert ids, on device
    attachment.remove()

Extension point: one module per family (``deepseek_v3``, ``expert_choice``, ``gpt_oss``, ``granitemoe``, ``mixtral``,
``olmoe``, ``phimoe``, ``qwen2_moe``, ``qwen3_moe``, ``switch_transformers``), each a
:class:`FamilyAdapter` subclass that registers itself with :func:`register_family` when it is
imported (below); the shared hook machinery is in ``base``, discovery in ``registry``, toy presets
in ``toy``. A new family is a new module here plus its import below.
"""

# Importing the family modules registers their adapters.
from chronovisor.wrappers import (
    deepseek_v3,
    expert_choice,
    gpt_oss,
    granitemoe,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_moe,
    switch_transformers,
)
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
from chronovisor.wrappers.registry import (
    ADAPTERS,
    ModelInfo,
    Routers,
    attach,
    describe,
    discover,
    register_family,
    supported_families,
)
from chronovisor.wrappers.toy import TOY_PRESETS, ToyPreset, build_toy, list_presets, toy_config

__all__ = [
    "ADAPTERS",
    "Attachment",
    "FamilyAdapter",
    "ModelInfo",
    "RouterLayoutError",
    "RouterSite",
    "Routers",
    "Routing",
    "RoutingRecorder",
    "TOY_PRESETS",
    "ToyPreset",
    "UnsupportedModelError",
    "WrapperError",
    "attach",
    "build_toy",
    "deepseek_v3",
    "describe",
    "expert_choice",
    "discover",
    "gpt_oss",
    "granitemoe",
    "list_presets",
    "mixtral",
    "olmoe",
    "phimoe",
    "qwen2_moe",
    "qwen3_moe",
    "register_family",
    "supported_families",
    "switch_transformers",
    "toy_config",
]
