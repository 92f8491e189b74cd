"""Cost at real size: one Mixtral-8x7B-shaped MoE layer, wrapped vs plain forward (target ≤ 1.01).

A one-layer ``MixtralForCausalLM`` with the shapes of Mixtral-8x7B's layers — hidden 4096, 8
experts of FFN 14336, top-2, 32 query / 8 key-value heads — random weights (uniform ±0.02; the
cost of a forward does not depend on the values), a 256-token vocabulary so the embedding and
LM head stay small beside the layer. bf16 where the device supports it (CUDA with bf16, a CPU
with AVX512-BF16 / AMX), else float32: 1.4 B expert parameters, 2.8 GB in bf16, 5.6 GB in fp32.

One model, three arms timed in turn every round (the order rotated every round, so no arm always
runs first or last), forward only:

- ``plain``: the HF model with no hooks at all;
- ``wrapped``: the same weights with a fresh ``pt`` controller attached (pressure 0, temperature 1:
  the hook modulates, re-selects and counts, and routes every token as the plain model does: the
  logits are checked to be bit-identical), so the ratio to plain is the cost of the hook alone.
  This is the row the target applies to;
- ``wrapped, fields moved``: a ``pt`` controller after 2 ticks (``update_every=1``: b ≠ 0, T ≠ 1).
  Its fields move tokens between experts, and on a CPU a 128-token batch costs what its split over
  the experts costs, so this ratio measures the routing change as well as the hook (reported, no target).

The hooks are attached and removed between the timed calls, so every arm uses the same tensors.
The spread of the per-round ratios is reported beside the median.
"""

from __future__ import annotations

from collections.abc import Callable
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


def _warmed_controller(model: torch.nn.Module, forward: Callable[[], torch.Tensor], ticks: int) -> Any:
    """A ``pt`` controller for ``model`` after ``ticks`` field updates, detached again."""
    import chronovisor

    wrapped = chronovisor.wrap(model, chronovisor.PTConfig(mode="pt", update_every=1), step_mode="manual")
    for _ in range(ticks):
        forward()
        wrapped.controller.step()
    wrapped.attachment.remove()
    return wrapped.controller


def run(ctx: Context) -> dict[str, Any]:
    from chronovisor.wrappers import attach

    dtype = torch.bfloat16 if supports_bf16(ctx.device) else torch.float32
    tokens = 32 if ctx.quick else (2048 if ctx.is_cuda else 128)
    rounds = 3 if ctx.quick else (20 if ctx.is_cuda else 9)
    model = build_layer(ctx.device, dtype, ctx.seed)
    ids = token_batch(1, tokens, model.config.vocab_size, ctx.device, seed=ctx.seed)

    def forward() -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits

    with torch.inference_mode():
        controllers = {"wrapped": _warmed_controller(model, forward, 0),
                       "wrapped, fields moved": _warmed_controller(model, forward, WARM_TICKS)}
        outputs = {"plain": forward()}                              # also warms the plain path
        for arm, controller in controllers.items():
            attachment = attach(model, controller)
            outputs[arm] = forward()
            attachment.remove()
        arms = ["plain", *controllers]
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for r in range(rounds):
            for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
                attachment = attach(model, controllers[arm]) if arm in controllers else None
                times[arm].append(timed(forward, ctx.device))
                if attachment is not None:
                    attachment.remove()
    identical = bool(torch.equal(outputs["wrapped"], outputs["plain"]))
    moved = not torch.equal(outputs["wrapped, fields moved"], outputs["plain"])
    ratios = {arm: ratio_stats(times[arm], times["plain"]) for arm in controllers}
    summaries = {arm: summarize(values) for arm, values in times.items()}
    shape = (f"1 layer, hidden 4096, 8 experts × FFN 14336, top-2; {tokens} tokens, "
             f"{str(dtype).removeprefix('torch.')}, {ctx.device.type}")

    def spread(arm: str) -> str:
        pairwise = ratios[arm]["pairwise_ratios"]
        return (f"per-round ratios {min(pairwise):.3f}–{max(pairwise):.3f} over {rounds} rounds; plain "
                f"{summaries['plain']['median_ms']:.0f} ms, this arm {summaries[arm]['median_ms']:.0f} ms")

    hook_only = ratios["wrapped"]["median_pairwise_ratio"]
    with_routing = ratios["wrapped, fields moved"]["median_pairwise_ratio"]
    rows = [
        row(NAME, f"wrapped (fresh fields, same routing) / plain forward ({shape})", hook_only, "×",
            f"≤ {TARGET}", hook_only <= TARGET and identical,
            note=f"logits {'bit-identical to' if identical else 'DIFFER from'} plain; {spread('wrapped')}"),
        row(NAME, "wrapped (fields moved by 2 ticks) / plain forward, same shape", with_routing, "×",
            note=f"routing {'differs from' if moved else 'equals'} plain, so this includes the changed expert "
                 f"load; {spread('wrapped, fields moved')}"),
    ]
    return {"shape": SHAPE, "tokens": tokens, "dtype": str(dtype), "rounds": rounds, "arms_ms": summaries,
            "ratios": ratios, "fresh_fields_bit_identical": identical, "raw_seconds": times, "rows": rows}
