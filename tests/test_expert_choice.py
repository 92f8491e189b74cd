"""The Expert Choice model, its causal inference mode, its family adapter and what P×T means on it.

Every model is a real ``ExpertChoiceForCausalLM`` built from config (the ``expertchoice-*`` toy
presets), saved with safetensors and loaded back through the transformers Auto classes; the
ground truth is the unwrapped model's own router outputs, captured by a plain forward hook.
docs/expert_choice.md states the semantics these tests check.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModelForCausalLM

from chronovisor.cli import main
from chronovisor.controllers import PTConfig, PTController
from chronovisor.expert_choice import (
    ExpertChoiceConfig,
    ExpertChoiceForCausalLM,
    expert_capacity,
    expert_choice_routing,
)
from chronovisor.wrappers import WrapperError, attach, build_toy, describe, toy_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH, SEQ, REAL_IN_ROW_1 = 2, 16, 11
E, CAPACITY = 8, 4                       # tiny preset: 8 experts, c = 2 -> C = ceil(2 * 16 / 8) = 4


def _inputs(seed: int = 1234) -> dict[str, torch.Tensor]:
    """Two sequences of 16 tokens, the second right-padded after 11 real tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 1000, (BATCH, SEQ), generator=generator)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, REAL_IN_ROW_1:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _forward(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, output_router_logits=True, **kwargs)


def _controller(info, **config) -> PTController:
    return PTController(info.num_layers, info.num_experts, info.top_k, PTConfig(**config))


def _trained_thresholds(model: ExpertChoiceForCausalLM, steps: int = 3) -> None:
    """A few capacity-routed training forwards (no optimiser): the thresholds take real values."""
    model.train()
    with torch.no_grad():
        for step in range(steps):
            model(**_inputs(seed=step))
    model.eval()


class Reloaded:
    """The tiny Expert Choice model after save_pretrained -> AutoModelForCausalLM.from_pretrained,
    with the thresholds of a few training forwards, plus its own routing on fixed inputs."""

    def __init__(self, directory):
        built = build_toy("expertchoice-tiny", seed=0)
        _trained_thresholds(built)
        built.save_pretrained(directory)
        assert (directory / "model.safetensors").is_file()
        self.built = built
        self.model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
        self.directory = directory
        self.info = describe(self.model)
        self.inputs = _inputs()
        self.mask = self.inputs["attention_mask"].reshape(-1).bool()              # [tokens]
        self.base, self.outputs = self.run(self.model)

    def routers(self, model=None):
        model = model or self.model
        return [model.get_submodule(path) for path in self.info.router_paths]

    def run(self, model, inputs=None):
        """One forward; returns (output, per layer the router's (logits, combine, dispatch) as the experts got it)."""
        captured: list[tuple] = []
        handles = [router.register_forward_hook(lambda m, a, o: captured.append(o)) for router in self.routers(model)]
        try:
            out = _forward(model, inputs or self.inputs)
        finally:
            for handle in handles:
                handle.remove()
        return out, captured


@pytest.fixture(scope="module")
def tiny(one_torch_thread, tmp_path_factory) -> Reloaded:
    return Reloaded(tmp_path_factory.mktemp("expertchoice-tiny"))


# ================================================================ 1. the model
def test_save_pretrained_writes_safetensors_and_the_auto_classes_load_the_same_model(tiny):
    assert type(AutoConfig.from_pretrained(tiny.directory)) is ExpertChoiceConfig
    assert type(tiny.model) is ExpertChoiceForCausalLM
    for (name, ours), theirs in zip(tiny.built.state_dict().items(), tiny.model.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    # Same routing exactly; logits to float rounding (safetensors' mmapped weights sit at another
    # alignment, and the CPU GEMM then accumulates in another order).
    built, built_outputs = tiny.run(tiny.built.eval())
    for ours, theirs in zip(built_outputs, tiny.outputs, strict=True):
        assert torch.equal(ours[2], theirs[2])
    torch.testing.assert_close(built.logits, tiny.base.logits, rtol=1e-5, atol=1e-6)


def test_the_thresholds_learned_in_training_are_saved_and_loaded_with_the_weights(tiny):
    for router in tiny.routers():
        assert not torch.allclose(router.threshold, torch.full((E,), 1.0 / E))
        assert bool((router.threshold_weight > 0).all())


def test_every_expert_takes_exactly_its_capacity_of_each_full_sequence_in_capacity_routing(tiny):
    tiny.model.set_inference_routing("capacity")
    try:
        _, outputs = tiny.run(tiny.model)
    finally:
        tiny.model.set_inference_routing("threshold")
    row_1_capacity = math.ceil(2.0 * REAL_IN_ROW_1 / E)
    for _, combine, dispatch in outputs:
        per_sequence = dispatch.view(BATCH, SEQ, E).sum(1)                          # [B, E]
        assert per_sequence[0].tolist() == [CAPACITY] * E
        assert per_sequence[1].tolist() == [row_1_capacity] * E
        assert not bool(dispatch.view(BATCH, SEQ, E)[1, REAL_IN_ROW_1:].any()), "padding was taken"
        assert bool((combine[~dispatch] == 0).all()) and bool((combine[dispatch] > 0).all())


def test_capacity_routing_takes_each_experts_highest_scoring_tokens():
    logits = torch.randn(BATCH * SEQ, E, generator=torch.Generator().manual_seed(0))
    combine, dispatch = expert_choice_routing(logits, BATCH, 2.0, "capacity")
    scores = F.softmax(logits, dim=-1).view(BATCH, SEQ, E)
    for b in range(BATCH):
        for e in range(E):
            expected = set(scores[b, :, e].topk(CAPACITY).indices.tolist())
            assert set(dispatch.view(BATCH, SEQ, E)[b, :, e].nonzero().flatten().tolist()) == expected
    assert torch.equal(combine, scores.reshape(-1, E) * dispatch)


def test_the_capacity_is_c_times_n_over_e_rounded_up_and_never_more_than_n():
    assert expert_capacity(16, 2.0, 8) == 4
    assert expert_capacity(11, 2.0, 8) == 3
    assert expert_capacity(3, 8.0, 8) == 3
    assert expert_capacity(1, 2.0, 8) == 1


def test_the_sparse_block_equals_running_every_expert_densely_and_mixing_by_the_combine_weights(tiny):
    block = tiny.model.model.layers[0].mlp
    hidden = torch.randn(BATCH, SEQ, 32, generator=torch.Generator().manual_seed(3))
    token_mask = tiny.inputs["attention_mask"].bool()
    with torch.no_grad():
        sparse = block(hidden, token_mask)                                        # [B, S, H]
        _, combine, dispatch = block.gate(hidden, token_mask)
        flat = hidden.reshape(-1, 32)
        gate, up = torch.einsum("nh,eih->eni", flat, block.experts.gate_up_proj).chunk(2, dim=-1)
        every = torch.einsum("eni,ehi->enh", F.silu(gate) * up, block.experts.down_proj)   # [E, n, H]
        dense = torch.einsum("ne,enh->nh", combine, every).view(BATCH, SEQ, 32)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    untaken = ~dispatch.any(-1)
    assert bool(untaken.any()), "threshold routing should leave some token to the residual"
    assert bool((sparse.reshape(-1, 32)[untaken] == 0).all()), "a token no expert took gets no expert output"


def test_the_router_gets_gradient_through_the_combine_weights_in_training():
    model = build_toy("expertchoice-tiny", seed=0).train()
    inputs = _inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for layer in model.model.layers:
        gradient = layer.mlp.gate.weight.grad
        assert gradient is not None and bool(torch.isfinite(gradient).all()) and float(gradient.abs().sum()) > 0


def test_the_presets_have_the_plans_sizes():
    for name, layers, experts in (("expertchoice-2l8e", 2, 8), ("expertchoice-4l16e", 4, 16), ("expertchoice-tiny", 2, 8)):
        config = toy_config(name)
        assert (config.num_hidden_layers, config.num_local_experts, config.capacity_factor) == (layers, experts, 2.0)
        assert config.hidden_size == (32 if name.endswith("tiny") else 256)
    big = toy_config("expertchoice-2l8e")
    assert (big.intermediate_size, big.num_attention_heads, big.num_key_value_heads, big.vocab_size) == (1024, 8, 4, 1000)


def test_a_config_with_an_unknown_inference_routing_is_refused():
    with pytest.raises(StrictDataclassClassValidationError, match="inference_routing must be one of .*'lookahead'"):
        ExpertChoiceConfig(inference_routing="lookahead")
    with pytest.raises(StrictDataclassClassValidationError, match="capacity_factor"):
        ExpertChoiceConfig(num_local_experts=4, capacity_factor=5.0)


# ========================================================= 2. causality, measured
def _changed_future(tiny, position: int) -> tuple[tuple, tuple]:
    """(logits, per-layer dispatch masks) of one sequence, and of it with every token after
    ``position`` replaced."""
    generator = torch.Generator().manual_seed(11)
    first = torch.randint(3, 1000, (1, SEQ), generator=generator)
    second = first.clone()
    second[0, position + 1:] = torch.randint(3, 1000, (SEQ - position - 1,), generator=generator)
    runs = [tiny.run(tiny.model, {"input_ids": ids}) for ids in (first, second)]
    return tuple((out.logits[0], [dispatch for _, _, dispatch in outputs]) for out, outputs in runs)


def test_in_threshold_routing_the_logits_at_position_t_do_not_change_when_later_tokens_change(tiny):
    """The routing of positions <= t is identical bit for bit, and so are their logits up to the
    float rounding of expert GEMMs over other token counts (1e-6; the capacity leak below is ~1e-2)."""
    assert tiny.routers()[0].routing == "threshold"
    for position in (0, 5, SEQ - 2):
        (first, first_dispatch), (second, second_dispatch) = _changed_future(tiny, position)
        for ours, theirs in zip(first_dispatch, second_dispatch, strict=True):
            assert torch.equal(ours[: position + 1], theirs[: position + 1]), f"routing at <= {position} leaked"
        torch.testing.assert_close(first[: position + 1], second[: position + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(first[position + 1:], second[position + 1:], rtol=0, atol=1e-3)


def test_in_capacity_routing_later_tokens_change_the_routing_and_logits_of_earlier_positions(tiny):
    """The leak threshold routing removes is real: the same check fails under the training choice."""
    tiny.model.set_inference_routing("capacity")
    try:
        changes = [_changed_future(tiny, position) for position in (5, 8, 10)]
    finally:
        tiny.model.set_inference_routing("threshold")
    leaked_routing = [any(not torch.equal(a[: p + 1], b[: p + 1]) for a, b in zip(first[1], second[1], strict=True))
                      for p, (first, second) in zip((5, 8, 10), changes, strict=True)]
    leaked_logits = [float((first[0][: p + 1] - second[0][: p + 1]).abs().max())
                     for p, (first, second) in zip((5, 8, 10), changes, strict=True)]
    assert any(leaked_routing) and max(leaked_logits) > 1e-3


def test_threshold_routing_through_the_kv_cache_gives_the_full_forwards_logits(tiny):
    ids = tiny.inputs["input_ids"][:1]
    with torch.no_grad():
        full = tiny.model(input_ids=ids).logits
        head = tiny.model(input_ids=ids[:, :9], use_cache=True)
        tail = tiny.model(input_ids=ids[:, 9:], cache=head.cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([head.logits, tail], dim=1), full, rtol=1e-5, atol=1e-5)


def test_one_training_step_sets_each_threshold_to_the_mean_over_sequences_of_its_lowest_taken_score():
    model = build_toy("expertchoice-tiny", seed=0)
    inputs = _inputs()
    captured: list[tuple] = []
    router = model.model.layers[0].mlp.gate
    router.register_forward_hook(lambda m, a, o: captured.append(o))
    model.train()
    with torch.no_grad():
        model(**inputs)
    logits, _, dispatch = captured[0]
    scores = F.softmax(logits.float(), dim=-1).view(BATCH, SEQ, E)
    lowest = scores.masked_fill(~dispatch.view(BATCH, SEQ, E), math.inf).amin(1)      # [B, E]
    torch.testing.assert_close(router.threshold, lowest.mean(0))                     # bias-corrected first step
    torch.testing.assert_close(router.threshold_weight, torch.full((E,), 1 - 0.99))


def test_activation_checkpointing_moves_the_thresholds_once_per_training_step():
    plain, checkpointed = (build_toy("expertchoice-tiny", seed=0).train() for _ in range(2))
    checkpointed.activation_checkpointing_enable()
    inputs = _inputs()
    for model in (plain, checkpointed):
        model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
    for ours, theirs in zip(plain.model.layers, checkpointed.model.layers, strict=True):
        assert torch.equal(ours.mlp.gate.threshold_weight, theirs.mlp.gate.threshold_weight)
        torch.testing.assert_close(ours.mlp.gate.threshold, theirs.mlp.gate.threshold)


def test_set_inference_routing_switches_every_router_and_refuses_an_unknown_rule():
    model = build_toy("expertchoice-tiny", seed=0)
    model.set_inference_routing("capacity")
    assert model.config.inference_routing == "capacity"
    assert {layer.mlp.gate.routing for layer in model.model.layers} == {"capacity"}
    with pytest.raises(ValueError, match="inference_routing must be one of"):
        model.set_inference_routing("oracle")


# ================================================================ 4. the adapter
def test_describe_finds_both_routers_with_the_nominal_top_k_of_the_capacity_factor(tiny):
    info = tiny.info
    assert (info.family, info.num_layers, info.num_experts, info.top_k) == ("expert_choice", 2, E, 2)
    assert info.router_paths == ("model.layers.0.mlp.gate", "model.layers.1.mlp.gate")
    assert info.router_class == "ExpertChoiceRouter" and not info.supports_selection_bias


def test_chronovisor_inspect_describes_the_expert_choice_preset(capsys):
    assert main(["inspect", "expertchoice-2l8e"]) == 0
    out = capsys.readouterr().out
    assert "ExpertChoiceForCausalLM" in out and "family:     expert_choice" in out
    assert "2 x ExpertChoiceRouter, 8 experts, top-2" in out and "each expert takes tokens" in out


@pytest.mark.parametrize("mode", ["off", "pt"])
@pytest.mark.parametrize("routing", ["threshold", "capacity"])
def test_identity_is_bit_exact_in_both_routings(tiny, mode, routing):
    """mode off, and pt at b = 0, T = 1 (ticks 1-4 of update_every=5), equal the unwrapped model exactly."""
    tiny.model.set_inference_routing(routing)
    base, base_outputs = tiny.run(tiny.model)
    controller = _controller(tiny.info, mode=mode, update_every=5)
    attachment = attach(tiny.model, controller)
    try:
        for _ in range(4):
            out, outputs = tiny.run(tiny.model)
            assert torch.equal(out.logits, base.logits)
            for ours, theirs in zip(outputs, base_outputs, strict=True):
                assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
            controller.step()
    finally:
        attachment.remove()
        tiny.model.set_inference_routing("threshold")


def test_identity_is_bit_exact_in_bfloat16():
    model = build_toy("expertchoice-tiny", seed=3)
    _trained_thresholds(model)
    model = model.to(torch.bfloat16)
    inputs = _inputs()
    base = _forward(model, inputs)
    attachment = attach(model, _controller(describe(model), mode="pt"))
    out = _forward(model, inputs)
    attachment.remove()
    assert torch.equal(out.logits, base.logits)


def test_usage_counts_the_tokens_each_expert_processed_and_excludes_padding(tiny):
    """After one tick (usage="cumulative") usage is the column sums of the model's own dispatch mask."""
    controller = _controller(tiny.info, usage="cumulative")
    attachment = attach(tiny.model, controller)
    try:
        _forward(tiny.model, tiny.inputs)
        controller.step()
    finally:
        attachment.remove()
    expected = torch.stack([dispatch.float().sum(0) for _, _, dispatch in tiny.outputs])          # [L, E]
    assert torch.equal(controller.usage, expected)
    for _, _, dispatch in tiny.outputs:
        assert not bool(dispatch[~tiny.mask].any())


def test_the_recorder_keeps_each_tokens_taken_experts_first_in_a_fixed_width(tiny):
    attachment = attach(tiny.model, _controller(tiny.info))
    try:
        with attachment.record_routing() as recorder:
            _forward(tiny.model, tiny.inputs)
    finally:
        attachment.remove()
    for layer, (_, combine, dispatch) in enumerate(tiny.outputs):
        ids = recorder.layer_expert_index(layer)                                   # [tokens, 2]
        kept = recorder.dispatched[layer][0]                                       # [tokens, 2]
        assert ids.shape == (BATCH * SEQ, 2)
        assert torch.equal(kept, dispatch.gather(-1, ids))
        taken = dispatch.sum(-1)
        assert torch.equal(kept.sum(-1), taken.clamp(max=2))                       # taken experts fill the slots first
        assert bool((kept[:, 0] >= kept[:, 1]).all())
        assert torch.equal(recorder.weights[layer][0], combine.gather(-1, ids))


def test_a_loss_free_controller_is_refused_because_expert_choice_has_no_choice_only_bias(tiny):
    with pytest.raises(WrapperError, match="loss_free"):
        attach(tiny.model, PTController(2, E, 2, PTConfig(dynamics="loss_free")))


def test_observe_with_an_all_true_dispatch_mask_counts_exactly_as_without_one():
    ids = torch.randint(0, E, (10, 2), generator=torch.Generator().manual_seed(0))
    weights = torch.rand(10, 2, generator=torch.Generator().manual_seed(1))
    plain, masked = (PTController(1, E, 2, PTConfig(usage="cumulative")) for _ in range(2))
    plain.observe(0, ids, weights)
    masked.observe(0, ids, weights, dispatched=torch.ones(10, 2, dtype=torch.bool))
    for controller in (plain, masked):
        controller.step()
    assert torch.equal(plain.usage, masked.usage) and torch.equal(plain.phases, masked.phases)


def test_observe_counts_only_the_dispatched_pairs_of_a_dispatch_mask():
    dispatch = torch.zeros(6, E, dtype=torch.bool)
    dispatch[:, 2] = True
    dispatch[0, 5] = True
    controller = PTController(1, E, 2, PTConfig(usage="cumulative"))
    controller.observe(0, torch.arange(E).expand(6, E), torch.full((6, E), 0.5), dispatched=dispatch)
    controller.step()
    expected = torch.zeros(1, E)
    expected[0, 2], expected[0, 5] = 6.0, 1.0
    assert torch.equal(controller.usage, expected)


def test_observe_refuses_a_dispatch_mask_of_another_shape():
    controller = PTController(1, E, 2)
    with pytest.raises(ValueError, match="dispatched must have shape"):
        controller.observe(0, torch.zeros(4, 2, dtype=torch.long), dispatched=torch.ones(4, 3, dtype=torch.bool))


# ============================================================= 3. P×T semantics
def _pressure(info, expert: int, value: float, mode: str = "pressure") -> PTController:
    """A controller whose delivered pressure is ``value`` on ``expert`` in every layer."""
    controller = _controller(info, mode=mode)
    state = controller.state_dict()
    pressure = torch.zeros(state["_pressure"].shape)                             # [1, L, E]
    pressure[..., expert] = value
    state["_pressure"] = pressure
    controller.load_state_dict(state)
    return controller


def _tokens_per_expert(tiny, controller) -> torch.Tensor:
    """``[L, E]`` tokens each expert processed on the fixed inputs, steered by ``controller``."""
    attachment = attach(tiny.model, controller)
    try:
        _, outputs = tiny.run(tiny.model)
    finally:
        attachment.remove()
    return torch.stack([dispatch.sum(0) for _, _, dispatch in outputs])


def test_positive_pressure_on_an_expert_raises_the_tokens_it_processes_in_threshold_routing(tiny):
    base = torch.stack([dispatch.sum(0) for _, _, dispatch in tiny.outputs])
    counts = {b: _tokens_per_expert(tiny, _pressure(tiny.info, 3, b)) for b in (-1.0, 0.5, 1.0, 2.0)}
    assert bool((counts[0.5][:, 3] >= base[:, 3]).all()) and bool((counts[2.0][:, 3] > base[:, 3]).all())
    assert bool((counts[1.0][:, 3] <= counts[2.0][:, 3]).all())
    assert bool((counts[-1.0][:, 3] < base[:, 3]).all())
    others = [e for e in range(E) if e != 3]
    assert bool((counts[2.0][:, others] <= base[:, others]).all()), "the others' scores fall as S[:, 3] rises"


def test_pressure_changes_no_experts_token_count_in_capacity_routing(tiny):
    tiny.model.set_inference_routing("capacity")
    try:
        base = _tokens_per_expert(tiny, _controller(tiny.info, mode="off"))
        steered = _tokens_per_expert(tiny, _pressure(tiny.info, 3, 2.0))
    finally:
        tiny.model.set_inference_routing("threshold")
    assert torch.equal(steered, base)
    assert torch.equal(base, torch.full_like(base, CAPACITY + math.ceil(2.0 * REAL_IN_ROW_1 / E)))


def test_in_capacity_routing_an_experts_own_pressure_keeps_its_tokens_and_raises_its_weights():
    """S[t, e] is increasing in b_e for every t alike, so e's ranking of the tokens is unchanged."""
    logits = torch.randn(BATCH * SEQ, E, generator=torch.Generator().manual_seed(4))
    bias = torch.zeros(E)
    bias[3] = 1.5
    combine, dispatch = expert_choice_routing(logits, BATCH, 2.0, "capacity")
    steered_combine, steered_dispatch = expert_choice_routing(logits + bias, BATCH, 2.0, "capacity")
    assert torch.equal(steered_dispatch[:, 3], dispatch[:, 3])
    assert bool((steered_combine[dispatch[:, 3], 3] > combine[dispatch[:, 3], 3]).all())
    assert not torch.equal(steered_dispatch, dispatch), "other experts move away from expert 3's tokens"


def _modulated(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """z = ℓ / T through a real controller whose delivered temperature is ``temperature [E]``."""
    controller = PTController(1, E, 2, PTConfig(mode="temperature"))
    state = controller.state_dict()
    state["_effective_temperature"] = temperature.reshape(1, 1, E).clone()
    controller.load_state_dict(state)
    return controller.modulate(0, logits)


def _agreement_with_own_ranking(logits: torch.Tensor, dispatch: torch.Tensor, expert: int) -> float:
    """Share of the tokens ``expert`` took per sequence that are among its C highest own logits."""
    own = logits[:, expert].view(-1, SEQ)
    taken = dispatch[:, expert].view(-1, SEQ)
    top = torch.zeros_like(taken).scatter_(-1, own.topk(CAPACITY, dim=-1).indices, True)
    return float((taken & top).sum() / taken.sum())


def test_a_cold_expert_takes_the_tokens_its_own_logits_rank_highest_and_a_hot_one_takes_leftovers():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(64 * SEQ, E, generator=generator) * 2.0                    # 64 sequences
    agreement = {}
    for value in (0.25, 1.0, 4.0):
        temperature = torch.ones(E)
        temperature[3] = value
        _, dispatch = expert_choice_routing(_modulated(logits, temperature), 64, 2.0, "capacity")
        agreement[value] = _agreement_with_own_ranking(logits, dispatch, 3)
    assert agreement[0.25] > agreement[1.0] > agreement[4.0]


def test_a_uniform_temperature_above_one_flattens_every_tokens_affinities():
    logits = torch.randn(BATCH * SEQ, E, generator=torch.Generator().manual_seed(6)) * 2.0
    entropy = {}
    for value in (0.5, 1.0, 2.0):
        scores = F.softmax(_modulated(logits, torch.full((E,), value)), dim=-1)
        entropy[value] = -(scores * scores.log()).sum(-1)                           # [tokens]
    assert bool((entropy[0.5] < entropy[1.0]).all()) and bool((entropy[1.0] < entropy[2.0]).all())


def test_a_hot_expert_in_threshold_routing_takes_tokens_by_the_other_experts_logits(tiny):
    """T_e -> large makes z[:, e] ~ 0: S[t, e] = 1 / (1 + Σ_j exp(z_tj)) is then set by the others."""
    logits = torch.randn(BATCH * SEQ, E, generator=torch.Generator().manual_seed(7))
    temperature = torch.ones(E)
    temperature[3] = 1e6
    scores = F.softmax(_modulated(logits, temperature), dim=-1)[:, 3]
    others = torch.cat([logits[:, :3], logits[:, 4:]], dim=-1).exp().sum(-1)
    torch.testing.assert_close(scores, 1.0 / (1.0 + others), rtol=1e-4, atol=1e-6)


def test_the_fields_stay_finite_and_move_when_the_controller_runs_on_the_model(tiny):
    controller = _controller(tiny.info, mode="pt", update_every=1)
    attachment = attach(tiny.model, controller)
    try:
        for step in range(8):
            _forward(tiny.model, _inputs(seed=100 + step))
            controller.step()
    finally:
        attachment.remove()
    for field in (controller.pressure, controller.temperature, controller.usage, controller.coherence):
        assert bool(torch.isfinite(field).all())
    assert float(controller.pressure.abs().sum()) > 0, "threshold routing gives unequal usage, so pressure moves"
    assert not torch.equal(controller.temperature, torch.ones_like(controller.temperature))


# ================================================= 5. the harness: causal loss, non-causal beside it
@pytest.fixture(scope="module")
def expert_choice_run(one_torch_thread, tmp_path_factory):
    """A frozen-protocol sweep of expertchoice-tiny, 2 seeds x (off, placebo, pt), stacked as the
    study config runs it, and its report."""
    from conftest import TINY_WORLD

    from chronovisor.eval.config import parse_config
    from chronovisor.eval.pairing import load_run
    from chronovisor.eval.report import write_report
    from chronovisor.eval.sweep import run_sweep

    config = parse_config({
        "name": "expert-choice-test", "protocol": "frozen", "models": "expertchoice-tiny", "seeds": 2,
        "primary": ["pt - off"], "batch_configs": 3,
        "data": dict(TINY_WORLD, num_train=4, num_heldout=3, num_warmup=4),
        "train": {"pretrain_steps": 4, "lr": 0.01},
        "eval": {"null_permutations": 10, "trajectory_every": 1},
        "controller": {"eta": 0.015, "pressure_scale": 0.5, "update_every": 1},
        "grid": [{"mode": ["placebo", "pt"]}],
    })
    out = tmp_path_factory.mktemp("expert-choice-run")
    assert run_sweep(config, out, progress=False).complete
    return load_run(out), write_report(out).summary_path.read_text(), config


def test_every_expert_choice_cell_records_the_non_causal_loss_beside_the_causal_one(expert_choice_run):
    run, _, _ = expert_choice_run
    assert len(run.records) == 6
    for record in run.records.values():
        assert math.isfinite(record.heldout.loss) and math.isfinite(record.heldout.noncausal_loss)
        assert record.heldout.noncausal_loss != record.heldout.loss


def test_the_stacked_non_causal_loss_equals_a_single_cells(expert_choice_run, tmp_path):
    """run_cell (one arm) and the stacked run give the same causal and non-causal losses."""
    from chronovisor.eval.protocols import run_cell

    run, _, config = expert_choice_run
    record = next(r for r in run.records.values() if r.variant == "pt" and r.spec["seed"] == 0)
    spec = next(cell for cell in config.cells() if cell.cell_id == record.cell_id)
    single = run_cell(spec, tmp_path).record
    assert single.heldout.loss == pytest.approx(record.heldout.loss, rel=1e-6)
    assert single.heldout.noncausal_loss == pytest.approx(record.heldout.noncausal_loss, rel=1e-6)


def test_the_report_shows_the_causal_and_non_causal_loss_and_their_gap_per_arm(expert_choice_run):
    _, text, _ = expert_choice_run
    assert "## Expert Choice: causal vs non-causal held-out loss" in text
    section = text.split("## Expert Choice: causal vs non-causal held-out loss")[1].split("\n## ")[0]
    for arm in ("off", "placebo", "pt"):
        assert f"| frozen | expertchoice-tiny | {arm} | 2 |" in section


def test_a_token_choice_run_records_no_non_causal_loss_and_its_report_has_no_such_section(tmp_path):
    from conftest import TINY_WORLD

    from chronovisor.eval.protocols import run_cell
    from chronovisor.eval.specs import CellSpec, DataSpec, EvalSpec, TrainSpec

    spec = CellSpec("frozen", "mixtral-tiny", 0, None, DataSpec(num_train=4, num_heldout=3, num_warmup=2,
                    generator=TINY_WORLD), TrainSpec(pretrain_steps=2, lr=0.01), EvalSpec(null_permutations=10))
    assert run_cell(spec, tmp_path).record.heldout.noncausal_loss is None
