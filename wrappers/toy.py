"""Toy presets: real HF MoE models built from a config with a seeded random init.

    model = build_toy("mixtral-2l8e", seed=0)             # MixtralForCausalLM, eval mode, on the CPU
    model = build_toy("switch-tiny", seed=1, expert_capacity=4)   # overrides go to the config

The research presets (hidden 256, vocab 1000):

* ``mixtral-2l8e``: 2 layers, 8 experts, top-2, FFN 1024, 8 heads / 4 KV heads, tied LM head (~13M
  parameters, like the reference model).
* ``mixtral-4l16e``: the same widths with 4 layers and 16 experts.
* ``switch-2l8e``: SwitchTransformers, top-1, 8 experts, 4 blocks per stack of which 2 are sparse
  (blocks 1 and 3), so 2 encoder + 2 decoder routers (controller L = 4). A sparse step of 2 is
  deliberate: HF 5.x computes the router z-loss and aux loss only when the sparse step is > 1
  (with every block sparse both come back as 0). ``expert_capacity=256`` per sequence (the
  reference runs had no capacity limit; 256 = 2x an even share of a 1024-token sequence).

* ``expertchoice-2l8e`` / ``expertchoice-4l16e``: the Expert Choice model of this project
  (``chronovisor.expert_choice``, experts choose tokens, capacity factor 2 so a token gets 2
  experts on average, like top-2) at the Mixtral presets' widths, 2 x 8 and 4 x 16 experts.

``*-tiny`` presets (hidden 32) exist for tests, one per supported family.

All presets use ``attn_implementation="eager"`` (the only one SwitchTransformers has; deterministic
everywhere) and, where the family supports it, ``experts_implementation="grouped_mm"`` (never
``batched_mm`` on CPU: ~100x slower). The seed is applied inside ``torch.random.fork_rng``, so the
global RNG state is left untouched.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ToyPreset:
    """A named toy model: which HF classes, which config values."""

    name: str
    family: str
    model_class: str
    config_class: str
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    #: the module that defines ``model_class`` and ``config_class``.
    library: str = "transformers"


_MIXTRAL_256 = dict(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_attention_heads=8,
                    num_key_value_heads=4, num_experts_per_tok=2, tie_word_embeddings=True,
                    max_position_embeddings=4096)
_MIXTRAL_32 = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=2, num_experts_per_tok=2, tie_word_embeddings=True,
                   max_position_embeddings=4096)
# decoder_start_token_id: SwitchTransformersConfig 5.x has no default for it, so `labels` without
# `decoder_input_ids` (HF's _shift_right) fails unless it is set; 0 = pad, the T5 convention.
_SWITCH = dict(vocab_size=1000, num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2,
               num_sparse_decoder_layers=2, num_experts=8, decoder_start_token_id=0)
_DECODER_32 = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=512)

# Expert Choice: the Mixtral widths, the sparse block replaced (capacity factor 2 ~ top-2's compute).
_EXPERT_CHOICE = dict(_MIXTRAL_256, capacity_factor=2.0)
del _EXPERT_CHOICE["num_experts_per_tok"]
_EXPERT_CHOICE_32 = dict(_MIXTRAL_32, capacity_factor=2.0)
del _EXPERT_CHOICE_32["num_experts_per_tok"]
_EXPERT_CHOICE_LIBRARY = "chronovisor.expert_choice"

_PRESETS = [
    ToyPreset("mixtral-2l8e", "mixtral", "MixtralForCausalLM", "MixtralConfig",
              dict(_MIXTRAL_256, num_hidden_layers=2, num_local_experts=8),
              "Mixtral 2 layers x 8 experts top-2, hidden 256 (the reference's main model)"),
    ToyPreset("mixtral-4l16e", "mixtral", "MixtralForCausalLM", "MixtralConfig",
              dict(_MIXTRAL_256, num_hidden_layers=4, num_local_experts=16),
              "Mixtral 4 layers x 16 experts top-2, hidden 256 (the reference's scaling model)"),
    ToyPreset("switch-2l8e", "switch_transformers", "SwitchTransformersForConditionalGeneration",
              "SwitchTransformersConfig",
              dict(_SWITCH, d_model=256, d_ff=1024, d_kv=32, num_heads=8, expert_capacity=256,
                   router_aux_loss_coef=0.01, router_z_loss_coef=0.001),
              "Switch top-1, 8 experts, hidden 256; 2 sparse of 4 blocks per stack (enc 2 + dec 2 routers)"),
    ToyPreset("expertchoice-2l8e", "expert_choice", "ExpertChoiceForCausalLM", "ExpertChoiceConfig",
              dict(_EXPERT_CHOICE, num_hidden_layers=2, num_local_experts=8),
              "Expert Choice 2 layers x 8 experts, capacity factor 2, hidden 256 (the plan's third system)",
              library=_EXPERT_CHOICE_LIBRARY),
    ToyPreset("expertchoice-4l16e", "expert_choice", "ExpertChoiceForCausalLM", "ExpertChoiceConfig",
              dict(_EXPERT_CHOICE, num_hidden_layers=4, num_local_experts=16),
              "Expert Choice 4 layers x 16 experts, capacity factor 2, hidden 256",
              library=_EXPERT_CHOICE_LIBRARY),
    ToyPreset("expertchoice-tiny", "expert_choice", "ExpertChoiceForCausalLM", "ExpertChoiceConfig",
              dict(_EXPERT_CHOICE_32, num_hidden_layers=2, num_local_experts=8),
              "test-size expertchoice-2l8e (hidden 32)", library=_EXPERT_CHOICE_LIBRARY),
    ToyPreset("mixtral-tiny", "mixtral", "MixtralForCausalLM", "MixtralConfig",
              dict(_MIXTRAL_32, num_hidden_layers=2, num_local_experts=8),
              "test-size mixtral-2l8e (hidden 32)"),
    ToyPreset("mixtral-tiny-16e", "mixtral", "MixtralForCausalLM", "MixtralConfig",
              dict(_MIXTRAL_32, num_hidden_layers=4, num_local_experts=16),
              "test-size mixtral-4l16e (hidden 32)"),
    ToyPreset("switch-tiny", "switch_transformers", "SwitchTransformersForConditionalGeneration",
              "SwitchTransformersConfig",
              dict(_SWITCH, d_model=32, d_ff=64, d_kv=8, num_heads=4, expert_capacity=64,
                   router_aux_loss_coef=0.01, router_z_loss_coef=0.001),
              "test-size switch-2l8e (hidden 32, capacity 64)"),
    ToyPreset("qwen2_moe-tiny", "qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig",
              dict(_DECODER_32, num_hidden_layers=3, mlp_only_layers=[0], intermediate_size=64,
                   moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
                   norm_topk_prob=False),
              "Qwen2-MoE, 3 layers (layer 0 dense), 8 experts top-2, shared expert, no renormalisation"),
    ToyPreset("qwen3_moe-tiny", "qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig",
              dict(_DECODER_32, head_dim=8, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                   norm_topk_prob=True),
              "Qwen3-MoE, 2 layers, 8 experts top-2, renormalised"),
    ToyPreset("olmoe-tiny", "olmoe", "OlmoeForCausalLM", "OlmoeConfig",
              dict(_DECODER_32, intermediate_size=32, num_experts=8, pad_token_id=1, eos_token_id=2,
                   bos_token_id=None),
              "OLMoE, 2 layers, 8 experts top-2"),
    ToyPreset("deepseek_v3-tiny", "deepseek_v3", "DeepseekV3ForCausalLM", "DeepseekV3Config",
              dict(_DECODER_32, num_hidden_layers=3, num_key_value_heads=4, first_k_dense_replace=1,
                   intermediate_size=64, moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=8,
                   n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16,
                   q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8),
              "DeepSeek-V3, 3 layers (layer 0 dense), 8 routed experts in 2 groups (1 chosen), top-2"),
    ToyPreset("gpt_oss-tiny", "gpt_oss", "GptOssForCausalLM", "GptOssConfig",
              dict(_DECODER_32, intermediate_size=32, head_dim=8, num_local_experts=8, sliding_window=8,
                   max_position_embeddings=131072),
              "GPT-OSS, 2 layers (sliding + full attention), 8 experts top-2"),
    ToyPreset("granitemoe-tiny", "granitemoe", "GraniteMoeForCausalLM", "GraniteMoeConfig",
              dict(_DECODER_32, intermediate_size=32, num_local_experts=8),
              "GraniteMoE, 2 layers, 8 experts top-2"),
    ToyPreset("phimoe-tiny", "phimoe", "PhimoeForCausalLM", "PhimoeConfig",
              dict(_DECODER_32, intermediate_size=32, num_local_experts=8),
              "PhiMoE, 2 layers, 8 experts, sparsemixer top-2"),
]

#: Every toy preset by name.
TOY_PRESETS: dict[str, ToyPreset] = {preset.name: preset for preset in _PRESETS}


def list_presets() -> list[str]:
    """Names of the toy presets."""
    return list(TOY_PRESETS)


def closest_preset(name: str) -> str | None:
    """The toy preset ``name`` is most likely a typo of (difflib ratio ≥ 0.8, case ignored), or None.

    Args:
        name: a model name that is not a preset. A name with a ``/`` (a path or an ``org/model``
            hub id) never looks like a preset.
    """
    if "/" in name:
        return None
    lowered = {preset.lower(): preset for preset in TOY_PRESETS}
    matches = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.8)
    return lowered[matches[0]] if matches else None


def _preset(name: str) -> ToyPreset:
    if name not in TOY_PRESETS:
        guess = closest_preset(name)
        raise ValueError(f"unknown toy preset {name!r}" + (f"; did you mean {guess!r}?" if guess else "")
                         + f" (presets: {', '.join(TOY_PRESETS)})")
    return TOY_PRESETS[name]


def toy_config(name: str, **overrides: Any):
    """The HF config of a preset, with ``overrides`` applied (any config field)."""
    preset = _preset(name)
    values = dict(preset.config)
    values.update(overrides)
    values.setdefault("attn_implementation", "eager")
    config_class = getattr(importlib.import_module(preset.library), preset.config_class)
    return config_class(**values)


def build_toy(name: str, seed: int = 0, **overrides: Any):
    """Build a preset's model with a seeded random init; returned in eval mode on the CPU, fp32.

    ``overrides`` are config fields (e.g. ``expert_capacity=4``, ``num_hidden_layers=3``). The
    same ``(name, seed, overrides)`` gives bit-identical weights; the global RNG is not touched.
    """
    preset = _preset(name)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    config = toy_config(name, **overrides)
    model_class = getattr(importlib.import_module(preset.library), preset.model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    if getattr(model, "_can_set_experts_implementation", lambda: False)():
        model.set_experts_implementation("grouped_mm")
    return model.eval()
