"""(b) Cost of one controller ``step()`` (one tick) relative to one forward of mixtral-2l8e at 8 × 512.

Standalone controllers of the size of real models: L = 32 layers with E = 8 experts (Mixtral-8x7B)
and with E = 128 (Qwen3-MoE-sized), top-2, ``reference`` dynamics, ``pt``. Before every step the
routers' counts of one 8 × 512 forward are fed in through ``observe`` (untimed), so each tick has
real work. Each step is timed alone (device synchronised before and after on CUDA).

``update_every=1``: every step recomputes b, T_fast and T̄ (the worst case). ``update_every=5``
(the default): four cheap ticks (usage, phases, coherence) and one field update in five; the
median then is the cheap tick's cost and the mean the amortised cost. The ``observe`` of all L
layers for one forward is reported too (it runs inside the router hooks, so it is part of (a)).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmarks import Context, build_model, row, summarize, synchronize, timed, token_batch
from chronovisor.controllers import PTConfig, PTController

NAME = "controller_step"
SIZES = ((32, 8), (32, 128))
TOKENS = 8 * 512
TOP_K = 2


def _plain_forward_ms(ctx: Context) -> tuple[float, str]:
    """The plain mixtral-2l8e 8×512 forward from (a) if it ran in this process, else measured here."""
    batch, length = (2, 128) if ctx.quick else (8, 512)
    if ctx.shared.get("plain_forward_shape") == (batch, length):
        return ctx.shared["plain_forward_ms"], "from forward_overhead"
    model = build_model("mixtral-2l8e", ctx)
    ids = token_batch(batch, length, model.config.vocab_size, ctx.device, seed=ctx.seed)
    with torch.inference_mode():
        for _ in range(2):
            model(input_ids=ids, use_cache=False)
        samples = [timed(lambda: model(input_ids=ids, use_cache=False), ctx.device, 10 if ctx.is_cuda else 1)
                   for _ in range(3 if ctx.quick else 7)]
    return statistics.median(samples) * 1e3, "measured here"


def _measure(layers: int, experts: int, update_every: int, steps: int, ctx: Context) -> dict[str, Any]:
    controller = PTController(layers, experts, TOP_K, PTConfig(mode="pt", update_every=update_every)).to(ctx.device)
    generator = torch.Generator().manual_seed(layers * 1000 + experts)
    index = [torch.randint(0, experts, (TOKENS, TOP_K), generator=generator).to(ctx.device) for _ in range(layers)]
    weights = torch.full((TOKENS, TOP_K), 1.0 / TOP_K, device=ctx.device)

    def observe_all():
        for layer in range(layers):
            controller.record_selection(layer, index[layer], weights)   # what the router hooks call

    step_s, update_s, cheap_s, observe_s = [], [], [], []
    for i in range(steps + 10):
        observe_s.append(timed(observe_all, ctx.device))
        synchronize(ctx.device)
        start = time.perf_counter()
        controller.step()
        synchronize(ctx.device)
        elapsed = time.perf_counter() - start
        if i >= 10:                                   # the first ten are warm-up
            step_s.append(elapsed)
            (update_s if controller.ticks % update_every == 0 else cheap_s).append(elapsed)
    result = {"layers": layers, "experts": experts, "update_every": update_every, "steps": steps,
              "step": summarize(step_s), "update_tick": summarize(update_s),
              "observe_all_layers": summarize(observe_s[10:])}
    if cheap_s:
        result["cheap_tick"] = summarize(cheap_s)
    return result


def run(ctx: Context) -> dict[str, Any]:
    steps = 50 if ctx.quick else 500
    forward_ms, source = _plain_forward_ms(ctx)
    batch, length = (2, 128) if ctx.quick else (8, 512)
    results, rows = [], []
    for layers, experts in SIZES:
        for update_every in (1, 5):
            r = _measure(layers, experts, update_every, steps, ctx)
            r["median_step_over_forward"] = r["step"]["median_ms"] / forward_ms
            r["mean_step_over_forward"] = r["step"]["mean_ms"] / forward_ms
            results.append(r)
            label = f"step() L={layers} E={experts} update_every={update_every}"
            note = (f"mean {r['step']['mean_ms'] * 1e3:.0f} µs, update tick {r['update_tick']['median_ms'] * 1e3:.0f} µs; "
                    f"= {100 * r['mean_step_over_forward']:.3f}% of a forward (mean)")
            rows.append(row(NAME, label, r["step"]["median_ms"] * 1e3, "µs", note=note))
        rows.append(row(NAME, f"observe() × {layers} layers, E={experts}, {TOKENS} tokens",
                        results[-1]["observe_all_layers"]["median_ms"] * 1e3, "µs", note="inside the router hooks"))
    rows.append(row(NAME, f"reference: plain mixtral-2l8e forward {batch}x{length}", forward_ms, "ms", note=source))
    return {"plain_forward_ms": forward_ms, "plain_forward_source": source, "plain_forward_shape": [batch, length],
            "results": results, "rows": rows}
