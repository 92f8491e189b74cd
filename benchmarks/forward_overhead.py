"""(a) Forward time of a wrapped model relative to the unwrapped one (target ≤ 1.03).

Model ``mixtral-2l8e`` (2 layers, 8 experts top-2, hidden 256, grouped_mm experts), batch 8 × 512
random tokens, ``inference_mode``, ``use_cache=False``. Four model instances with identical seeded
weights, timed interleaved (one call each per round, rotating order):

* ``plain``: the unwrapped HF model (no hooks at all);
* ``steer``: wrapped, controller ``pt`` (default η = 0.015, P = 0.5) after 10 warm-up ticks, so
  b ≠ 0 and T ≠ 1 and the routing differs from the plain model's; the forward only (step_mode manual);
* ``steer+tick``: the same wrapped model called the way users call it (``step_mode="auto"``): forward,
  then one controller ``step()`` (default ``update_every=5``);
* ``identity``: a freshly wrapped model (b = 0, T = 1: hooks run, routing re-selected, counts
  observed, no tick), whose output must equal the plain model's bit for bit.

Per arm: median / min ms; per wrapped arm: ratio of medians and the median of per-round ratios.
"""

from __future__ import annotations

from typing import Any

import torch

import chronovisor
from benchmarks import Context, build_model, interleaved, ratio_stats, row, summarize, token_batch

NAME = "forward_overhead"
MODEL = "mixtral-2l8e"
TARGET = 1.03
WARM_TICKS = 10


def run(ctx: Context) -> dict[str, Any]:
    batch, length = (2, 128) if ctx.quick else (8, 512)
    rounds = (3 if ctx.quick else 15) if not ctx.is_cuda else (5 if ctx.quick else 30)
    repeats = 10 if ctx.is_cuda else 1
    plain = build_model(MODEL, ctx)
    steered = chronovisor.wrap(build_model(MODEL, ctx), chronovisor.PTConfig(mode="pt"), step_mode="manual")
    identity = chronovisor.wrap(build_model(MODEL, ctx), chronovisor.PTConfig(mode="pt"), step_mode="manual")
    ids = token_batch(batch, length, plain.config.vocab_size, ctx.device, seed=ctx.seed)
    controller = steered.controller

    with torch.inference_mode():
        for _ in range(WARM_TICKS):
            steered(input_ids=ids, use_cache=False)
            controller.step()
        fields = {
            "ticks": controller.ticks,
            "max_abs_pressure": float(controller.pressure.abs().max()),
            "temperature_min": float(controller.temperature.min()),
            "temperature_max": float(controller.temperature.max()),
        }
        # The steering is real: share of (token, slot) expert ids that differ from the plain routing.
        with steered.record_routing(keep_weights=False) as on:
            steered(input_ids=ids, use_cache=False)
        with steered.disable_controller(), steered.record_routing(keep_weights=False) as off:
            steered(input_ids=ids, use_cache=False)
        changed = [float((a.sort(-1).values != b.sort(-1).values).float().mean())
                   for a, b in zip(on.expert_index, off.expert_index, strict=True)]
        reference = plain(input_ids=ids, use_cache=False).logits
        same = identity(input_ids=ids, use_cache=False).logits
        identity_equal = bool(torch.equal(reference, same))
        identity_max_diff = float((reference.float() - same.float()).abs().max())

        def call_plain():
            plain(input_ids=ids, use_cache=False)

        def call_steer():
            steered.step_mode = "manual"
            steered(input_ids=ids, use_cache=False)

        def call_steer_tick():
            steered.step_mode = "auto"
            steered(input_ids=ids, use_cache=False)

        def call_identity():
            identity(input_ids=ids, use_cache=False)

        times = interleaved({"plain": call_plain, "steer": call_steer, "steer+tick": call_steer_tick,
                             "identity": call_identity}, ctx.device, rounds=rounds, repeats=repeats)
    ctx.shared["plain_forward_ms"] = summarize(times["plain"])["median_ms"]
    ctx.shared["plain_forward_shape"] = (batch, length)

    arms = {name: summarize(values) for name, values in times.items()}
    ratios = {name: ratio_stats(times[name], times["plain"]) for name in ("steer", "steer+tick", "identity")}
    shape = f"{MODEL} {batch}x{length} {ctx.dtype_name()} {ctx.device.type}"
    rows = [row(NAME, f"plain forward ({shape})", arms["plain"]["median_ms"], "ms", note=f"median of {rounds}")]
    for name, label in (("steer", "wrapped pt / plain (forward)"), ("steer+tick", "wrapped pt + tick / plain"),
                        ("identity", "identity hook / plain")):
        r = ratios[name]
        met = r["median_pairwise_ratio"] <= TARGET if name != "identity" else None
        rows.append(row(NAME, label, r["median_pairwise_ratio"], "×", f"≤ {TARGET}" if met is not None else "",
                        met, f"ratio of medians {r['ratio_of_medians']:.3f}, of minima {r['ratio_of_minima']:.3f}"))
    rows.append(row(NAME, "identity-wrapped output == plain", "bit-identical" if identity_equal
                    else f"max diff {identity_max_diff:.3g}", met=identity_equal))
    return {
        "model": MODEL, "batch": batch, "length": length, "rounds": rounds, "repeats_per_sample": repeats,
        "fields_after_warmup": fields, "routing_changed_share_per_layer": changed,
        "identity_bit_identical": identity_equal, "identity_max_abs_diff": identity_max_diff,
        "arms_ms": arms, "ratios": ratios, "raw_seconds": times, "rows": rows,
    }
