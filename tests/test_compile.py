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


# ------------------------------------------------------------------- train.compile in a sweep cell
def _train_cell(protocol: str, compile: bool):
    from conftest import TINY_WORLD

    from chronovisor.eval.config import parse_config

    config = parse_config({
        "name": "compiled", "protocol": protocol, "models": ["mixtral-tiny"], "seeds": [0],
        "data": dict(TINY_WORLD, num_train=4, num_heldout=3), "eval": {"null_permutations": 5},
        "train": {"steps": 4, "lr": 1e-2, "controller_lr": 5e-2, "compile": compile},
        "grid": {"eta": [0.03], "pressure_scale": [1.0]},
    })
    return next(cell for cell in config.cells() if not cell.is_off), config


@pytest.mark.parametrize("protocol", ["joint", "controller_only"])
def test_train_compile_gives_the_eager_cell_within_1e_4_relative_and_keeps_its_id_and_config_hash(
        protocol, tmp_path, one_torch_thread):
    from chronovisor.eval.protocols import run_cell

    torch._dynamo.reset()
    eager_cell, eager_config = _train_cell(protocol, compile=False)
    compiled_cell, compiled_config = _train_cell(protocol, compile=True)
    assert compiled_cell.cell_id == eager_cell.cell_id
    assert compiled_config.config_hash == eager_config.config_hash
    eager = run_cell(eager_cell, tmp_path / "eager").record
    compiled = run_cell(compiled_cell, tmp_path / "compiled").record
    assert compiled.numerics == eager.numerics | {"compiled": True}
    assert compiled.train.final_loss == pytest.approx(eager.train.final_loss, rel=1e-4)
    assert compiled.heldout.loss == pytest.approx(eager.heldout.loss, rel=1e-4)


def test_train_compile_is_refused_for_the_frozen_protocol_with_the_fix():
    from chronovisor.eval.config import parse_config
    from chronovisor.eval.errors import ConfigError

    with pytest.raises(ConfigError, match="train.compile: the frozen protocol trains nothing per cell; remove it"):
        parse_config({"name": "f", "protocol": "frozen", "models": ["mixtral-tiny"], "seeds": 1,
                      "train": {"compile": True}, "grid": {"eta": [0.03]}})
