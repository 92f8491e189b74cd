"""Cost at real size: one Mixtral-8x7B-shaped MoE layer, wrapped vs plain forward (target ≤ 1.01).

A one-layer ``MixtralForCausalLM`` with the shapes of Mixtral-8x7B's layers — hidden 4096, 8
experts of FFN 14336, top-2, 32 query / 8 key-value heads — random weights (uniform ±0.02; the
cost of a forward does not depend on the values), a 256-token vocabulary so the embedding and
LM head stay small beside the layer. bf16 where the device supports it (CUDA with bf16, a CPU
with AVX512-BF16 / AMX), else float32: 1.4 B expert parameters, 2.8 GB in bf16, 5.6 GB in fp32.

One model, two arms timed alternately per round (the order swapped every round): the plain HF
model (no hooks at all), and the same weights with a ``pt`` controller attached after 2 ticks
(``update_every=1``: b ≠ 0, T ≠ 1): modulate, re-selection and observe in the router call, forward only. The hooks
are attached and removed between the timed calls, so both arms use the same tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import Context, ratio_stats, row, summarize, timed, token_batch

NAME = "mixtral_layer"
TARGET = 1.01
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
             num_attention_heads=32, num_key_value_heads=8)
WARM_TICKS = 2


def supports_bf16(device: torch.device) -> bool:
    """bf16 matmuls run natively here (not emulated through float32 at a fraction of the speed)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def build_layer(device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """The one-layer Mixtral-8x7B-shaped model with random weights, in eval mode."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=256, num_hidden_layers=1, max_position_embeddings=4096, **SHAPE)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-0.02, 0.02, generator=generator)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)      # its buffers were left empty
    if getattr(model, "_can_set_experts_implementation", lambda: False)():
        model.set_experts_implementation("grouped_mm")
    return model.eval()


def run(ctx: Context) -> dict[str, Any]:
    import chronovisor
    from chronovisor.wrappers import attach

    dtype = torch.bfloat16 if supports_bf16(ctx.device) else torch.float32
    tokens = 32 if ctx.quick else (2048 if ctx.is_cuda else 128)
    rounds = 3 if ctx.quick else (20 if ctx.is_cuda else 6)
    model = build_layer(ctx.device, dtype, ctx.seed)
    ids = token_batch(1, tokens, model.config.vocab_size, ctx.device, seed=ctx.seed)
    wrapped = chronovisor.wrap(model, chronovisor.PTConfig(mode="pt", update_every=1), step_mode="manual")
    controller = wrapped.controller

    def forward() -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits

    with torch.inference_mode():
        for _ in range(WARM_TICKS):
            forward()
            controller.step()
        attachment = wrapped.attachment
        attachment.remove()
        forward()                                                       # warm the plain path too
        times: dict[str, list[float]] = {"plain": [], "wrapped": []}
        for r in range(rounds):
            for arm in (("plain", "wrapped") if r % 2 == 0 else ("wrapped", "plain")):
                if arm == "wrapped":
                    attachment = attach(model, controller)
                times[arm].append(timed(forward, ctx.device))
                if arm == "wrapped":
                    attachment.remove()
    ratio = ratio_stats(times["wrapped"], times["plain"])
    arms = {name: summarize(values) for name, values in times.items()}
    value = ratio["median_pairwise_ratio"]
    shape = (f"1 layer, hidden 4096, 8 experts × FFN 14336, top-2; {tokens} tokens, "
             f"{str(dtype).removeprefix('torch.')}, {ctx.device.type}")
    rows = [
        row(NAME, f"wrapped / plain forward ({shape})", value, "×", f"≤ {TARGET}", value <= TARGET,
            note=f"plain {arms['plain']['median_ms']:.0f} ms, wrapped {arms['wrapped']['median_ms']:.0f} ms, "
                 f"{rounds} rounds"),
    ]
    return {"shape": SHAPE, "tokens": tokens, "dtype": str(dtype), "rounds": rounds, "arms_ms": arms,
            "ratio": ratio, "raw_seconds": times, "rows": rows}
