"""No host syncs in Chronovisor's hot path.

The router hooks (modulate, the family's selection, observe, recording, the padding-mask hooks)
and the controller's tick must never read a tensor back to the host. On a CPU there is no sync to
observe, so the CPU tests patch every host-reading tensor method (``item``, ``tolist``, ``cpu``,
``numpy``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``, data-dependent-shape ops such as
``nonzero``/``bincount``/``unique``/boolean-mask indexing, ``repeat_interleave`` with tensor
repeats) and record a call only while *our* code runs: every forward (pre-)hook of the model that
belongs to chronovisor and the controller's ``step`` are wrapped in a guard. transformers' own
forward may legitimately sync (mask creation, eager experts); it is outside the guard. A second
test compares whole wrapped and unwrapped forwards: the wrapped one may make no more such calls.

On CUDA (skipped without a device) the guard instead switches ``torch.cuda.set_sync_debug_mode``
to ``"error"`` while our code runs, so any synchronising CUDA call in it raises.
"""

from __future__ import annotations

import functools
import traceback
from contextlib import contextmanager

import pytest
import torch

import chronovisor
from chronovisor.controllers import PTConfig
from chronovisor.wrappers import build_toy

FAMILIES = ["mixtral-tiny", "switch-tiny", "deepseek_v3-tiny", "qwen2_moe-tiny", "qwen3_moe-tiny", "olmoe-tiny",
            "gpt_oss-tiny", "granitemoe-tiny", "phimoe-tiny", "expertchoice-tiny"]
NO_SELECTION_BIAS = {"phimoe-tiny", "expertchoice-tiny"}   # the loss_free comparator is not supported there

# Tensor methods that read device data on the host (or need it to size their output).
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__",
                "nonzero", "argwhere", "bincount", "unique", "unique_consecutive", "masked_select", "__array__")
SYNC_FUNCTIONS = ("nonzero", "argwhere", "bincount", "unique", "unique_consecutive", "masked_select")


# ----------------------------------------------------------------------------- the guard
class SyncGuard:
    """Counts host-reading tensor calls; ``violations`` only those made while ``ours`` is active."""

    def __init__(self):
        self.depth = 0
        self.entered = 0
        self.total = 0
        self.violations: list[str] = []

    @contextmanager
    def ours(self):
        self.depth += 1
        self.entered += 1
        try:
            yield
        finally:
            self.depth -= 1

    def wrap(self, fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            with self.ours():
                return fn(*args, **kwargs)

        return guarded

    def record(self, name: str) -> None:
        self.total += 1
        if self.depth:
            frames = [f for f in traceback.extract_stack()[:-2] if "/site-packages/" not in f.filename]
            where = "; ".join(f"{f.filename.rsplit('/', 2)[-2:]}:{f.lineno} {f.name}" for f in frames[-3:])
            self.violations.append(f"{name} at {where}")


def _is_sync_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


@pytest.fixture
def guard(monkeypatch):
    """Patch every host-reading tensor method/function to report to a fresh SyncGuard."""
    sync_guard = SyncGuard()

    def patch_method(name):
        original = getattr(torch.Tensor, name, None)
        if original is None:
            return

        def patched(self, *args, **kwargs):
            sync_guard.record(f"Tensor.{name}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, patched)

    for name in SYNC_METHODS:
        patch_method(name)
    for name in SYNC_FUNCTIONS:
        original_fn = getattr(torch, name)

        def patched_fn(*args, _original=original_fn, _name=name, **kwargs):
            sync_guard.record(f"torch.{_name}")
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, patched_fn)

    original_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        if _is_sync_index(index):
            sync_guard.record("Tensor.__getitem__[bool mask]")
        return original_getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)

    original_repeat_interleave = torch.Tensor.repeat_interleave

    def repeat_interleave(self, repeats, *args, **kwargs):
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            sync_guard.record("Tensor.repeat_interleave(tensor repeats)")
        return original_repeat_interleave(self, repeats, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", repeat_interleave)
    return sync_guard


def guard_our_code(chronovisor_model, wrap_fn) -> int:
    """Wrap every chronovisor forward (pre-)hook in ``chronovisor_model``'s model and the controller's ``step``.

    Returns the number of hooks wrapped (the test checks it is > 0, so it cannot pass vacuously).
    """
    wrapped = 0
    for module in chronovisor_model.model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, fn in list(hooks.items()):
                if getattr(fn, "__module__", "").startswith("chronovisor"):
                    hooks[key] = wrap_fn(fn)
                    wrapped += 1
    chronovisor_model.controller.step = wrap_fn(chronovisor_model.controller.step)
    return wrapped


# ------------------------------------------------------------------------------- inputs
def _inputs(model, device="cpu") -> dict[str, torch.Tensor]:
    """Batch 2 × 12 with right padding in row 1 (encoder and decoder for Switch), labels included."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 200, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    if getattr(model.config, "is_encoder_decoder", False):
        decoder_ids = torch.randint(3, 200, (2, 8), generator=generator)
        decoder_mask = torch.ones_like(decoder_ids)
        decoder_mask[1, -3:] = 0
        inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                      decoder_attention_mask=decoder_mask, labels=decoder_ids)
    else:
        inputs = dict(input_ids=ids, attention_mask=mask, labels=ids)
    return {k: v.to(device) for k, v in inputs.items()}


def _stack(inputs: dict[str, torch.Tensor], groups: int) -> dict[str, torch.Tensor]:
    return {k: v.repeat(groups, 1) for k, v in inputs.items()}


def _exercise(chronovisor_model, inputs, forwards: int = 3) -> None:
    """Forwards with ticks (auto, given the loss), recording on, a tick without a loss (as after
    ``generate``), and one forward with the controller disabled."""
    with torch.no_grad():
        with chronovisor_model.record_routing():
            for _ in range(forwards):
                chronovisor_model(**inputs, use_cache=False)
        chronovisor_model.controller.step()
        with chronovisor_model.disable_controller(), chronovisor_model.record_routing():
            chronovisor_model(**inputs, use_cache=False)


def _config(variant: str, **extra) -> PTConfig:
    if variant == "loss_free":
        return PTConfig(dynamics="loss_free", mode="pressure", update_every=1, **extra)
    mode, _, dynamics = variant.partition("/")
    if dynamics == "paper":
        extra.setdefault("usage", "ema")          # the paper preset is defined on the EMA usage share
    return PTConfig(mode=mode, dynamics=dynamics or "reference", update_every=1, **extra)


def _check(guard: SyncGuard, wrapped_hooks: int) -> None:
    assert wrapped_hooks > 0, "no chronovisor hook found to guard"
    assert guard.entered > 0, "the guarded code never ran"
    assert not guard.violations, "host sync in chronovisor's hot path:\n" + "\n".join(guard.violations[:20])


# --------------------------------------------------------------------------------- CPU tests
def test_guard_catches_a_sync_in_a_hook(guard, monkeypatch):
    """Positive control: a hook that calls .item() is reported (the guard is not vacuous)."""
    model = build_toy("mixtral-tiny")
    chronovisor_model = chronovisor.wrap(model, _config("pt"))
    original = chronovisor_model.controller.modulate

    def syncing_modulate(layer, logits):
        logits.max().item()
        return original(layer, logits)

    monkeypatch.setattr(chronovisor_model.controller, "modulate", syncing_modulate)
    wrapped = guard_our_code(chronovisor_model, guard.wrap)
    with torch.no_grad():
        chronovisor_model(**_inputs(model), use_cache=False)
    assert wrapped > 0 and guard.entered > 0
    assert any("Tensor.item" in v for v in guard.violations)


@pytest.mark.parametrize("preset", FAMILIES)
def test_pt_and_loss_free_hooks_read_nothing_back_to_the_host_in_every_family(guard, preset):
    """Each family: ``pt`` (reference, every tick updates the fields) and ``loss_free``, recording on."""
    for variant in ("pt", "loss_free") if preset not in NO_SELECTION_BIAS else ("pt",):
        model = build_toy(preset)
        chronovisor_model = chronovisor.wrap(model, _config(variant))
        wrapped = guard_our_code(chronovisor_model, guard.wrap)
        _exercise(chronovisor_model, _inputs(model))
        _check(guard, wrapped)
        assert chronovisor_model.controller.ticks == 4


@pytest.mark.parametrize("preset", ["mixtral-tiny", "switch-tiny", "deepseek_v3-tiny"])
@pytest.mark.parametrize("variant", ["off", "pressure", "temperature", "pt", "pt/paper", "temperature/paper",
                                     "pt/delayed", "loss_free"])
def test_every_mode_and_dynamics_reads_nothing_back_to_the_host(guard, preset, variant):
    model = build_toy(preset)
    chronovisor_model = chronovisor.wrap(model, _config(variant))
    wrapped = guard_our_code(chronovisor_model, guard.wrap)
    _exercise(chronovisor_model, _inputs(model))
    _check(guard, wrapped)


@pytest.mark.parametrize("preset", ["mixtral-tiny", "switch-tiny", "deepseek_v3-tiny"])
def test_a_stacked_controller_reads_nothing_back_to_the_host(guard, preset):
    """A stacked controller (3 configurations = 3 groups of the batch), ticks with per-group losses."""
    model = build_toy(preset)
    configs = [PTConfig(eta=eta, pressure_scale=p, update_every=1, seed=s)
               for s, (eta, p) in enumerate([(0.01, 0.5), (0.03, 1.0), (0.0, 0.0)])]
    chronovisor_model = chronovisor.wrap(model, configs, step_mode="manual")
    wrapped = guard_our_code(chronovisor_model, guard.wrap)
    inputs = _stack(_inputs(model), len(configs))
    with torch.no_grad(), chronovisor_model.record_routing():
        for _ in range(3):
            chronovisor_model(**inputs, use_cache=False)
            chronovisor_model.controller.step(loss=torch.tensor([1.0, 2.0, 3.0]))
    _check(guard, wrapped)


def test_learnable_offsets_under_autograd_read_nothing_back_to_the_host(guard):
    """Controller-only training path: the grad-enabled forward (fields cloned) and the tick."""
    model = build_toy("mixtral-tiny")
    chronovisor_model = chronovisor.wrap(model, _config("pt", learnable=True), freeze_base=True)
    wrapped = guard_our_code(chronovisor_model, guard.wrap)
    for _ in range(2):
        loss = chronovisor_model(**_inputs(model), use_cache=False).loss
        loss.backward()
    _check(guard, wrapped)
    assert chronovisor_model.controller.pressure_offset.grad is not None


@pytest.mark.parametrize("preset", ["mixtral-tiny", "switch-tiny", "deepseek_v3-tiny", "qwen2_moe-tiny",
                                    "expertchoice-tiny"])
def test_wrapped_forward_makes_no_more_host_reads_than_unwrapped(guard, preset):
    """Whole forward, no isolation: the wrapped model may not add host reads to HF's own.

    The controller is fresh (b = 0, T = 1, tick manual), so the routing, and with it HF's own
    data-dependent code (Switch loops over the experts that got tokens), is the same in both runs
    while every hook runs in full (modulate, re-selection, observe, recording); the tick follows.
    """
    model = build_toy(preset)
    inputs = _inputs(model)
    with torch.no_grad():
        model(**inputs, use_cache=False)                     # lazy initialisations out of the way
        before = guard.total
        model(**inputs, use_cache=False)
        unwrapped = guard.total - before
        chronovisor_model = chronovisor.wrap(model, _config("pt"), step_mode="manual")
        with chronovisor_model.record_routing():
            chronovisor_model(**inputs, use_cache=False)
        before = guard.total
        with chronovisor_model.record_routing(keep_weights=True):
            chronovisor_model(**inputs, use_cache=False)
            chronovisor_model.controller.step()
            wrapped = guard.total - before
    assert wrapped <= unwrapped, f"wrapped forward made {wrapped} host reads, unwrapped {unwrapped}"


# -------------------------------------------------------------------------------- CUDA test
@contextmanager
def _sync_errors():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class CudaSyncGuard(SyncGuard):
    @contextmanager
    def ours(self):
        self.entered += 1
        self.depth += 1
        try:
            if self.depth == 1:
                with _sync_errors():
                    yield
            else:
                yield
        finally:
            self.depth -= 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["mixtral-tiny", "switch-tiny", "deepseek_v3-tiny", "qwen2_moe-tiny", "gpt_oss-tiny",
                                    "expertchoice-tiny"])
def test_the_cuda_hot_path_never_synchronises_with_the_host(preset, dtype):
    """Under ``set_sync_debug_mode("error")`` (active while chronovisor code runs) nothing syncs:
    every mode family of the fast path, loss_free, recording, the tick, a stacked controller."""
    device = torch.device("cuda")
    variants = ["pt", "off", "temperature/paper", "pt/delayed"] + ([] if preset in NO_SELECTION_BIAS else ["loss_free"])
    for variant in variants:
        model = build_toy(preset).to(device=device, dtype=dtype)
        chronovisor_model = chronovisor.wrap(model, _config(variant))
        sync_guard = CudaSyncGuard()
        wrapped = guard_our_code(chronovisor_model, sync_guard.wrap)
        _exercise(chronovisor_model, _inputs(model, device))
        torch.cuda.synchronize()
        assert wrapped > 0 and sync_guard.entered > 0
        assert chronovisor_model.controller.ticks == 4
    model = build_toy(preset).to(device=device, dtype=dtype)
    configs = [PTConfig(eta=0.01 * (s + 1), update_every=1, seed=s) for s in range(3)]
    chronovisor_model = chronovisor.wrap(model, configs, step_mode="manual")
    sync_guard = CudaSyncGuard()
    guard_our_code(chronovisor_model, sync_guard.wrap)
    inputs = _stack(_inputs(model, device), 3)
    with torch.no_grad(), chronovisor_model.record_routing():
        for _ in range(3):
            out = chronovisor_model(**inputs, use_cache=False)
            chronovisor_model.controller.step(loss=out.loss.detach().expand(3))
    torch.cuda.synchronize()
    assert sync_guard.entered > 0
