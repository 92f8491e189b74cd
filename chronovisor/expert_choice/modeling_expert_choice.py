"""Expert Choice MoE causal language model: experts choose their tokens (Zhou et al., NeurIPS 2022).

The decoder is Mixtral's (attention, RMSNorm and rotary embedding are imported from
``transformers.models.mixtral``); only the sparse block differs. One block, for ``x [B, S, H]``::

    router_logits = x @ W_r.T                                   # [B*S, E]
    S = softmax(router_logits, over experts)                    # [B*S, E] fp32, the affinities
    capacity routing (training; inference_routing="capacity"):
        each expert e takes the C_b tokens of sequence b with the highest S[:, e],
        C_b = ceil(c * n_b / E) for n_b real tokens (padding is never taken)
    threshold routing (inference_routing="threshold", the default in eval mode, causal):
        expert e takes every real token t with S[t, e] >= θ_e; θ_e is a bias-corrected EMA of the
        C-th highest score e took in training (Expert-Threshold routing)
    combine[t, e] = S[t, e] if e took t else 0                  # [B*S, E]
    y_t = Σ_e combine[t, e] · FFN_e(x_t)                        # a token no expert took gets 0 (residual only)

The FFNs run on gathered tokens only: per expert, ``x[tokens of e] -> SwiGLU_e -> * weight ->
index_add_`` into the output (no dense all-experts compute).

Capacity routing is not causal: whether expert e takes token t depends on the scores of the
sequence's later tokens. Held-out losses of such a model are reported in threshold routing
(``set_inference_routing``) with the capacity loss beside it, so the size of that leak is visible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.mixtral.modeling_mixtral import (
    MixtralAttention,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
)
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from chronovisor.expert_choice.configuration_expert_choice import INFERENCE_ROUTINGS, ExpertChoiceConfig


# ------------------------------------------------------------------------------ selection
def nominal_top_k(capacity_factor: float, num_experts: int) -> int:
    """The experts per token a controller sizes for: c rounded, in [1, E] (tokens vary around it)."""
    return max(1, min(num_experts, round(capacity_factor)))


def expert_capacity(num_tokens: int, capacity_factor: float, num_experts: int) -> int:
    """C = ceil(c * n / E): the tokens an expert takes from a sequence of ``num_tokens`` (at most n)."""
    return min(num_tokens, math.ceil(capacity_factor * num_tokens / num_experts))


def expert_choice_routing(router_logits: torch.Tensor, batch_size: int, capacity_factor: float, routing: str,
                          threshold: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert Choice selection on ``router_logits [B*S, E]`` (rows in batch-major order).

    Args:
        router_logits: the (possibly modulated) router logits, any dtype.
        batch_size: B; each of the B sequences is chosen from separately.
        capacity_factor: c.
        routing: ``"capacity"`` (top-C_b tokens per expert and sequence) or ``"threshold"``.
        threshold: ``[E]`` per-expert score thresholds (``"threshold"`` only).
        token_mask: ``[B, S]`` bool, True for real tokens; padding is never taken. None: all real.

    Returns:
        ``(combine_weights [B*S, E] fp32, dispatch_mask [B*S, E] bool)``: S[t, e] where expert e
        took token t, else 0; and which experts took which tokens.
    """
    tokens, num_experts = router_logits.shape
    seq_len = tokens // batch_size
    scores = F.softmax(router_logits.float(), dim=-1)                                   # [B*S, E]
    real = None if token_mask is None else token_mask.reshape(tokens).to(torch.bool)    # [B*S]
    if routing == "threshold":
        dispatch = scores >= threshold.to(device=scores.device, dtype=scores.dtype)     # [B*S, E]
        if real is not None:
            dispatch = dispatch & real.unsqueeze(-1)
    elif routing == "capacity":
        per_sequence = scores.view(batch_size, seq_len, num_experts).transpose(1, 2)    # [B, E, S]
        if real is not None:
            per_sequence = per_sequence.masked_fill(~real.view(batch_size, 1, seq_len), -1.0)
        capacity = expert_capacity(seq_len, capacity_factor, num_experts)
        chosen = torch.topk(per_sequence, capacity, dim=-1).indices                     # [B, E, C]
        if real is None:
            keep = torch.ones_like(chosen, dtype=torch.bool)                            # [B, E, C]
        else:
            real_tokens = real.view(batch_size, seq_len).sum(-1).double()               # [B]
            row_capacity = torch.ceil(real_tokens * capacity_factor / num_experts)      # [B], C_b <= n_b
            rank = torch.arange(capacity, device=chosen.device, dtype=torch.float64)    # [C]
            keep = (rank.view(1, 1, -1) < row_capacity.view(-1, 1, 1)).expand_as(chosen)
        dispatch = torch.zeros_like(per_sequence, dtype=torch.bool).scatter_(-1, chosen, keep)   # [B, E, S]
        dispatch = dispatch.transpose(1, 2).reshape(tokens, num_experts)                # [B*S, E]
    else:
        raise ValueError(f"unknown Expert Choice routing {routing!r}; expected one of {INFERENCE_ROUTINGS}")
    combine = scores * dispatch                                                         # [B*S, E]
    return combine, dispatch


# -------------------------------------------------------------------------------- modules
class ExpertChoiceRouter(nn.Module):
    """The router: logits, then the experts' choice. Returns ``(router_logits [B*S, E],
    combine_weights [B*S, E] fp32, dispatch_mask [B*S, E] bool)``.

    Holds the per-expert thresholds of causal inference: ``threshold [E]`` (starts at 1/E) and the
    EMA weight ``threshold_weight [E]`` (1 − m^updates; 0 = never trained), both saved with the model.
    """

    def __init__(self, config: ExpertChoiceConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.capacity_factor = float(config.capacity_factor)
        self.inference_routing = config.inference_routing
        self.threshold_momentum = config.threshold_momentum
        self.top_k = nominal_top_k(self.capacity_factor, self.num_experts)
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))
        self.register_buffer("threshold", torch.full((self.num_experts,), 1.0 / self.num_experts))
        self.register_buffer("threshold_weight", torch.zeros(self.num_experts))

    @property
    def routing(self) -> str:
        """``"capacity"`` in training, else the config's ``inference_routing``."""
        return "capacity" if self.training else self.inference_routing

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None):
        batch_size = hidden_states.shape[0]
        router_logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)     # [B*S, E]
        combine_weights, dispatch_mask = expert_choice_routing(
            router_logits, batch_size, self.capacity_factor, self.routing, self.threshold, token_mask)
        return router_logits, combine_weights, dispatch_mask

    @torch.no_grad()
    def update_threshold(self, router_logits: torch.Tensor, dispatch_mask: torch.Tensor, batch_size: int) -> None:
        """One EMA step of θ_e towards the mean over sequences of the lowest score e took (its C-th)."""
        tokens, num_experts = router_logits.shape
        scores = F.softmax(router_logits.float(), dim=-1).view(batch_size, -1, num_experts)   # [B, S, E]
        took = dispatch_mask.view(batch_size, -1, num_experts)                               # [B, S, E]
        lowest = scores.masked_fill(~took, math.inf).amin(dim=1)                             # [B, E]
        chose = took.any(dim=1)                                                              # [B, E]
        count = chose.sum(0)                                                                 # [E]
        observed = torch.where(chose, lowest, 0.0).sum(0) / count.clamp_min(1)               # [E]
        seen = count > 0
        momentum = self.threshold_momentum
        previous = self.threshold_weight.float()
        weight = momentum * previous + (1.0 - momentum)                                      # [E]
        value = (momentum * previous * self.threshold.float() + (1.0 - momentum) * observed) / weight
        self.threshold.copy_(torch.where(seen, value, self.threshold.float()))
        self.threshold_weight.copy_(torch.where(seen, weight, previous))


class ExpertChoiceExperts(nn.Module):
    """E SwiGLU experts stored as 3-D tensors; each runs on the tokens it took only."""

    def __init__(self, config: ExpertChoiceConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, combine_weights: torch.Tensor,
                dispatch_mask: torch.Tensor) -> torch.Tensor:
        """``hidden_states [n, H]``, ``combine_weights`` / ``dispatch_mask [n, E]`` -> ``[n, H]``."""
        output = torch.zeros_like(hidden_states)                                          # [n, H]
        with torch.no_grad():
            expert_ids, token_ids = dispatch_mask.transpose(0, 1).nonzero(as_tuple=True)  # [m] each, by expert
            per_expert = torch.bincount(expert_ids, minlength=self.num_experts).tolist()  # one host read per block
        for expert, tokens in enumerate(token_ids.split(per_expert)):
            if tokens.numel() == 0:
                continue
            current = hidden_states[tokens]                                               # [m_e, H] gather
            gate, up = F.linear(current, self.gate_up_proj[expert]).chunk(2, dim=-1)      # [m_e, I] each
            current = F.linear(self.act_fn(gate) * up, self.down_proj[expert])            # [m_e, H]
            current = current * combine_weights[tokens, expert, None].to(current.dtype)
            output.index_add_(0, tokens, current.to(output.dtype))                        # weighted scatter-add
        return output


class ExpertChoiceSparseMoeBlock(nn.Module):
    """Router, then the experts on the tokens each one took; in training it also moves the thresholds."""

    def __init__(self, config: ExpertChoiceConfig):
        super().__init__()
        self.gate = ExpertChoiceRouter(config)
        self.experts = ExpertChoiceExperts(config)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        # The router's output as the experts get it (a forward hook may have replaced the choice).
        router_logits, combine_weights, dispatch_mask = self.gate(hidden_states, token_mask)
        # Once per training forward: activation checkpointing re-runs this forward inside backward.
        if self.training and torch._C._current_graph_task_id() == -1:
            self.gate.update_threshold(router_logits, dispatch_mask, batch_size)
        flat = hidden_states.reshape(-1, hidden_dim)                                      # [B*S, H]
        output = self.experts(flat, combine_weights, dispatch_mask)                       # [B*S, H]
        return output.reshape(batch_size, sequence_length, hidden_dim)


class ExpertChoiceDecoderLayer(GradientCheckpointingLayer):
    """Mixtral's decoder layer with the Expert Choice block (which also needs the padding mask)."""

    def __init__(self, config: ExpertChoiceConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = MixtralAttention(config, layer_idx)
        self.mlp = ExpertChoiceSparseMoeBlock(config)
        self.input_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                cache: Cache | None = None, token_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        residual = hidden_states                                                          # [B, S, H]
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, position_embeddings=position_embeddings,
                                          attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                          **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states, token_mask)
        return residual + hidden_states


# ------------------------------------------------------------------------------- models
class ExpertChoicePreTrainedModel(PreTrainedModel):
    config: ExpertChoiceConfig
    config_class = ExpertChoiceConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ExpertChoiceDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(ExpertChoiceRouter, index=0),
        "hidden_states": ExpertChoiceDecoderLayer,
        "attentions": MixtralAttention,
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ExpertChoiceExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, ExpertChoiceRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.constant_(module.threshold, 1.0 / module.num_experts)
            init.zeros_(module.threshold_weight)

    def set_inference_routing(self, routing: str) -> None:
        """Choose how every router selects in eval mode: ``"threshold"`` (causal) or ``"capacity"``."""
        if routing not in INFERENCE_ROUTINGS:
            raise ValueError(f"inference_routing must be one of {INFERENCE_ROUTINGS}, got {routing!r}")
        self.config.inference_routing = routing
        for module in self.modules():
            if isinstance(module, ExpertChoiceRouter):
                module.inference_routing = routing


class ExpertChoiceModel(ExpertChoicePreTrainedModel):
    def __init__(self, config: ExpertChoiceConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [ExpertChoiceDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)])
        self.norm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MixtralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)                                  # [B, S, H]
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                         cache=cache, position_ids=position_ids)
        # The experts choose among real tokens: [B, S] of the 2-D padding mask's newest columns.
        token_mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            token_mask = attention_mask[:, attention_mask.shape[1] - inputs_embeds.shape[1]:].to(torch.bool)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(hidden_states, attention_mask=causal_mask, position_ids=position_ids,
                                          cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                          token_mask=token_mask, **kwargs)
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class ExpertChoiceForCausalLM(ExpertChoicePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ExpertChoiceConfig):
        super().__init__(config)
        self.model = ExpertChoiceModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_experts = config.num_local_experts
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_router_logits: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> MoeCausalLMOutputWithPast:
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else self.config.output_router_logits)
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_router_logits=output_router_logits, **kwargs)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)   # [B, S', H]
        logits = self.lm_head(hidden_states)                                              # [B, S', V]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=None, logits=logits,
                                         cache=outputs.cache,
                                         hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                         router_logits=outputs.router_logits)


__all__ = [
    "ExpertChoiceForCausalLM",
    "ExpertChoiceModel",
    "ExpertChoicePreTrainedModel",
    "ExpertChoiceRouter",
    "expert_choice_routing",
]
