"""chronovisor.load through accelerate: cpu + disk offload, placement plans, dtypes.

Real accelerate dispatch on a real tiny Mixtral saved as safetensors. Without GPUs the honest
split is: dispatch + hook mechanics with ``cpu``/``disk`` maps (here), and the multi-GPU
*placement plan* on a meta model with fake GPU ids in ``max_memory`` (accelerate plans for
devices it cannot see; only ``from_pretrained`` with GPU ids needs real GPUs).
"""

from __future__ import annotations

import logging
import time

import pytest
import torch
from accelerate import infer_auto_device_map, init_empty_weights
from accelerate.utils import compute_module_sizes
from transformers import AutoModelForCausalLM

import chronovisor
from chronovisor import PTConfig
from chronovisor.wrappers import build_toy, describe, toy_config

STEERED_EXPERT = 3
TOP_K = 2

# Module names of the tiny Mixtral (the LM head is tied to the embeddings).
CPU_AND_DISK_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, 1000, (2, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 7:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def steered_run(wrapped, inputs):
    """Logits and routing record with a large learnable pressure offset on one expert."""
    with torch.no_grad():
        wrapped.controller.pressure_offset[:, STEERED_EXPERT] = 100.0
        with wrapped.record_routing() as record:
            out = wrapped(**inputs)
    return out.logits, record


@pytest.fixture(scope="module")
def in_memory(mixtral_tiny_dir, inputs):
    """Reference outputs of the wrapped model loaded fully into memory (no device map)."""
    wrapped = chronovisor.load(str(mixtral_tiny_dir), PTConfig(learnable=True), step_mode="manual")
    assert not getattr(wrapped.model, "hf_device_map", None)
    with torch.no_grad():
        plain = wrapped(**inputs).logits
    steered, record = steered_run(wrapped, inputs)
    return plain, steered, record


@pytest.fixture(scope="module")
def layer_bytes(mixtral_tiny_dir):
    sizes = compute_module_sizes(AutoModelForCausalLM.from_pretrained(mixtral_tiny_dir))
    return sizes["model.embed_tokens"], sizes["model.layers.0"]


def load_offloaded(mixtral_tiny_dir, tmp_path, **kwargs):
    return chronovisor.load(str(mixtral_tiny_dir), PTConfig(learnable=True), step_mode="manual",
                            offload_folder=str(tmp_path / "offload"), **kwargs)


@pytest.fixture(scope="module")
def explicit_offload(mixtral_tiny_dir, tmp_path_factory):
    return load_offloaded(mixtral_tiny_dir, tmp_path_factory.mktemp("explicit"), device_map=dict(CPU_AND_DISK_MAP))


@pytest.fixture(scope="module")
def auto_offload(mixtral_tiny_dir, tmp_path_factory, layer_bytes):
    embed, layer = layer_bytes
    budget = {"cpu": embed + layer // 2}            # room for the embeddings, not for a layer
    return load_offloaded(mixtral_tiny_dir, tmp_path_factory.mktemp("auto"), device_map="auto", max_memory=budget)


def assert_same_steering(wrapped, inputs, in_memory):
    plain, steered, record = in_memory
    logits, offloaded_record = steered_run(wrapped, inputs)
    torch.testing.assert_close(logits, steered, rtol=1e-5, atol=1e-5)
    assert len(offloaded_record.expert_index) == len(record.expert_index) == 2
    for layer, ids in enumerate(offloaded_record.expert_index):
        real = offloaded_record.token_mask[layer]
        assert bool((ids[real, 0] == STEERED_EXPERT).all()), f"layer {layer}: not every token picks the expert"
        assert torch.equal(ids, record.expert_index[layer])
        assert torch.equal(real, record.token_mask[layer])
        torch.testing.assert_close(offloaded_record.weights[layer], record.weights[layer], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- explicit cpu+disk
def test_explicit_cpu_and_disk_map_offloads_the_second_layer(explicit_offload):
    base = explicit_offload.model
    assert base.hf_device_map == CPU_AND_DISK_MAP
    router = base.model.layers[1].mlp.gate
    assert router.weight.device.type == "meta"                 # its weights live on disk
    assert router._hf_hook.offload


def test_explicit_cpu_and_disk_map_gives_the_in_memory_logits(explicit_offload, inputs, in_memory):
    with torch.no_grad():
        logits = explicit_offload(**inputs).logits
    torch.testing.assert_close(logits, in_memory[0], rtol=1e-5, atol=1e-5)


def test_explicit_cpu_and_disk_map_gives_the_same_steering(explicit_offload, inputs, in_memory):
    assert_same_steering(explicit_offload, inputs, in_memory)


def test_describe_reports_the_execution_device_of_offloaded_routers(explicit_offload):
    info = describe(explicit_offload.model)
    assert info.router_paths == ("model.layers.0.mlp.gate", "model.layers.1.mlp.gate")
    assert info.router_devices == ("cpu", "cpu")                # not "meta": accelerate runs it on the CPU
    assert explicit_offload.controller.pressure_offset.device.type == "cpu"


# --------------------------------------------------------------------- device_map="auto" + budget
def test_auto_map_with_a_small_cpu_budget_offloads_routed_layers_to_disk(auto_offload):
    device_map = auto_offload.model.hf_device_map
    assert "disk" in device_map.values()
    offloaded_routers = [layer.mlp.gate for layer in auto_offload.model.model.layers
                         if layer.mlp.gate.weight.device.type == "meta"]
    assert offloaded_routers, device_map


def test_auto_map_with_a_small_cpu_budget_gives_the_in_memory_logits(auto_offload, inputs, in_memory):
    with torch.no_grad():
        logits = auto_offload(**inputs).logits
    torch.testing.assert_close(logits, in_memory[0], rtol=1e-5, atol=1e-5)


def test_auto_map_with_a_small_cpu_budget_gives_the_same_steering(auto_offload, inputs, in_memory):
    assert_same_steering(auto_offload, inputs, in_memory)


# ------------------------------------------------------------------- multi-GPU placement plan
def test_placement_plan_for_two_fake_gpus_spreads_the_layers(caplog):
    config = toy_config("mixtral-tiny-16e")                     # 4 decoder layers
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    meta.tie_weights()
    assert meta.model.layers[0].mlp.gate.weight.device.type == "meta"
    sizes = compute_module_sizes(meta)
    embed, layer = sizes["model.embed_tokens"], sizes["model.layers.0"]
    # accelerate keeps room for the largest layer on each GPU; with that, device 0 fits the
    # embeddings and two layers, device 1 the other two layers and the small modules.
    per_gpu = embed + 3 * layer + layer // 4
    with caplog.at_level(logging.ERROR):                         # "Device 0 is not available"
        plan = infer_auto_device_map(meta, max_memory={0: per_gpu, 1: per_gpu, "cpu": 100 * layer},
                                     no_split_module_classes=[type(meta.model.layers[0]).__name__])
    assert {name: plan[name] for name in ("model.embed_tokens", "model.layers.0", "model.layers.1",
                                          "model.layers.2", "model.layers.3")} == {
        "model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0,
        "model.layers.2": 1, "model.layers.3": 1}
    assert "cpu" not in plan.values() and "disk" not in plan.values()
    assert not any(name.startswith("model.layers.") and name.count(".") > 2 for name in plan)  # no layer split


def test_placement_plan_spills_layers_to_cpu_when_the_gpus_are_full(caplog):
    config = toy_config("mixtral-tiny-16e")
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    meta.tie_weights()
    sizes = compute_module_sizes(meta)
    embed, layer = sizes["model.embed_tokens"], sizes["model.layers.0"]
    per_gpu = embed + 2 * layer + layer // 4
    with caplog.at_level(logging.ERROR):
        plan = infer_auto_device_map(meta, max_memory={0: per_gpu, 1: per_gpu, "cpu": 100 * layer},
                                     no_split_module_classes=[type(meta.model.layers[0]).__name__])
    # device 0: embeddings + one layer (plus the reserve); device 1: two layers; the last one spills
    assert [plan[f"model.layers.{i}"] for i in range(4)] == [0, 1, 1, "cpu"]
    assert plan["model.embed_tokens"] == 0


# ----------------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])
def test_bfloat16_load_is_bit_identical_to_the_unwrapped_bfloat16_model(mixtral_tiny_dir, inputs, dtype):
    reference = AutoModelForCausalLM.from_pretrained(mixtral_tiny_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        expected = reference(**inputs).logits
    wrapped = chronovisor.load(str(mixtral_tiny_dir), PTConfig(), torch_dtype=dtype)
    assert next(wrapped.model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        logits = wrapped(**inputs).logits
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, expected)


def test_bfloat16_load_is_steerable(mixtral_tiny_dir, inputs):
    wrapped = chronovisor.load(str(mixtral_tiny_dir), PTConfig(learnable=True), torch_dtype=torch.bfloat16,
                               step_mode="manual")
    _, record = steered_run(wrapped, inputs)
    assert all(bool((ids[:, 0] == STEERED_EXPERT).all()) for ids in record.expert_index)


def test_an_unknown_dtype_name_is_rejected(mixtral_tiny_dir):
    with pytest.raises(ValueError, match="dtype"):
        chronovisor.load(str(mixtral_tiny_dir), PTConfig(), torch_dtype="float7")


def test_loading_a_directory_without_config_json_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        chronovisor.load(str(tmp_path), PTConfig())


def test_a_typo_of_a_preset_name_fails_at_once_suggesting_the_closest_preset():
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="unknown model 'mixtral-2l8': did you mean the toy preset 'mixtral-2l8e'"):
        chronovisor.load("mixtral-2l8", PTConfig())
    assert time.monotonic() - start < 5.0  # no hub round trips (they retried for ~47 s)


def test_a_local_directory_named_like_a_preset_is_loaded_as_a_directory_not_suggested(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mixtral-2l8").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        chronovisor.load("mixtral-2l8", PTConfig())


# ------------------------------------------------------------------------ load() options
def test_load_with_controller_dir_restores_a_saved_controller(mixtral_tiny_dir, inputs, tmp_path):
    original = chronovisor.load(str(mixtral_tiny_dir), PTConfig(learnable=True), step_mode="manual")
    with torch.no_grad():
        original.controller.pressure_offset[:, 5] = 4.0
        expected = original(**inputs).logits
    original.save_pretrained(tmp_path / "ctrl")
    restored = chronovisor.load(str(mixtral_tiny_dir), controller_dir=tmp_path / "ctrl", step_mode="manual")
    with torch.no_grad():
        assert torch.equal(restored(**inputs).logits, expected)
    assert not any(p.requires_grad for p in restored.controller.parameters())


def test_load_refuses_both_a_config_and_a_controller_dir(mixtral_tiny_dir, tmp_path):
    chronovisor.load(str(mixtral_tiny_dir), PTConfig()).save_pretrained(tmp_path / "ctrl")
    with pytest.raises(ValueError, match="config or controller_dir"):
        chronovisor.load(str(mixtral_tiny_dir), PTConfig(), controller_dir=tmp_path / "ctrl")


def test_load_with_freeze_base_leaves_only_the_offsets_trainable(mixtral_tiny_dir):
    wrapped = chronovisor.load(str(mixtral_tiny_dir), PTConfig(learnable=True), freeze_base=True)
    assert not any(p.requires_grad for p in wrapped.model.parameters())
    assert wrapped.trainable_parameters()[0] == 2 * 2 * 8


def test_load_of_a_preset_name_builds_the_seeded_toy_model(inputs):
    wrapped = chronovisor.load("mixtral-tiny", PTConfig(), seed=3)
    reference = build_toy("mixtral-tiny", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(wrapped.model.state_dict().values(),
                                                 reference.state_dict().values(), strict=True))
    assert not wrapped.model.training
