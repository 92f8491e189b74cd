"""torch.compile of a wrapped model: one full graph, eager-equal, no recompilation on field updates.

What is compiled is the HF model itself (``torch.compile(wrapped.model, fullgraph=True)``): the
router hooks (modulate, the family's selection, observe, which writes the controller's tick
counts in place) are traced into the graph. The controller's ``step()`` stays eager Python between
forwards and updates the field buffers in place; the compiled graph reads those buffers, so new
fields need no recompilation (``error_on_recompile`` turns any into an error here).

Mixtral's ``grouped_mm`` experts are what make the base graph-break-free (eager experts call
``nonzero``). Tiny model and shapes: one inductor compile takes ~25 s cold on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import chronovisor
from chronovisor.controllers import PTConfig
from chronovisor.wrappers import build_toy


def _inputs():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (2, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}


def _tick_until_update(wrapped, inputs) -> None:
    """Eager forwards + ticks until the fields have been recomputed once more."""
    update_every = wrapped.controller.configs[0].update_every
    for _ in range(update_every):
        wrapped(**inputs)                                   # step_mode="auto": one step() per forward


def _compiled_case(backend: str, configs, groups: int = 1):
    torch._dynamo.reset()
    model = build_toy("mixtral-tiny")
    assert model.config._experts_implementation == "grouped_mm"
    wrapped = chronovisor.wrap(model, configs)
    inputs = _inputs()
    if groups > 1:
        inputs = {k: (v.repeat(groups, 1) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(wrapped.model, fullgraph=True, backend=counter)
    return wrapped, compiled, counter, inputs


def _check_compiled_tracks_fields(wrapped, compiled, counter, inputs, atol: float) -> None:
    controller = wrapped.controller
    with torch.no_grad():
        _tick_until_update(wrapped, inputs)                 # non-trivial fields: b != 0, T != 1
        assert float(controller.pressure.abs().max()) > 0
        eager = wrapped.model(**inputs).logits
        eager_counts = controller._tick_counts.clone()
        controller._tick_counts.zero_(), controller._tick_weight_sums.zero_()

        out = compiled(**inputs).logits               # fullgraph=True: raises on any graph break
        assert counter.frame_count == 1, f"expected one graph, got {counter.frame_count}"
        torch.testing.assert_close(out, eager, atol=atol, rtol=1e-5)
        # observe() ran inside the graph: its in-place scatter_add_ into the controller's buffers landed.
        torch.testing.assert_close(controller._tick_counts, eager_counts, atol=0, rtol=0)
        controller._tick_counts.zero_(), controller._tick_weight_sums.zero_()

        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                before = controller.pressure.clone()
                _tick_until_update(wrapped, inputs)         # step() rewrites b, T in place
                assert not torch.equal(before, controller.pressure)
                eager = wrapped.model(**inputs).logits
                compiled_out = compiled(**inputs).logits
                torch.testing.assert_close(compiled_out, eager, atol=atol, rtol=1e-5)
                assert not torch.equal(compiled_out, out)       # it follows the new fields
                out = compiled_out
        assert counter.frame_count == 1, "changing the fields in place recompiled the graph"


def test_fullgraph_inductor_matches_eager_and_never_recompiles():
    wrapped, compiled, counter, inputs = _compiled_case("inductor", PTConfig(mode="pt", update_every=2))
    _check_compiled_tracks_fields(wrapped, compiled, counter, inputs, atol=2e-5)


@pytest.mark.parametrize("config", [
    PTConfig(mode="temperature", dynamics="paper", usage="ema", update_every=2),
    PTConfig(mode="pressure", dynamics="loss_free", update_every=1),
], ids=["paper-temperature", "loss_free"])
def test_fullgraph_aot_eager_compile_matches_eager_for_the_other_dynamics(config):
    """AOTAutograd (functionalised buffer mutations) for the other field paths; fast backend."""
    wrapped, compiled, counter, inputs = _compiled_case("aot_eager", config)
    _check_compiled_tracks_fields(wrapped, compiled, counter, inputs, atol=1e-6)


def test_fullgraph_aot_eager_compile_matches_eager_for_a_stacked_controller():
    """A stacked controller (3 configuration groups in one batch) compiles the same way."""
    configs = [PTConfig(eta=0.01 * (s + 1), pressure_scale=0.5 * (s + 1), update_every=2, seed=s) for s in range(3)]
    wrapped, compiled, counter, inputs = _compiled_case("aot_eager", configs, groups=3)
    _check_compiled_tracks_fields(wrapped, compiled, counter, inputs, atol=1e-6)
