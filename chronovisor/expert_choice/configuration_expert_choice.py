"""Configuration of the Expert Choice MoE causal language model (Zhou et al., NeurIPS 2022).

A Mixtral-shaped decoder (the same attention, RMSNorm and rotary embedding) whose sparse block
routes the other way round: every expert chooses tokens. See ``modeling_expert_choice.py`` for
the block and ``docs/expert_choice.md`` for what the P×T controller means on it.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

#: The two ways a router selects at inference (training always uses ``"capacity"``).
INFERENCE_ROUTINGS = ("threshold", "capacity")


@strict
class ExpertChoiceConfig(PreTrainedConfig):
    r"""Configuration of :class:`ExpertChoiceForCausalLM`.

    The attention, norm and rotary fields mean what they mean in ``MixtralConfig``. The routing fields:

    Args:
        num_local_experts: experts per sparse block E.
        capacity_factor: c, the mean number of experts per token. With ``capacity`` routing each
            expert takes C = ceil(c * n / E) tokens of each sequence of n real tokens.
        inference_routing: how routers select in eval mode. ``"threshold"`` (the default) is
            causal: expert e takes every token whose score reaches its threshold θ_e, an EMA of the
            C-th highest score e saw during training. ``"capacity"`` is training's choice: not
            causal, since a token's experts depend on the later tokens of its sequence.
        threshold_momentum: decay m of the threshold EMA (bias-corrected), updated in training steps.
        output_router_logits: return every router's logits (``[tokens, E]`` per layer).

    There is no auxiliary load-balancing loss: Expert Choice is balanced by construction.
    """

    model_type = "expert_choice"
    default_theta = 1000000.0
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_experts": "num_local_experts"}

    vocab_size: int = 1000
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    sliding_window: int | None = None
    attention_dropout: float | int = 0.0
    num_local_experts: int = 8
    capacity_factor: float | int = 2.0
    inference_routing: str = "threshold"
    threshold_momentum: float = 0.99
    output_router_logits: bool = False
    rope_parameters: RopeParameters | dict | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_routing(self):
        """Part of ``@strict`` validation: the routing fields."""
        if self.num_local_experts < 2:
            raise ValueError(f"num_local_experts must be >= 2, got {self.num_local_experts}")
        if not 0 < self.capacity_factor <= self.num_local_experts:
            raise ValueError(f"capacity_factor must be in (0, num_local_experts={self.num_local_experts}], "
                             f"got {self.capacity_factor}")
        if self.inference_routing not in INFERENCE_ROUTINGS:
            raise ValueError(f"inference_routing must be one of {INFERENCE_ROUTINGS}, got {self.inference_routing!r}")
        if not 0 <= self.threshold_momentum < 1:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {self.threshold_momentum}")


__all__ = ["ExpertChoiceConfig", "INFERENCE_ROUTINGS"]
