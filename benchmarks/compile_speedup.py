"""torch.compile: a wrapped mixtral-2l8e (grouped_mm experts) compiled with ``fullgraph=True``.

The compiled object is the HF model itself (``torch.compile(wrapped.model, fullgraph=True)``),
so the router hooks — modulate, selection, observe — are traced into the graph; the controller's
``step()`` stays eager Python between forwards and edits the field buffers in place, which the
compiled graph reads without recompiling. Measured (8 × 512, ``inference_mode``):

* first-call (compile) time of the plain and the wrapped model, graphs and recompilations counted
  with a counting backend around inductor;
* interleaved forward times: eager plain, eager wrapped, compiled plain, compiled wrapped;
* compiled vs eager output of the wrapped model (max |Δ| of the logits), and after ticks that
  change the fields: still no recompilation, and the compiled output follows the new fields.

If ``fullgraph=True`` fails, the reason is recorded and the timing falls back to ``fullgraph=False``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

import chronovisor
from benchmarks import (
    Context,
    build_model,
    interleaved,
    ratio_stats,
    row,
    summarize,
    synchronize,
    token_batch,
)

NAME = "compile_speedup"
MODEL = "mixtral-2l8e"


def _compile(model: torch.nn.Module, call, ctx: Context) -> dict[str, Any]:
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    info: dict[str, Any] = {"fullgraph": True, "error": None}
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    start = time.perf_counter()
    try:
        call(compiled)
    except Exception as error:  # noqa: BLE001 - recorded, then the non-fullgraph fallback is measured
        info.update(fullgraph=False, error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter)
        start = time.perf_counter()
        call(compiled)
    synchronize(ctx.device)
    info["first_call_s"] = time.perf_counter() - start
    info["graphs"] = counter.frame_count
    return {"compiled": compiled, "counter": counter, "info": info}


def run(ctx: Context) -> dict[str, Any]:
    batch, length = (2, 128) if ctx.quick else (8, 512)
    rounds = (3 if ctx.quick else 7) if not ctx.is_cuda else (5 if ctx.quick else 20)
    repeats = 10 if ctx.is_cuda else 1
    torch._dynamo.reset()
    plain = build_model(MODEL, ctx)
    wrapped = chronovisor.wrap(build_model(MODEL, ctx), chronovisor.PTConfig(mode="pt"), step_mode="manual")
    controller = wrapped.controller
    ids = token_batch(batch, length, plain.config.vocab_size, ctx.device, seed=ctx.seed)

    def forward(model):
        return model(input_ids=ids, use_cache=False).logits

    with torch.inference_mode():
        for _ in range(10):                                    # non-trivial fields: b ≠ 0, T ≠ 1
            wrapped(input_ids=ids, use_cache=False)
            controller.step()
        plain_c = _compile(plain, forward, ctx)
        wrapped_c = _compile(wrapped.model, forward, ctx)
        compiled_plain, compiled_wrapped = plain_c["compiled"], wrapped_c["compiled"]
        eager_out = forward(wrapped.model)
        compiled_out = forward(compiled_wrapped)
        max_diff = float((eager_out.float() - compiled_out.float()).abs().max())

        times = interleaved({
            "eager plain": lambda: forward(plain),
            "eager wrapped": lambda: forward(wrapped.model),
            "compiled plain": lambda: forward(compiled_plain),
            "compiled wrapped": lambda: forward(compiled_wrapped),
        }, ctx.device, rounds=rounds, warmup=1, repeats=repeats)

        graphs_before = wrapped_c["counter"].frame_count
        before = forward(compiled_wrapped)
        for _ in range(5):                                     # one field update (update_every=5)
            wrapped(input_ids=ids, use_cache=False)
            controller.step()
        after_eager = forward(wrapped.model)
        after_compiled = forward(compiled_wrapped)
        recompiles = wrapped_c["counter"].frame_count - graphs_before
        follows = float((after_eager.float() - after_compiled.float()).abs().max())
        moved = float((after_compiled.float() - before.float()).abs().max())

    arms = {name: summarize(values) for name, values in times.items()}
    speedup = ratio_stats(times["eager wrapped"], times["compiled wrapped"])
    overhead_compiled = ratio_stats(times["compiled wrapped"], times["compiled plain"])
    shape = f"{MODEL} {batch}x{length} {ctx.dtype_name()} {ctx.device.type}"
    info = wrapped_c["info"]
    rows = [
        row(NAME, f"wrapped fullgraph=True compiles ({shape})", "yes" if info["fullgraph"] else f"no: {info['error']}",
            met=info["fullgraph"], note=f"{info['graphs']} graph(s), first call {info['first_call_s']:.1f} s"),
        row(NAME, "compiled wrapped vs eager wrapped, max |Δ logits|", max_diff, note=f"after field change: {follows:.2g}"),
        row(NAME, "recompilations after in-place field updates", recompiles, met=recompiles == 0,
            note=f"compiled output moved by {moved:.3g} with the fields"),
        row(NAME, "speedup: eager wrapped / compiled wrapped", speedup["median_pairwise_ratio"], "×",
            note=f"eager {arms['eager wrapped']['median_ms']:.1f} ms, compiled {arms['compiled wrapped']['median_ms']:.1f} ms"),
        row(NAME, "compiled wrapped / compiled plain", overhead_compiled["median_pairwise_ratio"], "×",
            note=f"compiled plain {arms['compiled plain']['median_ms']:.1f} ms"),
    ]
    return {"model": MODEL, "batch": batch, "length": length, "rounds": rounds, "repeats_per_sample": repeats,
            "compile_plain": plain_c["info"], "compile_wrapped": info, "compiled_vs_eager_max_abs_diff": max_diff,
            "after_field_change_max_abs_diff": follows, "compiled_output_moved": moved,
            "recompilations_after_field_change": recompiles, "arms_ms": arms, "speedup": speedup,
            "compiled_wrapped_over_plain": overhead_compiled, "raw_seconds": times, "rows": rows}
