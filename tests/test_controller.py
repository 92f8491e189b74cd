"""Tests of the P×T controller against its field equations.

Expected values are computed here from the equations (by hand, or by the small pure-Python
oracle ``SpecReference`` below), never by calling ``chronovisor.controllers.dynamics``.
"""

from __future__ import annotations

import cmath
import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import chronovisor
from chronovisor.controllers import PTConfig, PTController

TWO_PI = 2.0 * math.pi
PRESETS = ("reference", "paper", "delayed", "loss_free")
MODES = ("off", "pressure", "temperature", "pt")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- helpers
def preset_config(**config) -> PTConfig:
    """A PTConfig; the paper preset is defined on the EMA usage, so it gets usage="ema" unless told."""
    if config.get("dynamics") == "paper":
        config.setdefault("usage", "ema")
    return PTConfig(**config)


def make(num_layers=1, num_experts=4, top_k=1, **config) -> PTController:
    return PTController(num_layers, num_experts, top_k, preset_config(**config))


def ids(*rows) -> torch.Tensor:
    """Selected expert ids [tokens, k] from per-token rows (an int row means k = 1)."""
    return torch.tensor([[r] if isinstance(r, int) else list(r) for r in rows], dtype=torch.long)


def pin_phases(controller: PTController, phases) -> None:
    """Set the oscillator phases (public nn.Module state API); combine with phase_step=0 to keep R fixed."""
    state = controller.state_dict()
    state["_phases"] = torch.as_tensor(phases, dtype=torch.float32).reshape(state["_phases"].shape)
    controller.load_state_dict(state)


def phases_of(controller: PTController) -> torch.Tensor:
    return controller.phases


def order_parameter(phases) -> float:
    """R = |mean e^{iφ}|, computed with complex Python numbers."""
    values = [float(p) for p in torch.as_tensor(phases).reshape(-1)]
    return abs(sum(cmath.exp(1j * p) for p in values) / len(values))


def all_fields(controller: PTController) -> dict[str, torch.Tensor]:
    return {
        "pressure": controller.pressure,
        "temperature": controller.temperature,
        "T_fast": controller.T_fast,
        "T_bar_local": controller.T_bar_local,
        "T_bar_global": controller.T_bar_global,
        "usage": controller.usage,
        "coherence": controller.coherence,
        "credit": controller.credit,
        "phases": phases_of(controller),
    }


def random_routing(generator: torch.Generator, tokens: int, num_experts: int, top_k: int):
    """Random logits -> softmax -> top-k -> renormalised weights (Mixtral-style)."""
    logits = torch.randn(tokens, num_experts, generator=generator)
    weights, index = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return logits, index, weights / weights.sum(dim=-1, keepdim=True)


def run_ticks(controller: PTController, ticks: int, seed: int = 1234, tokens: int = 6, loss=None, record=False):
    generator = torch.Generator().manual_seed(seed)
    trajectory = []
    for t in range(ticks):
        for layer in range(controller.num_layers):
            logits, index, weights = random_routing(generator, tokens, controller.num_experts, controller.top_k)
            controller.modulate(layer, logits)
            controller.observe(layer, index, weights)
        controller.step(loss=None if loss is None else loss(t))
        if record:
            trajectory.append(all_fields(controller))
    return trajectory


def assert_all_finite(controller: PTController) -> None:
    for name, value in all_fields(controller).items():
        assert torch.isfinite(value).all(), f"{name} became non-finite: {value}"


class SpecReference:
    """The `reference` preset in plain Python floats (independent of the package)."""

    def __init__(self, num_layers, num_experts, config: PTConfig, phases):
        self.L, self.N, self.c = num_layers, num_experts, config
        self.U = [[0.0] * num_experts for _ in range(num_layers)]
        self.phi = [[float(phases[i][k]) for k in range(num_experts)] for i in range(num_layers)]
        self.b = [[0.0] * num_experts for _ in range(num_layers)]
        self.T_fast = [[1.0] * num_experts for _ in range(num_layers)]
        self.T_local = [[1.0] * num_experts for _ in range(num_layers)]
        self.T_global = [1.0] * num_experts
        self.T_eff = [[1.0] * num_experts for _ in range(num_layers)]
        self.ticks = 0
        self.R = self.coherence()

    def coherence(self):
        flat = [p for row in self.phi for p in row]
        return abs(sum(cmath.exp(1j * p) for p in flat) / len(flat))

    def tick(self, counts, weight_sums):
        c, N = self.c, self.N
        for i in range(self.L):
            for k in range(N):
                if c.usage == "cumulative":
                    self.U[i][k] += counts[i][k]
                else:
                    self.U[i][k] = c.usage_decay * self.U[i][k] + (1 - c.usage_decay) * counts[i][k]
                if counts[i][k] > 0:
                    self.phi[i][k] = (self.phi[i][k] + 0.1 * weight_sums[i][k] / counts[i][k]) % TWO_PI
        self.R = self.coherence()
        self.ticks += 1
        if self.ticks % c.update_every:
            return
        eta = c.eta
        # 1. global follows the previous update's layer-mean T_fast, at rate η/2
        for k in range(N):
            mean_prev = sum(self.T_fast[i][k] for i in range(self.L)) / self.L
            self.T_global[k] = (1 - eta / 2) * self.T_global[k] + (eta / 2) * mean_prev
        for i in range(self.L):
            U = self.U[i]
            total = sum(U)
            p = [u / total for u in U] if total > 0 else [0.0] * N
            self.b[i] = [c.pressure_scale * min(1.0, max(-1.0, 2 * (1 / N - pk))) if total > 0 else 0.0
                         for pk in p]
            d = [abs(pk - 1 / N) for pk in p]
            dmax = max(d) if max(d) > 0 else 1.0
            umax = max(U)
            rel = [u / umax for u in U] if umax > 0 else [1.0] * N
            self.T_fast[i] = [
                min(3.0, max(0.3, (1 + 0.5 * (1 - self.R)) * (1 + 0.3 * d[k] / dmax) * (1 + 0.2 * (1 - rel[k]))))
                for k in range(N)
            ]
            # 3. local follows the fresh T_fast at rate η
            self.T_local[i] = [(1 - eta) * self.T_local[i][k] + eta * self.T_fast[i][k] for k in range(N)]
            self.T_eff[i] = [min(10.0, max(0.1, self.T_fast[i][k] * self.T_global[k] * self.T_local[i][k]))
                             for k in range(N)]


def close(actual: torch.Tensor, expected, rtol=1e-6, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- pressure
def test_pressure_is_zero_before_any_usage():
    controller = make(num_layers=2, update_every=1)
    assert torch.equal(controller.pressure, torch.zeros(2, 4))
    controller.step()  # a field update with no observed token at all
    assert torch.equal(controller.pressure, torch.zeros(2, 4))


def test_pressure_formula_on_hand_made_usage_including_the_clip():
    # N = 8, 7 tokens to expert 0 and 1 to expert 1: p = [7/8, 1/8, 0, ...]
    # 2(1/8 - 7/8) = -1.5 -> clipped to -1;  2(1/8 - 1/8) = 0;  2(1/8 - 0) = 0.25
    controller = make(num_experts=8, pressure_scale=0.5, update_every=1)
    controller.observe(0, ids(0, 0, 0, 0, 0, 0, 0, 1))
    controller.step()
    close(controller.pressure, [[-0.5, 0.0] + [0.125] * 6])


def test_pressure_of_an_unused_expert_with_two_experts_hits_plus_P():
    # N = 2, p = [1, 0]: 2(1/2 - 1) = -1, 2(1/2 - 0) = +1
    controller = make(num_experts=2, pressure_scale=0.7, update_every=1)
    controller.observe(0, ids(0, 0, 0))
    controller.step()
    close(controller.pressure, [[-0.7, 0.7]])


@pytest.mark.parametrize("scale", [0.0, 0.1, 0.5, 1.5])
@pytest.mark.parametrize("num_experts", [2, 3, 8])
def test_pressure_is_bounded_by_P_under_random_usage(scale, num_experts):
    controller = make(num_layers=3, num_experts=num_experts, pressure_scale=scale, update_every=1)
    generator = torch.Generator().manual_seed(num_experts)
    for _ in range(10):
        for layer in range(3):
            skewed = torch.randint(0, num_experts, (int(torch.randint(0, 20, (1,), generator=generator)), 1),
                                   generator=generator) * torch.randint(0, 2, (1,), generator=generator)
            controller.observe(layer, skewed)
        controller.step()
        assert (controller.pressure.abs() <= scale + 1e-7).all()


def test_under_used_experts_get_positive_pressure_and_over_used_negative():
    controller = make(num_experts=4, update_every=1)
    controller.observe(0, ids(0, 0, 0, 0, 1, 1, 2))  # p = [4/7, 2/7, 1/7, 0]
    controller.step()
    b = controller.pressure[0]
    assert b[0] < 0 and b[1] < 0  # above 1/4
    assert b[2] > 0 and b[3] > 0  # below 1/4
    assert b[3] > b[2]


# --------------------------------------------------------------------------- fast temperature
def test_fast_temperature_formula_on_hand_computed_inputs():
    # R pinned to 0.5: phases 0, π/2, π, π/2 -> mean e^{iφ} = i/2.   Coherence factor 1 + 0.5(1 - 0.5) = 1.25.
    # U = [3, 1, 0, 0]: p = [.75, .25, 0, 0], d = [.5, 0, .25, .25], d/max d = [1, 0, .5, .5],
    # rel = [1, 1/3, 0, 0].
    controller = make(num_experts=4, update_every=1, phase_step=0.0)
    pin_phases(controller, [[0.0, math.pi / 2, math.pi, math.pi / 2]])
    controller.observe(0, ids(0, 0, 0, 1))
    controller.step()
    assert controller.coherence.item() == pytest.approx(0.5, abs=1e-6)
    expected = [
        1.25 * (1 + 0.3 * 1.0) * (1 + 0.2 * 0.0),
        1.25 * (1 + 0.3 * 0.0) * (1 + 0.2 * (2 / 3)),
        1.25 * (1 + 0.3 * 0.5) * (1 + 0.2 * 1.0),
        1.25 * (1 + 0.3 * 0.5) * (1 + 0.2 * 1.0),
    ]
    close(controller.T_fast, [expected])


def test_fast_temperature_uses_divisor_one_when_max_deviation_is_zero():
    # uniform usage: d = 0 everywhere (0/0 avoided), rel = 1 -> T_fast = coherence factor only
    controller = make(num_experts=4, update_every=1, phase_step=0.0)
    pin_phases(controller, [[0.0, math.pi / 2, math.pi, math.pi / 2]])  # R = 0.5
    controller.observe(0, ids(0, 1, 2, 3))
    controller.step()
    close(controller.T_fast, [[1.25] * 4])
    assert torch.isfinite(controller.temperature).all()


def test_fast_temperature_without_usage_uses_rel_one_and_zero_share():
    # Σ U = 0: p = 0, d = 1/N for all (d/max d = 1), rel = 1 -> 1.25 · 1.3 · 1
    controller = make(num_experts=4, update_every=1, phase_step=0.0)
    pin_phases(controller, [[0.0, math.pi / 2, math.pi, math.pi / 2]])
    controller.step()
    close(controller.T_fast, [[1.25 * 1.3] * 4])


def test_fast_temperature_is_clipped_to_its_bounds():
    high = make(num_experts=4, update_every=1, phase_step=0.0, beta_coherence=10.0)
    pin_phases(high, [[0.0, math.pi / 2, math.pi, 3 * math.pi / 2]])  # R = 0 -> factor 11
    high.step()
    close(high.T_fast, [[3.0] * 4], rtol=0, atol=0)
    low = make(num_experts=4, update_every=1, phase_step=0.0, base_temperature=0.1)
    pin_phases(low, [[0.0] * 4])  # R = 1 -> 0.1 · 1 · 1 · 1 = 0.1 -> clipped to 0.3
    low.observe(0, ids(0, 1, 2, 3))
    low.step()
    close(low.T_fast, [[0.3] * 4], rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_fast_temperature_stays_in_bounds_and_effective_temperature_in_clamp(seed):
    controller = make(num_layers=2, num_experts=5, top_k=2, eta=1.0, update_every=1, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(25):
        for layer in range(2):
            hot = int(torch.randint(0, 5, (1,), generator=generator))
            controller.observe(layer, torch.tensor([[hot, (hot + 1) % 5]] * 50))  # extreme concentration
        controller.step()
        assert (controller.T_fast >= 0.3).all() and (controller.T_fast <= 3.0).all()
        assert (controller.temperature >= 0.1).all() and (controller.temperature <= 10.0).all()


def test_effective_temperature_is_clamped_to_ten_and_to_one_tenth():
    # T_fast = 3 (clipped) everywhere, η = 1: T̄_local = 3 at once, T̄_global = 3 one update later -> 27 -> 10
    high = make(num_experts=4, eta=1.0, eta_global_factor=1.0, update_every=1, phase_step=0.0,
                beta_coherence=10.0)
    pin_phases(high, [[0.0, math.pi / 2, math.pi, 3 * math.pi / 2]])
    high.step()
    close(high.temperature, [[9.0] * 4])  # 3 · T̄_global(=1, previous T_fast was 1) · 3
    high.step()
    close(high.temperature, [[10.0] * 4], rtol=0, atol=0)
    # T_fast = 0.05 (bounds lowered), η = 1: 0.05 · 1 · 0.05 = 0.0025 -> 0.1
    low = make(num_experts=4, eta=1.0, update_every=1, phase_step=0.0, base_temperature=0.05,
               fast_temperature_min=0.01)
    pin_phases(low, [[0.0] * 4])
    low.observe(0, ids(0, 1, 2, 3))
    low.step()
    close(low.T_fast, [[0.05] * 4])
    close(low.temperature, [[0.1] * 4], rtol=0, atol=0)


# --------------------------------------------------------------------------- geological ordering
def test_geological_update_order_global_lags_one_update_local_uses_fresh_fast_temperature():
    # L = 2, N = 2, η = 0.5 (global rate η/2 = 0.25), R pinned to 1 (factor 1).
    controller = make(num_layers=2, num_experts=2, eta=0.5, update_every=1, phase_step=0.0)
    pin_phases(controller, [[0.0, 0.0], [0.0, 0.0]])
    # update 1: layer 0 U = [1, 0] -> d/max d = [1, 1], rel = [1, 0] -> T_fast = [1.3, 1.56]
    #           layer 1 U = [1, 1] -> d = 0, rel = [1, 1]       -> T_fast = [1, 1]
    controller.observe(0, ids(0))
    controller.observe(1, ids(0, 1))
    controller.step()
    close(controller.T_fast, [[1.3, 1.56], [1.0, 1.0]])
    # global mixes in the initial ones: 0.75 · 1 + 0.25 · 1 = 1
    close(controller.T_bar_global, [1.0, 1.0])
    # local uses the fresh T_fast: 0.5 · 1 + 0.5 · T_fast
    close(controller.T_bar_local, [[1.15, 1.28], [1.0, 1.0]])
    close(controller.temperature, [[1.3 * 1.15, 1.56 * 1.28], [1.0, 1.0]])
    # update 2: layer 0 U = [1, 2] -> p = [1/3, 2/3], d/max = [1, 1], rel = [.5, 1] -> T_fast = [1.43, 1.3]
    #           layer 1 U = [3, 1] -> p = [.75, .25], d/max = [1, 1], rel = [1, 1/3] -> [1.3, 1.3 · (1 + .2 · 2/3)]
    controller.observe(0, ids(1, 1))
    controller.observe(1, ids(0, 0))
    controller.step()
    fast_1 = 1.3 * (1 + 0.2 * 2 / 3)
    close(controller.T_fast, [[1.43, 1.3], [1.3, fast_1]])
    # global uses the layer mean of update 1's T_fast ([1.15, 1.28]), NOT the fresh one ([1.365, 1.38...])
    global_2 = [0.75 * 1.0 + 0.25 * 1.15, 0.75 * 1.0 + 0.25 * 1.28]
    close(controller.T_bar_global, global_2)
    local_2 = [[0.5 * 1.15 + 0.5 * 1.43, 0.5 * 1.28 + 0.5 * 1.3], [0.5 * 1.0 + 0.5 * 1.3, 0.5 * 1.0 + 0.5 * fast_1]]
    close(controller.T_bar_local, local_2)
    close(controller.temperature, [[1.43 * global_2[0] * local_2[0][0], 1.3 * global_2[1] * local_2[0][1]],
                                   [1.3 * global_2[0] * local_2[1][0], fast_1 * global_2[1] * local_2[1][1]]])


def test_geological_fields_stay_at_one_with_eta_zero():
    controller = make(num_layers=2, num_experts=4, top_k=2, eta=0.0, update_every=1)
    run_ticks(controller, 10)
    assert torch.equal(controller.T_bar_local, torch.ones(2, 4))
    assert torch.equal(controller.T_bar_global, torch.ones(4))
    close(controller.temperature, controller.T_fast)  # "P-only" of the reference: T_eff = T_fast


@pytest.mark.parametrize("usage", ["cumulative", "ema"])
def test_reference_trajectory_matches_the_spec_over_many_ticks(usage):
    config = PTConfig(eta=0.3, pressure_scale=0.8, update_every=2, usage=usage, seed=7)
    L, N, K = 2, 5, 2
    controller = PTController(L, N, K, config)
    oracle = SpecReference(L, N, config, phases_of(controller).double().tolist())
    generator = torch.Generator().manual_seed(99)
    for _ in range(14):
        counts = [[0.0] * N for _ in range(L)]
        sums = [[0.0] * N for _ in range(L)]
        for layer in range(L):
            # skewed routing so that the fields move visibly
            logits = torch.randn(9, N, generator=generator) + torch.tensor([1.5, 0.5, 0.0, -0.5, -1.0])
            weights, index = torch.softmax(logits, -1).topk(K, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
            controller.observe(layer, index, weights)
            for e, w in zip(index.reshape(-1).tolist(), weights.reshape(-1).tolist(), strict=True):
                counts[layer][e] += 1
                sums[layer][e] += w
        controller.step()
        oracle.tick(counts, sums)
        close(controller.usage, oracle.U, rtol=1e-6, atol=1e-5)
        phases = phases_of(controller).double()
        close(torch.polar(torch.ones_like(phases), phases), torch.polar(torch.ones(L, N, dtype=torch.float64),
              torch.tensor(oracle.phi, dtype=torch.float64)), rtol=0, atol=1e-5)  # compare on the circle
        assert controller.coherence.item() == pytest.approx(oracle.R, abs=1e-5)
        close(controller.pressure, oracle.b, rtol=1e-5, atol=1e-6)
        close(controller.T_fast, oracle.T_fast, rtol=1e-5, atol=1e-6)
        close(controller.T_bar_global, oracle.T_global, rtol=1e-5, atol=1e-6)
        close(controller.T_bar_local, oracle.T_local, rtol=1e-5, atol=1e-6)
        close(controller.temperature, oracle.T_eff, rtol=1e-5, atol=1e-6)
    assert controller.ticks == 14


# --------------------------------------------------------------------------- usage
def test_cumulative_usage_adds_the_counts_of_each_tick():
    controller = make(num_experts=3, top_k=2, usage="cumulative")
    controller.observe(0, ids((0, 1), (0, 2)))
    controller.step()
    close(controller.usage, [[2.0, 1.0, 1.0]], rtol=0, atol=0)
    controller.observe(0, ids((1, 2)))
    controller.observe(0, ids((1, 0)))  # a second router call in the same tick accumulates
    controller.step()
    close(controller.usage, [[3.0, 3.0, 2.0]], rtol=0, atol=0)


def test_ema_usage_decays_with_rho_095():
    controller = make(num_experts=2, usage="ema")
    assert controller.config.usage_decay == 0.95
    controller.observe(0, ids(0, 0))
    controller.step()
    close(controller.usage, [[0.05 * 2, 0.0]])  # 0.95·0 + 0.05·[2, 0]
    controller.observe(0, ids(1, 1))
    controller.step()
    close(controller.usage, [[0.95 * 0.1, 0.05 * 2]])
    controller.step()  # a tick with no tokens still decays
    close(controller.usage, [[0.95 * 0.95 * 0.1, 0.95 * 0.1]])


def test_usage_counts_exclude_masked_padding_tokens():
    controller = make(num_experts=4, top_k=2)
    # token 0 is padding: its two selections (0, 1) must not count; token 1 selects (2, 3)
    controller.observe(0, ids((0, 1), (2, 3), (0, 3)), mask=torch.tensor([False, True, True]))
    controller.step()
    close(controller.usage, [[1.0, 0.0, 1.0, 2.0]], rtol=0, atol=0)


def test_fully_masked_tick_changes_neither_usage_nor_phases():
    controller = make(num_experts=4, top_k=2)
    before = phases_of(controller)
    controller.observe(0, ids((0, 1), (2, 3)), torch.tensor([[0.5, 0.5], [0.9, 0.1]]),
                       mask=torch.tensor([False, False]))
    controller.step()
    assert torch.equal(controller.usage, torch.zeros(1, 4))
    assert torch.equal(phases_of(controller), before)


# --------------------------------------------------------------------------- schedule
def test_fields_change_only_on_multiples_of_update_every_while_usage_and_phases_move_every_tick():
    controller = make(num_layers=2, num_experts=4, top_k=2, update_every=5)
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(3)
    initial = all_fields(controller)
    previous = initial
    for tick in range(1, 11):
        for layer in range(2):
            _, index, weights = random_routing(generator, 6, 4, 2)
            controller.observe(layer, index, weights)
        controller.step()
        now = all_fields(controller)
        assert not torch.equal(now["usage"], previous["usage"]), tick
        assert not torch.equal(now["phases"], previous["phases"]), tick
        changed = {name: not torch.equal(now[name], previous[name])
                   for name in ("pressure", "T_fast", "T_bar_local", "T_bar_global", "temperature")}
        if tick % 5:
            assert not any(changed.values()), (tick, changed)
        elif tick == 5:  # first update: T̄_global mixes in the initial ones, so it stays 1
            assert changed == dict(pressure=True, T_fast=True, T_bar_local=True, T_bar_global=False,
                                   temperature=True), (tick, changed)
        else:
            assert all(changed.values()), (tick, changed)
        if tick < 5:  # before the first field update the model is untouched
            assert torch.equal(controller.modulate(0, logits), logits)
        previous = now
    assert controller.ticks == 10
    assert not torch.equal(controller.modulate(0, logits), logits)


# --------------------------------------------------------------------------- coherence
def test_phases_advance_by_a_tenth_of_the_mean_weight_of_each_selected_expert():
    controller = make(num_experts=4, top_k=2)
    start = [1.0, 2.0, 3.0, TWO_PI - 0.01]
    pin_phases(controller, [start])
    # expert 0: weights 0.6, 0.8 -> mean 0.7; expert 1: 0.4; expert 3: 0.2; expert 2 unselected
    controller.observe(0, ids((0, 1), (0, 3)), torch.tensor([[0.6, 0.4], [0.8, 0.2]]))
    controller.step()
    expected = [1.0 + 0.07, 2.0 + 0.04, 3.0, (TWO_PI - 0.01 + 0.02) - TWO_PI]  # the last wraps mod 2π
    close(phases_of(controller), [expected], rtol=0, atol=2e-6)
    assert controller.coherence.item() == pytest.approx(order_parameter([expected]), abs=1e-6)


def test_phases_without_weights_advance_by_one_over_top_k():
    controller = make(num_experts=4, top_k=2)
    pin_phases(controller, [[0.5, 0.5, 0.5, 0.5]])
    controller.observe(0, ids((0, 1)))
    controller.step()
    close(phases_of(controller), [[0.55, 0.55, 0.5, 0.5]])


def test_coherence_is_the_modulus_of_the_mean_phasor_over_all_layers_and_experts():
    controller = make(num_layers=2, num_experts=3, seed=11)
    assert controller.coherence.item() == pytest.approx(order_parameter(phases_of(controller)), abs=1e-6)
    run_ticks(controller, 3)
    assert controller.coherence.item() == pytest.approx(order_parameter(phases_of(controller)), abs=1e-6)
    pin_phases(controller, [[0.3] * 3, [0.3] * 3])  # all aligned -> R = 1
    controller.step()
    assert controller.coherence.item() == pytest.approx(1.0, abs=1e-6)


def test_initial_phases_are_uniform_in_zero_two_pi():
    phases = phases_of(make(num_layers=4, num_experts=64, seed=5))
    assert (phases >= 0).all() and (phases < TWO_PI).all()
    assert phases.std() > 1.0  # spread over the circle (uniform: 2π/√12 ≈ 1.81)


# --------------------------------------------------------------------------- identity
def test_mode_off_returns_the_same_logits_object_and_still_records_statistics():
    controller = make(num_layers=2, num_experts=4, top_k=2, mode="off", update_every=1)
    logits = torch.randn(5, 4)
    run_ticks(controller, 3)
    assert controller.modulate(1, logits) is logits
    assert controller.usage.sum() > 0 and not torch.equal(controller.temperature, torch.ones(2, 4))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("learnable", [False, True])
def test_pt_mode_before_any_field_update_is_bit_identical_for_fp32(preset, learnable):
    controller = make(num_layers=2, num_experts=8, top_k=2, dynamics=preset, learnable=learnable)
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)) * 3
    z = controller.modulate(1, logits)
    assert z.dtype == torch.float32 and torch.equal(z, logits)
    run_ticks(controller, 4)  # ticks 1..4 of update_every = 5 (loss_free's bias is selection-only)
    assert torch.equal(controller.modulate(0, logits), logits)


def test_pt_mode_identity_for_bf16_logits_is_exactly_their_float_upcast():
    controller = make(num_experts=8)
    logits = (torch.randn(16, 8, generator=torch.Generator().manual_seed(2)) * 4).to(torch.bfloat16)
    z = controller.modulate(0, logits)
    assert z.dtype == torch.float32
    assert torch.equal(z, logits.float())


def test_identity_holds_at_every_tick_when_b_is_zero_and_T_is_one():
    # P = 0 and all β = 0 give b ≡ 0 and T_fast = T̄ = T_eff ≡ 1 although the fields update every tick
    controller = make(num_layers=2, num_experts=4, top_k=2, update_every=1, pressure_scale=0.0,
                      beta_coherence=0.0, beta_deviation=0.0, beta_reliability=0.0)
    logits = torch.randn(7, 4)
    for _ in range(5):
        run_ticks(controller, 1)
        assert torch.equal(controller.modulate(0, logits), logits)


# --------------------------------------------------------------------------- modes
def _moved(mode: str, **config) -> PTController:
    """A controller whose b and T_eff are both non-trivial after 10 skewed ticks."""
    controller = make(num_layers=2, num_experts=4, top_k=1, mode=mode, eta=0.5, update_every=1, **config)
    for _ in range(10):
        for layer in range(2):
            controller.observe(layer, ids(0, 0, 0, 1, 2))
        controller.step()
    assert (controller.pressure.abs() > 0.01).any() and (controller.temperature - 1).abs().max() > 0.01
    return controller


def test_pressure_mode_applies_only_the_pressure():
    controller = _moved("pressure")
    logits = torch.randn(5, 4)
    close(controller.modulate(1, logits), logits + controller.pressure[1], rtol=0, atol=0)


def test_temperature_mode_applies_only_the_temperature():
    controller = _moved("temperature")
    logits = torch.randn(5, 4)
    close(controller.modulate(1, logits), logits / controller.temperature[1], rtol=0, atol=0)


def test_pt_mode_applies_pressure_then_divides_by_temperature():
    controller = _moved("pt")
    logits = torch.randn(5, 4)
    close(controller.modulate(1, logits), (logits + controller.pressure[1]) / controller.temperature[1],
          rtol=0, atol=0)


def test_modes_see_the_same_fields_so_only_the_mask_differs():
    fields = {mode: _moved(mode) for mode in MODES}
    for mode in MODES[1:]:
        close(fields[mode].pressure, fields["off"].pressure, rtol=0, atol=0)
        close(fields[mode].temperature, fields["off"].temperature, rtol=0, atol=0)


def test_a_shared_temperature_never_changes_the_top_k_order():
    # uniform usage -> d = 0, rel = 1 -> T_fast (hence T_eff) equal across experts
    controller = make(num_experts=6, mode="temperature", eta=0.7, update_every=1)
    for _ in range(3):
        controller.observe(0, ids(0, 1, 2, 3, 4, 5))
        controller.step()
    temperature = controller.temperature[0]
    assert torch.equal(temperature, temperature[0].expand(6)) and temperature[0] > 1.1
    logits = torch.randn(200, 6, generator=torch.Generator().manual_seed(4)) * 5 - 2
    z = controller.modulate(0, logits)
    assert torch.equal(z.topk(3, dim=-1).indices, logits.topk(3, dim=-1).indices)
    assert torch.equal(z.argsort(dim=-1), logits.argsort(dim=-1))


def test_a_per_expert_temperature_can_change_the_top_1_choice():
    # N = 2, U = [1, 0]: T_fast ∝ 1.3·[1, 1.2] (η = 0 so T_eff = T_fast). With negative logits
    # [-1.0, -1.1] expert 0 wins before, but -1/(1.3a) = -0.769/a < -1.1/(1.56a) = -0.705/a after.
    controller = make(num_experts=2, mode="temperature", eta=0.0, update_every=1)
    controller.observe(0, ids(0))
    controller.step()
    temperature = controller.temperature[0]
    assert temperature[1] / temperature[0] == pytest.approx(1.2, rel=1e-6)
    logits = torch.tensor([[-1.0, -1.1]])
    assert logits.argmax(-1).item() == 0
    assert controller.modulate(0, logits).argmax(-1).item() == 1


# --------------------------------------------------------------------------- finiteness
@pytest.mark.parametrize("preset", PRESETS)
def test_non_finite_logits_never_reach_the_fields(preset):
    mode = "pt"
    controller = make(num_layers=2, num_experts=4, top_k=2, dynamics=preset, mode=mode, update_every=2)
    bad = torch.tensor([[math.inf, 0.0, -math.inf, 1.0], [math.nan, 2.0, 0.5, math.nan],
                        [1e38, -1e38, 3e38, 0.0]])
    for t in range(20):
        for layer in range(2):
            z = controller.modulate(layer, bad)
            weights, index = torch.softmax(z, dim=-1).topk(2, dim=-1)  # NaN weights included
            controller.observe(layer, index, weights)
        controller.step(loss=torch.tensor(math.nan) if t % 2 else float(t))
        assert_all_finite(controller)


@pytest.mark.parametrize("bad_loss", [math.nan, math.inf, -math.inf, torch.tensor(math.nan),
                                      torch.tensor(math.inf), torch.tensor(1e300, dtype=torch.float64)])
def test_non_finite_losses_never_make_the_delayed_fields_non_finite(bad_loss):
    controller = make(num_layers=2, num_experts=4, top_k=2, dynamics="delayed", credit_window=2,
                      update_every=1, eta=0.5)
    losses = [5.0, 4.0, bad_loss, 3.0, bad_loss, bad_loss, bad_loss, bad_loss, 2.0, 1.0]
    run_ticks(controller, len(losses), loss=lambda t: losses[t])
    assert_all_finite(controller)
    assert 0.0 <= controller.credit.item() <= 1.0


def test_all_losses_non_finite_give_zero_credit():
    controller = make(dynamics="delayed", credit_window=2, update_every=1)
    run_ticks(controller, 6, loss=lambda t: [math.nan, math.inf, -math.inf][t % 3])
    assert controller.credit.item() == 0.0
    assert torch.equal(controller.T_bar_local, torch.ones(1, 4))


def test_a_token_with_a_nan_weight_is_not_counted_and_infinite_weights_count_as_zero_weight():
    controller = make(num_experts=4, top_k=2)
    pin_phases(controller, [[1.0, 1.0, 1.0, 1.0]])
    controller.observe(0, ids((0, 1), (2, 3)), torch.tensor([[math.nan, math.inf], [-math.inf, 0.5]]))
    controller.step()
    close(phases_of(controller), [[1.0, 1.0, 1.0, 1.05]])  # only expert 3 moves: 0.1 · 0.5 / 1
    close(controller.usage, [[0.0, 0.0, 1.0, 1.0]], rtol=0, atol=0)  # the NaN-routed token is left out
    assert_all_finite(controller)


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("preset", PRESETS)
def test_same_seed_gives_an_identical_trajectory(preset):
    def trajectory(seed):
        controller = make(num_layers=2, num_experts=6, top_k=2, dynamics=preset, update_every=3, seed=seed,
                          usage="ema")
        return run_ticks(controller, 30, loss=lambda t: 3.0 - 0.05 * t, record=True)

    first, second = trajectory(42), trajectory(42)
    for a, b in zip(first, second, strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_different_seeds_give_different_phases_and_coherence():
    a, b = make(num_layers=2, num_experts=6, seed=1), make(num_layers=2, num_experts=6, seed=2)
    assert not torch.equal(phases_of(a), phases_of(b))
    assert a.coherence.item() != b.coherence.item()
    run_ticks(a, 5)
    run_ticks(b, 5)
    assert not torch.equal(phases_of(a), phases_of(b))


def test_seed_does_not_consume_or_depend_on_the_global_torch_rng():
    torch.manual_seed(0)
    a = phases_of(make(num_experts=6, seed=3))
    after_construction = torch.rand(3)
    torch.manual_seed(12345)
    b = phases_of(make(num_experts=6, seed=3))
    assert torch.equal(a, b)  # independent of the global RNG
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after_construction)  # and the global RNG was not advanced


def test_reset_returns_to_the_initial_state_of_the_seed():
    controller = make(num_layers=2, num_experts=4, top_k=2, update_every=1, seed=9)
    initial = all_fields(controller)
    run_ticks(controller, 7)
    controller.reset()
    assert controller.ticks == 0
    for name, value in all_fields(controller).items():
        assert torch.equal(value, initial[name]), name


# --------------------------------------------------------------------------- persistence
def _assert_same_state(a: PTController, b: PTController) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:  # exact, NaN-aware (the loss window holds NaN for "no signal")
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert a.ticks == b.ticks and a.configs == b.configs


@pytest.mark.parametrize("preset", PRESETS)
def test_save_then_load_round_trips_exactly_and_continues_identically(preset, tmp_path):
    config = dict(dynamics=preset, update_every=3, learnable=True, usage="ema", eta=0.2, seed=4)
    original = make(num_layers=2, num_experts=5, top_k=2, **config)
    with torch.no_grad():
        original.pressure_offset.copy_(torch.randn(2, 5))
        original.log_temperature_offset.copy_(torch.randn(2, 5) * 0.1)
    run_ticks(original, 13, loss=lambda t: 4.0 - 0.1 * t)
    original.save(tmp_path / "ckpt")

    loaded = PTController.load(tmp_path / "ckpt")
    _assert_same_state(original, loaded)
    assert loaded.ticks == 13

    into = make(num_layers=2, num_experts=5, top_k=2, **config)
    into.load_state(tmp_path / "ckpt")
    _assert_same_state(original, into)

    # the schedule (ticks) and the loss window came back too: the three continue in lock-step
    trajectories = [run_ticks(c, 7, seed=77, loss=lambda t: 2.0 - 0.1 * t, record=True)
                    for c in (original, loaded, into)]
    for step_a, step_b, step_c in zip(*trajectories, strict=True):
        for name in step_a:
            assert torch.equal(step_a[name], step_b[name]) and torch.equal(step_a[name], step_c[name]), name


def test_saved_config_json_records_shape_ticks_and_config(tmp_path):
    controller = make(num_layers=3, num_experts=4, top_k=2, eta=0.02)
    run_ticks(controller, 2)
    controller.save(tmp_path, metadata={"model": "tiny"})
    saved = json.loads((tmp_path / "controller_config.json").read_text())
    assert (saved["num_layers"], saved["num_experts"], saved["top_k"], saved["ticks"]) == (3, 4, 2, 2)
    assert saved["config"]["eta"] == 0.02 and saved["model"] == "tiny"


@pytest.mark.parametrize(("field", "other"), [
    ("num_experts", dict(num_experts=6)),
    ("num_layers", dict(num_layers=3)),
    ("top_k", dict(top_k=1)),
    ("dynamics", dict(dynamics="paper", usage="ema")),
    ("usage", dict(usage="cumulative")),
    ("learnable", dict(learnable=False)),
])
def test_loading_into_another_shape_or_preset_raises_naming_the_field(field, other, tmp_path):
    shape = dict(num_layers=2, num_experts=4, top_k=2)
    config = dict(dynamics="reference", usage="ema", learnable=True)
    source = make(**shape, **config)
    run_ticks(source, 2)
    source.save(tmp_path)
    target_shape = {**shape, **{k: v for k, v in other.items() if k in shape}}
    target_config = {**config, **{k: v for k, v in other.items() if k not in shape}}
    target = make(**target_shape, **target_config)
    with pytest.raises(ValueError, match=field):
        target.load_state(tmp_path)


@pytest.mark.parametrize("missing", ["controller.safetensors", "controller_config.json"])
def test_loading_with_a_missing_file_raises_file_not_found_naming_it(missing, tmp_path):
    make().save(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        PTController.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        make().load_state(tmp_path)


def test_loading_from_an_empty_directory_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="controller"):
        PTController.load(tmp_path / "nowhere")


# --------------------------------------------------------------------------- PTConfig validation
@pytest.mark.parametrize(("field", "changes"), [
    ("eta", dict(eta=-0.1)),
    ("eta", dict(eta=1.5)),
    ("eta", dict(eta=math.nan)),
    ("eta", dict(eta="0.1")),
    ("pressure_scale", dict(pressure_scale=-0.5)),
    ("usage_decay", dict(usage_decay=1.01)),
    ("mode", dict(mode="both")),
    ("dynamics", dict(dynamics="geology")),
    ("usage", dict(usage="lifetime")),
    ("paper_coupling", dict(paper_coupling="multiply")),
    ("update_every", dict(update_every=0)),
    ("update_every", dict(update_every=2.0)),
    ("update_every", dict(update_every=True)),
    ("seed", dict(seed=1.5)),
    ("seed", dict(seed="7")),
    ("credit_window", dict(credit_window=0)),
    ("learnable", dict(learnable=1)),
    ("fast_temperature_max", dict(fast_temperature_min=2.0, fast_temperature_max=1.0)),
    ("temperature_min", dict(temperature_min=0.0)),
    ("mode", dict(dynamics="loss_free", mode="temperature")),
])
def test_invalid_config_raises_value_error_naming_the_field(field, changes):
    with pytest.raises(ValueError, match=rf"PTConfig\.{field}\b"):
        PTConfig(**changes)


@pytest.mark.parametrize("changes", [
    dict(), dict(eta=0.0), dict(eta=1.0), dict(pressure_scale=0.0), dict(update_every=1),
    dict(dynamics="loss_free", mode="pressure"), dict(dynamics="loss_free", mode="pt"),
    dict(dynamics="paper", usage="ema", paper_coupling="bias"), dict(usage="ema", seed=-3),
])
def test_valid_configs_are_accepted(changes):
    PTConfig(**changes)


def test_default_config_carries_the_spec_constants():
    c = PTConfig()
    assert (c.mode, c.dynamics, c.usage, c.update_every) == ("pt", "reference", "cumulative", 5)
    assert (c.usage_decay, c.eta_global_factor, c.pressure_gain, c.phase_step) == (0.95, 0.5, 2.0, 0.1)
    assert (c.base_temperature, c.beta_coherence, c.beta_deviation, c.beta_reliability) == (1.0, 0.5, 0.3, 0.2)
    assert (c.fast_temperature_min, c.fast_temperature_max, c.temperature_min, c.temperature_max) == \
        (0.3, 3.0, 0.1, 10.0)
    assert c.loss_free_rate == 0.001


def test_config_round_trips_through_dict_and_rejects_unknown_fields():
    config = PTConfig(eta=0.02, mode="pressure", usage="ema")
    assert PTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bogus"):
        PTConfig.from_dict({**config.to_dict(), "bogus": 1})


@pytest.mark.parametrize(("args", "name"), [((0, 4, 1), "num_layers"), ((1, 1, 1), "num_experts"),
                                            ((1, 4, 0), "top_k"), ((1, 4, 5), "top_k")])
def test_controller_rejects_bad_shapes(args, name):
    with pytest.raises(ValueError, match=name):
        PTController(*args)


# --------------------------------------------------------------------------- delayed preset
def test_delayed_without_loss_keeps_geology_frozen_at_one():
    controller = make(num_layers=2, num_experts=4, top_k=2, dynamics="delayed", eta=0.5, update_every=1)
    run_ticks(controller, 25)
    assert controller.credit.item() == 0.0
    assert torch.equal(controller.T_bar_local, torch.ones(2, 4))
    assert torch.equal(controller.T_bar_global, torch.ones(4))
    assert not torch.equal(controller.T_fast, torch.ones(2, 4))  # the fast field still runs
    close(controller.temperature, controller.T_fast, rtol=0, atol=0)


def test_delayed_improving_loss_gives_the_relative_improvement_as_credit_and_moves_geology():
    # W = 2, scale 1: after losses 10, 9, 8, 7 the credit is (mean(10, 9) - mean(8, 7)) / mean(10, 9) = 4/19
    controller = make(num_experts=4, dynamics="delayed", credit_window=2, credit_scale=1.0, eta=0.5,
                      update_every=4, phase_step=0.0)
    pin_phases(controller, [[0.0] * 4])  # R = 1
    for loss in (10.0, 9.0, 8.0, 7.0):
        controller.observe(0, ids(0, 0, 0, 1))
        controller.step(loss=loss)
    credit = 4 / 19
    assert controller.credit.item() == pytest.approx(credit, rel=1e-6)
    # U = [12, 4, 0, 0]: p = [.75, .25, 0, 0] -> T_fast = [1.3, 1 + .2·2/3, 1.15·1.2, 1.15·1.2]
    fast = [1.3, 1 + 0.2 * 2 / 3, 1.38, 1.38]
    close(controller.T_fast, [fast])
    close(controller.T_bar_global, [1.0] * 4)  # previous T_fast was the initial ones
    local = [1 + 0.5 * credit * (f - 1) for f in fast]  # rate η · c
    close(controller.T_bar_local, [local])
    close(controller.temperature, [[f * t for f, t in zip(fast, local, strict=True)]])


def test_delayed_credit_saturates_at_one_for_a_large_improvement():
    controller = make(dynamics="delayed", credit_window=2, credit_scale=10.0, update_every=4)
    run_ticks(controller, 4, loss=lambda t: [10.0, 9.0, 8.0, 7.0][t])  # 10 · 4/19 > 1
    assert controller.credit.item() == 1.0


def test_delayed_worsening_or_flat_loss_gives_zero_credit_and_no_commitment():
    for losses in ([1.0 + 0.5 * t for t in range(12)], [2.0] * 12):
        controller = make(num_layers=2, num_experts=4, top_k=2, dynamics="delayed", credit_window=2,
                          eta=0.5, update_every=1)
        run_ticks(controller, len(losses), loss=lambda t, losses=losses: losses[t])
        assert controller.credit.item() == 0.0
        assert torch.equal(controller.T_bar_local, torch.ones(2, 4))
        assert torch.equal(controller.T_bar_global, torch.ones(4))


def test_delayed_needs_two_full_windows_before_crediting():
    controller = make(dynamics="delayed", credit_window=3, update_every=1)
    run_ticks(controller, 3, loss=lambda t: 10.0 - t)  # only the newer half has losses
    assert controller.credit.item() == 0.0


# --------------------------------------------------------------------------- loss_free preset
def test_loss_free_bias_follows_the_sign_rule_every_tick_regardless_of_update_every():
    controller = make(num_experts=4, dynamics="loss_free", update_every=5)
    assert controller.config.loss_free_rate == 0.001
    controller.observe(0, ids(0, 0, 0, 1))  # loads [3, 1, 0, 0], mean 1 -> sign(1 - load) = [-1, 0, 1, 1]
    controller.step()
    close(controller.pressure, [[-0.001, 0.0, 0.001, 0.001]], rtol=0, atol=1e-9)
    controller.observe(0, ids(1, 1, 2, 2))  # loads [0, 2, 2, 0] -> [1, -1, -1, 1]
    controller.step()
    close(controller.pressure, [[0.0, -0.001, 0.0, 0.002]], rtol=0, atol=1e-9)
    controller.step()  # no tokens: all loads equal the mean, sign 0
    close(controller.pressure, [[0.0, -0.001, 0.0, 0.002]], rtol=0, atol=1e-9)
    assert controller.ticks == 3


def test_loss_free_bias_is_per_layer_and_ignores_padding():
    controller = make(num_layers=2, num_experts=2, dynamics="loss_free")
    controller.observe(0, ids(0, 1, 1), mask=torch.tensor([True, True, False]))  # loads [1, 1]
    controller.observe(1, ids(1, 1))  # loads [0, 2]
    controller.step()
    close(controller.pressure, [[0.0, 0.0], [0.001, -0.001]], rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", ["pressure", "pt"])
def test_loss_free_bias_is_returned_by_selection_bias_and_never_added_to_the_logits(mode):
    controller = make(num_experts=4, dynamics="loss_free", mode=mode, update_every=1)
    for _ in range(6):
        controller.observe(0, ids(0, 0, 0, 1))
        controller.step()
    bias = controller.selection_bias(0)
    close(bias, controller.pressure[0], rtol=0, atol=0)
    close(bias, [-0.006, 0.0, 0.006, 0.006], rtol=0, atol=1e-8)
    logits = torch.randn(5, 4)
    assert torch.equal(controller.modulate(0, logits), logits)


@pytest.mark.parametrize("preset", ["reference", "paper", "delayed"])
@pytest.mark.parametrize("mode", MODES)
def test_selection_bias_is_none_for_other_presets(preset, mode):
    controller = make(dynamics=preset, mode=mode, update_every=1)
    run_ticks(controller, 2)
    assert controller.selection_bias(0) is None


# --------------------------------------------------------------------------- paper preset
def test_paper_geology_is_an_ema_toward_one_plus_tanh_of_the_share_excess():
    # N = 2, κ = 10, η = 0.5, usage ema. tick 1: counts [2, 0] -> U = [0.1, 0], u = [1, 0]
    controller = make(num_experts=2, dynamics="paper", usage="ema", eta=0.5, update_every=1, paper_kappa=10.0)
    controller.observe(0, ids(0, 0))
    controller.step()
    first = [0.5 * 1 + 0.5 * (1 + math.tanh(10 * (1 - 0.5))), 0.5 * 1 + 0.5 * (1 + math.tanh(10 * (0 - 0.5)))]
    close(controller.T_bar_local, [first])
    close(controller.temperature, [first])
    close(controller.pressure, [[-0.5, 0.5]])  # P = 0.5, b_raw = clip(2(1/2 - u)) = [-1, 1]
    # tick 2: counts [0, 2] -> U = [0.095, 0.1], u = [0.095/0.195, 0.1/0.195]
    controller.observe(0, ids(1, 1))
    controller.step()
    u = [0.095 / 0.195, 0.1 / 0.195]
    second = [0.5 * first[k] + 0.5 * (1 + math.tanh(10 * (u[k] - 0.5))) for k in range(2)]
    close(controller.T_bar_local, [second])
    close(controller.pressure, [[0.5 * 2 * (0.5 - u[0]), 0.5 * 2 * (0.5 - u[1])]])


def test_paper_coupling_divide_versus_bias():
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    outputs = {}
    for coupling in ("divide", "bias"):
        controller = make(num_experts=2, dynamics="paper", usage="ema", eta=0.5, update_every=1,
                          paper_coupling=coupling)
        controller.observe(0, ids(0, 0))
        controller.step()
        b, T = controller.pressure[0], controller.T_bar_local[0]
        outputs[coupling] = (controller.modulate(0, logits), b, T)
    z, b, T = outputs["divide"]
    close(z, (logits + b) / T)
    z, b, T = outputs["bias"]
    close(z, logits + b / T)
    assert not torch.allclose(outputs["divide"][0], outputs["bias"][0])


def test_paper_without_usage_keeps_temperature_at_one():
    controller = make(num_experts=3, dynamics="paper", usage="ema", eta=0.5, update_every=1)
    controller.step()
    close(controller.T_bar_local, [[1.0] * 3], rtol=0, atol=0)
    close(controller.pressure, [[0.0] * 3], rtol=0, atol=0)


# --------------------------------------------------------------------------- learnable offsets
def test_learnable_offsets_are_zero_initialised_parameters_and_the_only_trainable_tensors():
    controller = make(num_layers=3, num_experts=5, top_k=2, learnable=True)
    parameters = dict(controller.named_parameters())
    assert set(parameters) == {"pressure_offset", "log_temperature_offset"}
    for parameter in parameters.values():
        assert isinstance(parameter, torch.nn.Parameter) and parameter.requires_grad
        assert parameter.shape == (3, 5) and torch.equal(parameter.detach(), torch.zeros(3, 5))
    assert not any(buffer.requires_grad for buffer in controller.buffers())
    assert list(make(learnable=False).parameters()) == []


def test_pressure_offset_enters_mean_removed():
    controller = make(num_experts=4, learnable=True, mode="pressure")
    logits = torch.randn(3, 4)
    offset = torch.tensor([0.4, -0.2, 0.1, 0.5])
    with torch.no_grad():
        controller.pressure_offset[0] = offset
    z = controller.modulate(0, logits)
    close(z, logits + (offset - offset.mean()))
    with torch.no_grad():
        controller.pressure_offset[0] += 7.0  # a uniform shift changes nothing
    close(controller.modulate(0, logits), z)


def test_log_temperature_offset_multiplies_the_temperature():
    controller = make(num_experts=4, learnable=True, mode="temperature")
    logits = torch.randn(3, 4)
    with torch.no_grad():
        controller.log_temperature_offset[0] = torch.log(torch.tensor([2.0, 1.0, 0.5, 4.0]))
    close(controller.modulate(0, logits), logits / torch.tensor([2.0, 1.0, 0.5, 4.0]))


def test_a_loss_on_modulated_logits_trains_both_offsets_and_the_pressure_gradient_sums_to_zero():
    controller = make(num_layers=2, num_experts=4, top_k=2, learnable=True, update_every=1)
    run_ticks(controller, 3)
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(12, 4, generator=generator)
    target = torch.randint(0, 4, (12,), generator=generator)
    loss = F.cross_entropy(controller.modulate(1, logits), target)
    loss.backward()
    pressure_grad = controller.pressure_offset.grad
    temperature_grad = controller.log_temperature_offset.grad
    assert pressure_grad[1].abs().sum() > 1e-4 and temperature_grad[1].abs().sum() > 1e-4
    assert torch.equal(pressure_grad[0], torch.zeros(4)) and torch.equal(temperature_grad[0], torch.zeros(4))
    close(pressure_grad.sum(dim=1), [0.0, 0.0], rtol=0, atol=1e-7)


def test_offsets_follow_the_mode():
    for mode, pressure_active, temperature_active in (("pressure", True, False), ("temperature", False, True),
                                                      ("pt", True, True)):
        controller = make(num_experts=3, learnable=True, mode=mode)
        with torch.no_grad():
            controller.pressure_offset[0] = torch.tensor([1.0, 0.0, -1.0])
            controller.log_temperature_offset[0] = math.log(2.0)
        logits = torch.tensor([[1.0, 2.0, 3.0]])
        bias = torch.tensor([1.0, 0.0, -1.0]) if pressure_active else torch.zeros(3)
        close(controller.modulate(0, logits), (logits + bias) / (2.0 if temperature_active else 1.0))


# --------------------------------------------------------------------------- dtype / device
def test_float64_logits_return_float64():
    controller = _moved("pt")
    logits = torch.randn(5, 4, dtype=torch.float64)
    z = controller.modulate(0, logits)
    assert z.dtype == torch.float64
    close(z, (logits + controller.pressure[0].double()) / controller.temperature[0].double(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_logits_return_float32(dtype):
    controller = _moved("pt")
    logits = torch.randn(5, 4).to(dtype)
    z = controller.modulate(0, logits)
    assert z.dtype == torch.float32 and z.device == logits.device
    close(z, (logits.float() + controller.pressure[0]) / controller.temperature[0], rtol=0, atol=0)


def test_layer_index_is_checked():
    controller = make(num_layers=2)
    with pytest.raises(IndexError):
        controller.modulate(2, torch.zeros(1, 4))
    with pytest.raises(IndexError):
        controller.observe(-1, ids(0))


# --------------------------------------------------------------------------- guard: no host sync
_BANNED_TENSOR_METHODS = ("item", "cpu", "tolist", "numpy", "nonzero", "bincount", "__bool__", "__float__",
                          "__int__")

_GUARD_CONFIGS = [
    dict(dynamics=preset, mode=mode, learnable=learnable, usage=usage)
    for preset, mode, learnable, usage in itertools.product(PRESETS, MODES, (False, True), ("cumulative", "ema"))
    if not (preset == "loss_free" and mode == "temperature") and not (preset == "paper" and usage == "cumulative")
] + [dict(dynamics="paper", usage="ema", paper_coupling="bias", learnable=True)]


def _run_without_host_reads(controller: PTController, monkeypatch, per_group_losses: bool = False) -> None:
    """20 ticks of modulate / selection_bias / record_selection (the hooks' observe) / step with every
    host-reading call patched to raise."""
    C = controller.num_groups
    generator = torch.Generator().manual_seed(0)
    batches = [random_routing(generator, 4 * C, controller.num_experts, controller.top_k) for _ in range(40)]
    masks = [torch.rand(4 * C, generator=generator) > 0.2 for _ in range(20)]
    shape = (C,) if per_group_losses else ()
    losses = [torch.full(shape, 3.0 - 0.1 * t, requires_grad=True) * 1.0 for t in range(20)]

    def banned(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host sync: {name} called in the controller's hot path")
        return fail

    with monkeypatch.context() as patch:
        for name in _BANNED_TENSOR_METHODS:
            patch.setattr(torch.Tensor, name, banned(f"Tensor.{name}"))
        patch.setattr(torch, "nonzero", banned("torch.nonzero"))
        patch.setattr(torch, "bincount", banned("torch.bincount"))
        for t in range(20):
            for layer in range(controller.num_layers):
                logits, index, weights = batches[2 * t + layer]
                z = controller.modulate(layer, logits)
                if z.requires_grad:  # learnable offsets (mode off returns the logits untouched)
                    z.sum().backward()
                controller.selection_bias(layer, num_tokens=4 * C if controller.stacked else None)
                controller.record_selection(layer, index, weights, mask=masks[t])
            controller.step(loss=losses[t] if t % 4 else None)
    assert controller.ticks == 20
    assert_all_finite(controller)


@pytest.mark.parametrize("config", _GUARD_CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_observe_step_and_modulate_never_read_tensors_back_to_the_host(config, monkeypatch):
    controller = make(num_layers=2, num_experts=6, top_k=2, update_every=3, credit_window=2, **config)
    _run_without_host_reads(controller, monkeypatch)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_stacked_controller_never_reads_tensors_back_to_the_host(preset, monkeypatch):
    modes = ("off", "pressure", "pt") if preset == "loss_free" else ("off", "temperature", "pt")
    configs = [preset_config(dynamics=preset, mode=mode, eta=0.1 * (i + 1), seed=i, update_every=3, credit_window=2)
               for i, mode in enumerate(modes)]
    _run_without_host_reads(PTController(2, 6, 2, configs), monkeypatch, per_group_losses=True)


# --------------------------------------------------------------------------- import hygiene
def test_importing_the_controllers_does_not_import_transformers():
    code = ("import sys, chronovisor.controllers, chronovisor; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'; "
            "assert chronovisor.PTConfig is chronovisor.controllers.PTConfig")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert chronovisor.PTController is PTController


# --------------------------------------------------------------------------- stacked configurations
def _stacked_and_singles(dynamics="reference", **shared):
    configs = [PTConfig(dynamics=dynamics, eta=0.3, pressure_scale=0.5, mode="pt", seed=1, update_every=2, **shared),
               PTConfig(dynamics=dynamics, eta=0.1, pressure_scale=1.0, mode="pressure", seed=2, update_every=2,
                        **shared)]
    if dynamics != "loss_free":
        configs.append(PTConfig(dynamics=dynamics, eta=0.7, pressure_scale=0.2, mode="temperature", seed=3,
                                update_every=2, **shared))
    stacked = PTController(2, 5, 2, configs)
    singles = [PTController(2, 5, 2, config) for config in configs]
    return stacked, singles


@pytest.mark.parametrize("preset", PRESETS)
def test_a_stacked_controller_steers_each_block_of_tokens_like_its_own_single_controller(preset):
    stacked, singles = _stacked_and_singles(preset, usage="ema")
    C, n = len(singles), 4
    generator = torch.Generator().manual_seed(5)
    for t in range(9):
        for layer in range(2):
            logits = torch.randn(C * n, 5, generator=generator)
            z = stacked.modulate(layer, logits)
            assert z.shape == logits.shape
            blocks = [single.modulate(layer, logits[c * n:(c + 1) * n]) for c, single in enumerate(singles)]
            close(z, torch.cat(blocks), rtol=1e-6, atol=1e-7)
            weights, index = torch.softmax(z, -1).topk(2, dim=-1)
            mask = torch.rand(C * n, generator=generator) > 0.25
            stacked.observe(layer, index, weights, mask=mask)
            for c, single in enumerate(singles):
                rows = slice(c * n, (c + 1) * n)
                single.observe(layer, index[rows], weights[rows], mask=mask[rows])
        losses = torch.tensor([5.0 - 0.3 * t * (c + 1) for c in range(C)])
        stacked.step(loss=losses)
        for single, loss in zip(singles, losses, strict=True):
            single.step(loss=loss)
    for name, value in all_fields(stacked).items():
        close(value, torch.stack([all_fields(single)[name] for single in singles]), rtol=1e-6, atol=1e-7)


def test_stacked_selection_bias_repeats_each_group_bias_over_its_block():
    stacked, singles = _stacked_and_singles("loss_free")
    run_ticks(stacked, 3, tokens=4)
    bias = stacked.selection_bias(1, num_tokens=6)
    assert bias.shape == (6, 5)
    close(bias[:3], stacked.pressure[0, 1].expand(3, 5), rtol=0, atol=0)
    close(bias[3:], stacked.pressure[1, 1].expand(3, 5), rtol=0, atol=0)


@pytest.mark.parametrize(("field", "changes"), [("dynamics", dict(dynamics="paper", usage="ema")), ("usage", dict(usage="ema")),
                                                ("update_every", dict(update_every=7))])
def test_stacked_configs_may_differ_only_in_per_group_fields(field, changes):
    with pytest.raises(ValueError, match=field):
        PTController(1, 4, 1, [PTConfig(), PTConfig(**changes)])


def test_stacked_controller_rejects_learnable_offsets_and_uneven_batches():
    with pytest.raises(ValueError, match="learnable"):
        PTController(1, 4, 1, [PTConfig(learnable=True), PTConfig(learnable=True)])
    stacked = PTController(1, 4, 1, [PTConfig(), PTConfig(eta=0.1)])
    with pytest.raises(ValueError, match="equal groups"):
        stacked.modulate(0, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="equal groups"):
        stacked.observe(0, ids(0, 1, 2))


def test_stacked_save_then_load_round_trips_exactly(tmp_path):
    stacked, _ = _stacked_and_singles("delayed")
    run_ticks(stacked, 7, tokens=6, loss=lambda t: 3.0 - 0.1 * t)
    stacked.save(tmp_path)
    loaded = PTController.load(tmp_path)
    assert loaded.stacked and loaded.configs == stacked.configs
    _assert_same_state(stacked, loaded)
    with pytest.raises(ValueError, match="group"):
        make(num_layers=2, num_experts=5, top_k=2, dynamics="delayed").load_state(tmp_path)
