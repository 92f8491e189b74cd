"""chronovisor.wrap / ChronovisorModel: the PEFT-like surface on a real tiny Mixtral.

Every model here is a real ``MixtralForCausalLM`` built from config by the ``mixtral-tiny`` toy
preset, saved as safetensors and loaded back with ``AutoModelForCausalLM.from_pretrained`` (about
30 ms), so each test gets its own pristine copy and hooks never leak between tests.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import chronovisor
from chronovisor import ChronovisorModel, PTConfig, PTController
from chronovisor.wrappers import UnsupportedModelError, build_toy, discover

BATCH, LENGTH, TOP_K, EXPERTS, LAYERS = 2, 12, 2, 8, 2


# ----------------------------------------------------------------------------- fixtures
def load_base(directory) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory).eval()


@pytest.fixture
def base(mixtral_tiny_dir):
    return load_base(mixtral_tiny_dir)


@pytest.fixture(scope="module")
def inputs():
    """Two sequences, the second right-padded after 8 tokens."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, 1000, (BATCH, LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(scope="module")
def base_logits(mixtral_tiny_dir, inputs):
    with torch.no_grad():
        return load_base(mixtral_tiny_dir)(**inputs).logits


def logits(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def steer_towards(wrapped: ChronovisorModel, expert: int, offset: float) -> None:
    """Put a learnable pressure offset on one expert in every layer."""
    with torch.no_grad():
        wrapped.controller.pressure_offset[:, expert] = offset


# ------------------------------------------------------------------------------ identity
def test_the_saved_tiny_mixtral_is_a_safetensors_checkpoint(mixtral_tiny_dir):
    assert (mixtral_tiny_dir / "model.safetensors").is_file()


def test_wrap_with_mode_off_gives_bit_identical_logits_on_every_forward(base, inputs, base_logits):
    wrapped = chronovisor.wrap(base, PTConfig(mode="off", update_every=1))
    for _ in range(3):                       # the fields update every tick; mode off ignores them
        assert torch.equal(logits(wrapped, inputs), base_logits)


def test_wrap_with_a_fresh_pt_controller_gives_bit_identical_logits(base, inputs, base_logits):
    wrapped = chronovisor.wrap(base, PTConfig(mode="pt"))
    assert torch.equal(logits(wrapped, inputs), base_logits)


def test_wrap_leaves_the_base_weights_and_trainability_alone(base):
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    wrapped = chronovisor.wrap(base, PTConfig(learnable=True))
    assert wrapped.model is base
    assert all(p.requires_grad for p in base.parameters())
    after = base.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_wrap_builds_the_controller_with_the_models_shape(base):
    controller = chronovisor.wrap(base).controller
    assert (controller.num_layers, controller.num_experts, controller.top_k) == (LAYERS, EXPERTS, TOP_K)


def test_wrap_rejects_an_unknown_step_mode(base):
    with pytest.raises(ValueError, match="step_mode must be one of 'auto', 'manual'"):
        chronovisor.wrap(base, step_mode="sometimes")


# ---------------------------------------------------------------------------- step_mode
def test_auto_step_mode_steps_the_controller_once_per_forward(base, inputs):
    wrapped = chronovisor.wrap(base, PTConfig(), step_mode="auto")
    for expected in (1, 2, 3):
        logits(wrapped, inputs)
        assert wrapped.controller.ticks == expected


def test_manual_step_mode_never_steps_the_controller(base, inputs):
    wrapped = chronovisor.wrap(base, PTConfig(), step_mode="manual")
    logits(wrapped, inputs)
    logits(wrapped, inputs)
    assert wrapped.controller.ticks == 0
    wrapped.controller.step()
    assert wrapped.controller.ticks == 1


def test_the_step_after_a_forward_counts_every_real_token_of_it(base, inputs):
    wrapped = chronovisor.wrap(base, PTConfig(usage="cumulative"), step_mode="auto")
    logits(wrapped, inputs)
    real_tokens = int(inputs["attention_mask"].sum())
    assert torch.equal(wrapped.controller.usage.sum(dim=-1), torch.full((LAYERS,), float(TOP_K * real_tokens)))


def test_generate_works_and_steps_once_after_observing_every_decoding_step(base, inputs):
    wrapped = chronovisor.wrap(base, PTConfig(usage="cumulative"), step_mode="auto")
    prompt = inputs["input_ids"][:, :5]
    new_tokens = 4
    with torch.no_grad():
        out = wrapped.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    assert out.shape == (BATCH, 5 + new_tokens)
    assert torch.equal(out[:, :5], prompt)
    assert wrapped.controller.ticks == 1
    # one prefill call over the prompt, then one cached call per further token
    routed = BATCH * 5 + BATCH * (new_tokens - 1)
    assert torch.equal(wrapped.controller.usage.sum(dim=-1), torch.full((LAYERS,), float(TOP_K * routed)))


def test_generate_with_a_fresh_controller_matches_the_base_models_generate(mixtral_tiny_dir, inputs):
    prompt = inputs["input_ids"][:, :5]
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=4, pad_token_id=0)
    with torch.no_grad():
        expected = load_base(mixtral_tiny_dir).generate(input_ids=prompt, **kwargs)
        got = chronovisor.wrap(load_base(mixtral_tiny_dir), PTConfig()).generate(input_ids=prompt, **kwargs)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------- disable_controller
def test_disable_controller_gives_the_exact_base_outputs_while_steered(base, inputs, base_logits):
    wrapped = chronovisor.wrap(base, PTConfig(learnable=True), step_mode="manual")
    steer_towards(wrapped, expert=3, offset=5.0)
    assert not torch.equal(logits(wrapped, inputs), base_logits)       # steering is on ...
    with wrapped.disable_controller() as inner:
        assert inner is wrapped
        assert torch.equal(logits(wrapped, inputs), base_logits)        # ... and off in the block
    assert not torch.equal(logits(wrapped, inputs), base_logits)        # ... and back on after it


def test_disable_controller_neither_steps_nor_counts(base, inputs):
    wrapped = chronovisor.wrap(base, PTConfig(usage="cumulative"), step_mode="auto")
    with wrapped.disable_controller():
        logits(wrapped, inputs)
        logits(wrapped, inputs)
    assert wrapped.controller.ticks == 0
    wrapped.controller.step()                  # a tick now would fold in anything observed above
    assert torch.equal(wrapped.controller.usage, torch.zeros(LAYERS, EXPERTS))


# -------------------------------------------------------------------------- record_routing
def test_record_routing_gives_per_layer_token_by_k_expert_ids_on_the_cpu(base, inputs):
    wrapped = chronovisor.wrap(base, PTConfig(), step_mode="manual")
    with torch.no_grad(), wrapped.record_routing() as record:
        wrapped(**inputs)
    assert record.layer_names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert len(record.expert_index) == len(record.token_mask) == len(record.weights) == LAYERS
    for ids, mask, weights in zip(record.expert_index, record.token_mask, record.weights, strict=True):
        assert ids.shape == (BATCH * LENGTH, TOP_K) and ids.dtype == torch.int64 and ids.device.type == "cpu"
        assert weights.shape == (BATCH * LENGTH, TOP_K)
        assert torch.equal(mask, inputs["attention_mask"].reshape(-1).bool())
        assert bool(((ids >= 0) & (ids < EXPERTS)).all())


def test_recorded_routing_equals_the_top_k_of_output_router_logits_under_steering(base, inputs):
    wrapped = chronovisor.wrap(base, PTConfig(learnable=True), step_mode="manual")
    steer_towards(wrapped, expert=3, offset=2.0)
    with torch.no_grad(), wrapped.record_routing() as record:
        out = wrapped(**inputs, output_router_logits=True)
    with torch.no_grad(), wrapped.disable_controller(), wrapped.record_routing() as unsteered:
        wrapped(**inputs)
    for layer, router_logits in enumerate(out.router_logits):
        recomputed = torch.softmax(router_logits.float(), dim=-1).topk(TOP_K, dim=-1).indices
        assert torch.equal(recomputed, record.expert_index[layer])
    assert any(not torch.equal(a, b) for a, b in zip(record.expert_index, unsteered.expert_index, strict=True))


def test_recorded_counts_equal_the_controllers_counts(base, inputs):
    wrapped = chronovisor.wrap(base, PTConfig(usage="cumulative", learnable=True), step_mode="manual")
    steer_towards(wrapped, expert=5, offset=1.5)
    with torch.no_grad(), wrapped.record_routing() as record:
        wrapped(**inputs)
    wrapped.controller.step()
    counts = torch.zeros(LAYERS, EXPERTS)
    for layer, (ids, mask) in enumerate(zip(record.expert_index, record.token_mask, strict=True)):
        counts[layer].scatter_add_(0, ids[mask].reshape(-1), torch.ones(ids[mask].numel()))
    assert torch.equal(wrapped.controller.usage, counts)


# ----------------------------------------------------------------------------------- unwrap
def test_unwrap_removes_every_hook_and_restores_the_base_outputs(base, inputs, base_logits):
    routers = [layer.mlp.gate for layer in base.model.layers]
    wrapped = chronovisor.wrap(base, PTConfig(learnable=True), step_mode="manual")
    steer_towards(wrapped, expert=3, offset=5.0)
    assert all(len(router._forward_hooks) == 1 for router in routers)
    unwrapped = wrapped.unwrap()
    assert unwrapped is base
    assert all(len(router._forward_hooks) == 0 for router in routers)
    assert len(base._forward_hooks) == 0 and len(base._forward_pre_hooks) == 0
    assert torch.equal(logits(unwrapped, inputs), base_logits)


def test_wrapping_an_already_wrapped_model_fails_clearly(base):
    chronovisor.wrap(base)
    with pytest.raises(ValueError, match="already has a controller attached"):
        chronovisor.wrap(base)


def test_an_unwrapped_model_can_be_wrapped_again(base, inputs, base_logits):
    chronovisor.wrap(base, PTConfig()).unwrap()
    assert torch.equal(logits(chronovisor.wrap(base, PTConfig()), inputs), base_logits)


# ------------------------------------------------------------------ parameters and forwarding
def test_print_trainable_parameters_counts_only_the_offsets_when_the_base_is_frozen(base, capsys):
    base_total = sum(p.numel() for p in base.parameters())
    wrapped = chronovisor.wrap(base, PTConfig(learnable=True), freeze_base=True)
    wrapped.print_trainable_parameters()
    offsets = 2 * LAYERS * EXPERTS
    total = base_total + offsets
    expected = f"trainable params: {offsets:,} || all params: {total:,} || trainable%: {100 * offsets / total:.6f}"
    assert capsys.readouterr().out.strip() == expected
    assert wrapped.trainable_parameters() == (offsets, total)


def test_print_trainable_parameters_without_learnable_offsets(base, capsys):
    base_total = sum(p.numel() for p in base.parameters())
    wrapped = chronovisor.wrap(base, PTConfig())
    wrapped.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {base_total:,} || all params: {base_total:,} || trainable%: 100.000000")
    wrapped.freeze_base().print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: 0 || all params: {base_total:,} || trainable%: 0.000000")


def test_attributes_the_wrapper_lacks_come_from_the_hf_model(base):
    wrapped = chronovisor.wrap(base)
    assert wrapped.config is base.config
    assert wrapped.device == torch.device("cpu")
    assert wrapped.generation_config is base.generation_config
    assert wrapped.get_input_embeddings() is base.model.embed_tokens


def test_base_model_is_the_hf_backbone_as_in_transformers(base):
    wrapped = chronovisor.wrap(base)
    assert wrapped.base_model is base.base_model is base.model


def test_model_and_get_base_model_are_the_full_hf_model(base):
    wrapped = chronovisor.wrap(base)
    assert wrapped.model is base
    assert wrapped.get_base_model() is base


def test_an_attribute_neither_has_raises_attribute_error(base):
    wrapped = chronovisor.wrap(base)
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute  # noqa: B018


# ------------------------------------------------------------------------------ stacks
def test_wrap_with_stacks_builds_a_controller_of_the_chosen_stacks_only(switch_tiny):
    wrapped = chronovisor.wrap(switch_tiny, stacks=("decoder",))
    assert wrapped.controller.num_layers == 2
    assert wrapped.info.router_stacks == ("decoder", "decoder")


def test_wrap_with_an_unknown_stack_names_the_argument_and_the_valid_values(switch_tiny):
    with pytest.raises(ValueError, match=r"stacks=\('encoder', 'middle'\).*valid values: 'encoder', 'decoder'"):
        chronovisor.wrap(switch_tiny, stacks=("encoder", "middle"))


def test_from_pretrained_with_the_same_stacks_restores_a_decoder_only_controller(switch_tiny, tmp_path):
    chronovisor.wrap(switch_tiny, stacks=("decoder",)).save_pretrained(tmp_path / "ctrl")
    reloaded = ChronovisorModel.from_pretrained(build_toy("switch-tiny", seed=0), tmp_path / "ctrl",
                                                stacks=("decoder",))
    assert reloaded.info.router_stacks == ("decoder", "decoder")


def test_routers_discovered_on_another_model_are_refused(base):
    routers = discover(build_toy("mixtral-tiny", seed=0))
    with pytest.raises(ValueError, match="discovered on another model"):
        ChronovisorModel(base, PTController(LAYERS, EXPERTS, TOP_K), routers=routers)


# ------------------------------------------------------------------------------ bad models
def test_wrapping_a_model_without_moe_routers_fails_naming_the_supported_families():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(UnsupportedModelError, match="no Mixture-of-Experts router") as error:
        chronovisor.wrap(llama)
    assert isinstance(error.value, ValueError)
    assert "LlamaForCausalLM" in str(error.value)
    for family in ("mixtral", "switch_transformers", "qwen2_moe", "deepseek_v3"):
        assert family in str(error.value)


# -------------------------------------------------------------------- save / from_pretrained
def _steered_and_saved(mixtral_tiny_dir, inputs, out_dir, **config) -> ChronovisorModel:
    """A controller whose dynamic fields moved over a few ticks, then saved."""
    wrapped = chronovisor.wrap(load_base(mixtral_tiny_dir), PTConfig(update_every=1, **config), step_mode="auto")
    for _ in range(4):
        logits(wrapped, inputs)
    wrapped.step_mode = "manual"
    wrapped.save_pretrained(out_dir)
    return wrapped


def test_save_pretrained_writes_a_kilobyte_controller_and_a_json_description(mixtral_tiny_dir, inputs, tmp_path):
    wrapped = _steered_and_saved(mixtral_tiny_dir, inputs, tmp_path / "ctrl")
    files = {path.name: path.stat().st_size for path in (tmp_path / "ctrl").iterdir()}
    assert set(files) == {"controller.safetensors", "controller_config.json"}
    assert 0 < files["controller.safetensors"] < 16 * 1024
    assert sum(files.values()) < 32 * 1024
    saved = json.loads((tmp_path / "ctrl" / "controller_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(mixtral_tiny_dir)
    assert saved["family"] == "mixtral"
    assert saved["model_class"] == "MixtralForCausalLM"
    assert (saved["num_layers"], saved["num_experts"], saved["top_k"]) == (LAYERS, EXPERTS, TOP_K)
    assert saved["ticks"] == wrapped.controller.ticks == 4
    assert saved["router_paths"] == list(wrapped.info.router_paths)
    import accelerate
    import transformers
    assert saved["versions"] == {"chronovisor": chronovisor.__version__, "torch": torch.__version__,
                                 "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def test_from_pretrained_restores_the_steering_exactly(mixtral_tiny_dir, inputs, base_logits, tmp_path):
    original = _steered_and_saved(mixtral_tiny_dir, inputs, tmp_path / "ctrl")
    reloaded = ChronovisorModel.from_pretrained(load_base(mixtral_tiny_dir), tmp_path / "ctrl", step_mode="manual")
    steered = logits(original, inputs)
    assert not torch.equal(steered, base_logits)                         # the fields do steer
    assert torch.equal(logits(reloaded, inputs), steered)
    assert reloaded.controller.ticks == original.controller.ticks
    assert reloaded.controller.config == original.controller.config
    for field in ("pressure", "temperature", "usage", "T_bar_local", "T_bar_global"):
        assert torch.equal(getattr(reloaded.controller, field), getattr(original.controller, field)), field


def test_from_pretrained_freezes_learnable_offsets_unless_trainable(mixtral_tiny_dir, inputs, tmp_path):
    _steered_and_saved(mixtral_tiny_dir, inputs, tmp_path / "ctrl", learnable=True)
    frozen = ChronovisorModel.from_pretrained(load_base(mixtral_tiny_dir), tmp_path / "ctrl")
    assert not any(p.requires_grad for p in frozen.controller.parameters())
    trainable = ChronovisorModel.from_pretrained(load_base(mixtral_tiny_dir), tmp_path / "ctrl", is_trainable=True)
    assert all(p.requires_grad for p in trainable.controller.parameters())
    assert len(list(trainable.controller.parameters())) == 2


def test_from_pretrained_restores_learned_offsets(mixtral_tiny_dir, inputs, tmp_path):
    wrapped = chronovisor.wrap(load_base(mixtral_tiny_dir), PTConfig(learnable=True), step_mode="manual")
    steer_towards(wrapped, expert=6, offset=3.0)
    wrapped.save_pretrained(tmp_path / "ctrl")
    reloaded = ChronovisorModel.from_pretrained(load_base(mixtral_tiny_dir), tmp_path / "ctrl", step_mode="manual")
    assert torch.equal(reloaded.controller.pressure_offset, wrapped.controller.pressure_offset)
    assert torch.equal(logits(reloaded, inputs), logits(wrapped, inputs))


def test_from_pretrained_into_a_model_with_other_expert_count_names_num_experts(mixtral_tiny_dir, tmp_path):
    chronovisor.wrap(load_base(mixtral_tiny_dir)).save_pretrained(tmp_path / "ctrl")
    with pytest.raises(ValueError, match="num_experts=8.*num_experts=16"):
        ChronovisorModel.from_pretrained(build_toy("mixtral-tiny", num_local_experts=16), tmp_path / "ctrl")


def test_from_pretrained_into_a_model_of_another_shape_names_every_mismatch(mixtral_tiny_dir, tmp_path):
    # mixtral-tiny-16e differs from mixtral-tiny in both layers (4 vs 2) and experts (16 vs 8)
    chronovisor.wrap(load_base(mixtral_tiny_dir)).save_pretrained(tmp_path / "ctrl")
    with pytest.raises(ValueError) as error:
        ChronovisorModel.from_pretrained(build_toy("mixtral-tiny-16e"), tmp_path / "ctrl")
    assert "num_experts" in str(error.value)
    assert "num_layers" in str(error.value)


def test_from_pretrained_from_a_missing_directory_names_the_missing_file(mixtral_tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="controller.safetensors"):
        ChronovisorModel.from_pretrained(load_base(mixtral_tiny_dir), tmp_path / "nowhere")


def test_from_pretrained_without_the_json_names_it(mixtral_tiny_dir, tmp_path):
    chronovisor.wrap(load_base(mixtral_tiny_dir)).save_pretrained(tmp_path / "ctrl")
    (tmp_path / "ctrl" / "controller_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="controller_config.json"):
        ChronovisorModel.from_pretrained(load_base(mixtral_tiny_dir), tmp_path / "ctrl")
