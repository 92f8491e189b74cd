"""``train.compile``: one joint training step, eager vs compiled, as a sweep cell runs it.

A step as :func:`~chronovisor.eval.train_loop.train_steps` runs it in a ``joint`` cell: forward
of the wrapped model (``pt`` controller, router hooks), next-token CE, backward, AdamW over every
weight, then the controller's tick. Two copies of mixtral-2l8e with identical seeded weights, one
eager and one through ``torch.compile(dynamic=True)`` (what ``train.compile: true`` does), timed
alternately per round after the compile; also reported: the first (compiling) call and the
largest relative difference of the losses over the timed steps (both copies see the same batches).
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import Context, build_model, interleaved, ratio_stats, row, summarize, token_batch

NAME = "train_compile"
MODEL = "mixtral-2l8e"


def run(ctx: Context) -> dict[str, Any]:
    import time

    import chronovisor
    from chronovisor.eval.inputs import token_cross_entropy

    batch, length = (1, 64) if ctx.quick else (2, 256)
    rounds = 3 if ctx.quick else 8
    torch._dynamo.reset()
    arms, losses, first_call = {}, {}, {}
    for name in ("eager", "compiled"):
        model = build_model(MODEL, ctx).train()
        ids = token_batch(batch, length, model.config.vocab_size, ctx.device, seed=ctx.seed)
        wrapped = chronovisor.wrap(model, chronovisor.PTConfig(mode="pt"), step_mode="manual")
        forward = torch.compile(wrapped.model, dynamic=True) if name == "compiled" else wrapped.model
        optimizer = torch.optim.AdamW(wrapped.model.parameters(), lr=1e-4)
        losses[name] = []

        def step(forward=forward, optimizer=optimizer, controller=wrapped.controller, sink=losses[name],
                 ids=ids) -> None:
            logits = forward(input_ids=ids[:, :-1], use_cache=False).logits
            total, count = token_cross_entropy(logits, ids[:, 1:])
            loss = total / count
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            controller.step(loss=loss.detach())
            sink.append(float(loss.detach()))

        start = time.perf_counter()
        step()
        first_call[name] = time.perf_counter() - start
        arms[name] = step
    times = interleaved(arms, ctx.device, rounds=rounds, warmup=1)
    speedup = ratio_stats(times["eager"], times["compiled"])
    deltas = [abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses["compiled"], strict=True)]
    summary = {name: summarize(values) for name, values in times.items()}
    shape = f"{MODEL} {batch}x{length} {ctx.dtype_name()} {ctx.device.type}"
    rows = [
        row(NAME, f"joint training step, eager / compiled ({shape})", speedup["median_pairwise_ratio"], "×",
            note=f"eager {summary['eager']['median_ms']:.0f} ms, compiled {summary['compiled']['median_ms']:.0f} ms; "
                 f"first compiled call {first_call['compiled']:.0f} s"),
        row(NAME, "compiled vs eager loss, max relative Δ over the steps", max(deltas), target="≤ 1e-4",
            met=max(deltas) <= 1e-4, note=f"{len(deltas)} steps on the same batches"),
    ]
    return {"model": MODEL, "batch": batch, "length": length, "rounds": rounds, "first_call_s": first_call,
            "arms_ms": summary, "speedup": speedup, "loss_relative_deltas": deltas, "raw_seconds": times,
            "rows": rows}
