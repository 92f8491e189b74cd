"""(c) One controller-only training step vs a plain frozen forward + backward of the same model.

Model ``mixtral-2l8e`` (eval mode: no dropout, no router jitter), LM loss on 8 × 512 random
tokens (``labels=input_ids``), ``use_cache=False``. Three model instances with identical weights,
timed interleaved:

* ``controller``: ``chronovisor.wrap(..., PTConfig(learnable=True), freeze_base=True)``, tick
  ``auto``; one step = forward + backward + AdamW on the offsets δb, δlogT (2·L·E parameters) +
  zero_grad + the controller tick. This is what ``chronovisor.training.train_controller`` does per step.
* ``frozen fwd+bwd`` (the baseline): the unwrapped model with every parameter frozen; the embeddings'
  output is made a leaf that requires grad, so the backward runs through the whole network
  computing activation gradients only (no weight gradients) — the least any backward through the
  frozen model costs.
* ``full fine-tune`` (context): every base parameter trainable, forward + backward + AdamW.
"""

from __future__ import annotations

from typing import Any

import torch

import chronovisor
from benchmarks import Context, build_model, interleaved, ratio_stats, row, summarize, token_batch

NAME = "training_step"
MODEL = "mixtral-2l8e"


def run(ctx: Context) -> dict[str, Any]:
    batch, length = (2, 128) if ctx.quick else (8, 512)
    rounds = (3 if ctx.quick else 7) if not ctx.is_cuda else (5 if ctx.quick else 20)
    repeats = 5 if ctx.is_cuda else 1

    wrapped = chronovisor.wrap(build_model(MODEL, ctx), chronovisor.PTConfig(mode="pt", learnable=True),
                               freeze_base=True)
    offsets = [p for p in wrapped.controller.parameters() if p.requires_grad]
    controller_optimizer = torch.optim.AdamW(offsets, lr=1e-2)

    frozen = build_model(MODEL, ctx).requires_grad_(False)
    embed = frozen.get_input_embeddings()

    full = build_model(MODEL, ctx)
    full_optimizer = torch.optim.AdamW(full.parameters(), lr=1e-4)
    ids = token_batch(batch, length, frozen.config.vocab_size, ctx.device, seed=ctx.seed)

    def controller_step():
        loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        controller_optimizer.step()
        controller_optimizer.zero_grad(set_to_none=True)

    def frozen_step():
        embeddings = embed(ids).detach().requires_grad_(True)
        loss = frozen(inputs_embeds=embeddings, labels=ids, use_cache=False).loss
        loss.backward()

    def full_step():
        loss = full(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        full_optimizer.step()
        full_optimizer.zero_grad(set_to_none=True)

    times = interleaved({"frozen fwd+bwd": frozen_step, "controller": controller_step, "full fine-tune": full_step},
                        ctx.device, rounds=rounds, warmup=2, repeats=repeats)
    grad_ok = all(p.grad is None for p in offsets)            # zero_grad(set_to_none) ran
    moved = float(sum(p.detach().abs().sum() for p in offsets))
    arms = {name: summarize(values) for name, values in times.items()}
    ratio = ratio_stats(times["controller"], times["frozen fwd+bwd"])
    full_ratio = ratio_stats(times["controller"], times["full fine-tune"])
    shape = f"{MODEL} {batch}x{length} {ctx.dtype_name()} {ctx.device.type}"
    rows = [
        row(NAME, f"frozen fwd+bwd ({shape})", arms["frozen fwd+bwd"]["median_ms"], "ms", note=f"median of {rounds}"),
        row(NAME, "controller-only step / frozen fwd+bwd", ratio["median_pairwise_ratio"], "×",
            note=f"controller step {arms['controller']['median_ms']:.1f} ms; ratio of medians {ratio['ratio_of_medians']:.3f}"),
        row(NAME, "controller-only step / full fine-tune step", full_ratio["median_pairwise_ratio"], "×",
            note=f"full fine-tune step {arms['full fine-tune']['median_ms']:.1f} ms"),
    ]
    return {"model": MODEL, "batch": batch, "length": length, "rounds": rounds, "repeats_per_sample": repeats,
            "trainable_offsets": sum(p.numel() for p in offsets), "offsets_abs_sum_after": moved,
            "grads_cleared": grad_ok, "arms_ms": arms, "ratio_vs_frozen": ratio, "ratio_vs_full": full_ratio,
            "raw_seconds": times, "rows": rows}
