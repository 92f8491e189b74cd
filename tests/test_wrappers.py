"""Family adapters on real tiny HF models (built from config, saved as safetensors, re-loaded).

No mocks: every model is a real transformers model; the ground truth is the unwrapped model's own
router outputs (captured by a plain forward hook) and its own logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from chronovisor.controllers import PTConfig, PTController
from chronovisor.wrappers import (
    FamilyAdapter,
    RouterLayoutError,
    UnsupportedModelError,
    WrapperError,
    attach,
    build_toy,
    describe,
    list_presets,
    mixtral,
    register_family,
    registry,
    supported_families,
    toy_config,
)
from chronovisor.wrappers import deepseek_v3 as deepseek_module
from chronovisor.wrappers.base import topk_with_choice_bias
from chronovisor.wrappers.toy import closest_preset

FAMILY_PRESETS = [
    "mixtral-tiny",
    "switch-tiny",
    "qwen2_moe-tiny",
    "qwen3_moe-tiny",
    "olmoe-tiny",
    "deepseek_v3-tiny",
    "gpt_oss-tiny",
    "granitemoe-tiny",
    "phimoe-tiny",
]

# family -> (num_layers, num_experts, top_k, first router path)
EXPECTED = {
    "mixtral": (2, 8, 2, "model.layers.0.mlp.gate"),
    "switch_transformers": (4, 8, 1, "encoder.block.1.layer.1.mlp.router"),
    "qwen2_moe": (2, 8, 2, "model.layers.1.mlp.gate"),          # layer 0 is dense (mlp_only_layers)
    "qwen3_moe": (2, 8, 2, "model.layers.0.mlp.gate"),
    "olmoe": (2, 8, 2, "model.layers.0.mlp.gate"),
    "deepseek_v3": (2, 8, 2, "model.layers.1.mlp.gate"),        # first_k_dense_replace=1
    "gpt_oss": (2, 8, 2, "model.layers.0.mlp.router"),
    "granitemoe": (2, 8, 2, "model.layers.0.block_sparse_moe.router"),
    "phimoe": (2, 8, 2, "model.layers.0.mlp.router"),
}

BATCH, SEQ, DEC_SEQ = 2, 9, 6


def _inputs(family: str) -> dict[str, torch.Tensor]:
    """Fixed inputs with right padding in the second row (encoder and decoder for Switch)."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, 1000, (BATCH, SEQ), generator=generator)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, 6:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family == "switch_transformers":
        decoder_mask = torch.ones(BATCH, DEC_SEQ, dtype=torch.long)
        decoder_mask[1, 4:] = 0
        inputs["decoder_input_ids"] = torch.randint(3, 1000, (BATCH, DEC_SEQ), generator=generator)
        inputs["decoder_attention_mask"] = decoder_mask
    return inputs


def _token_masks(family: str, inputs: dict) -> list[torch.Tensor]:
    """Per controller layer: the flattened [tokens] bool padding mask that layer's router sees."""
    num_layers = EXPECTED[family][0]
    if family == "switch_transformers":
        enc, dec = inputs["attention_mask"].reshape(-1).bool(), inputs["decoder_attention_mask"].reshape(-1).bool()
        return [enc, enc, dec, dec]
    return [inputs["attention_mask"].reshape(-1).bool()] * num_layers


def _hf_expert_ids(family: str, output: tuple) -> torch.Tensor:
    """The experts HF itself chose, from a router's unmodified output: [tokens, k]."""
    if family == "switch_transformers":
        router_logits = output[2]                                                # [B, S, E] fp32
        return F.softmax(router_logits, dim=-1).argmax(-1).reshape(-1, 1)
    return output[2]


def _router_logits(family: str, out) -> list[torch.Tensor]:
    if family == "switch_transformers":
        return [r.reshape(-1, r.shape[-1]) for r in (*out.encoder_router_logits, *out.decoder_router_logits)]
    return list(out.router_logits)


def _counts(ids_per_layer: list[torch.Tensor], masks: list[torch.Tensor], num_experts: int) -> torch.Tensor:
    counts = torch.zeros(len(ids_per_layer), num_experts)
    for layer, (ids, mask) in enumerate(zip(ids_per_layer, masks, strict=True)):
        kept = ids[mask]                                                         # [real tokens, k]
        counts[layer].scatter_add_(0, kept.reshape(-1), torch.ones(kept.numel()))
    return counts


def _controller(info, **config) -> PTController:
    return PTController(info.num_layers, info.num_experts, info.top_k, PTConfig(**config))


def _forward(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, output_router_logits=True, **kwargs)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Reloaded:
    """A tiny model of one family after save_pretrained -> from_pretrained, plus its base outputs."""

    def __init__(self, name: str, directory):
        built = build_toy(name, seed=0)
        built.save_pretrained(directory)
        assert (directory / "model.safetensors").is_file()
        self.model = type(built).from_pretrained(directory).eval()
        self.name, self.directory = name, directory
        self.info = describe(self.model)
        self.family = self.info.family
        self.inputs = _inputs(self.family)
        self.masks = _token_masks(self.family, self.inputs)
        # Ground truth: the unwrapped model's own router outputs, captured by a plain hook.
        captured: list[tuple] = []
        handles = [self.router(layer).register_forward_hook(lambda m, a, o: captured.append(o))
                   for layer in range(self.info.num_layers)]
        self.base = _forward(self.model, self.inputs)
        for handle in handles:
            handle.remove()
        self.base_ids = [_hf_expert_ids(self.family, output) for output in captured]
        self.base_counts = _counts(self.base_ids, self.masks, self.info.num_experts)

    def router(self, layer: int) -> torch.nn.Module:
        return self.model.get_submodule(self.info.router_paths[layer])


@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def tiny(request, tmp_path_factory) -> Reloaded:
    return Reloaded(request.param, tmp_path_factory.mktemp(request.param))


# --------------------------------------------------------------------------- describe
def test_describe_finds_every_router(tiny):
    num_layers, num_experts, top_k, first_path = EXPECTED[tiny.family]
    info = tiny.info
    assert (info.num_layers, info.num_experts, info.top_k) == (num_layers, num_experts, top_k)
    assert info.router_paths[0] == first_path
    assert len(info.router_paths) == len(set(info.router_paths)) == num_layers


def test_describe_names_a_registered_family(tiny):
    assert tiny.info.family in supported_families()


def test_describe_places_every_router_of_a_cpu_model_on_the_cpu(tiny):
    assert set(tiny.info.router_devices) == {"cpu"}


def test_model_info_is_json_serialisable_and_its_summary_names_family_and_routers(tiny):
    json.dumps(tiny.info.to_dict())
    assert tiny.info.family in tiny.info.summary() and EXPECTED[tiny.family][3] in tiny.info.summary()


def test_switch_controller_layers_are_the_encoder_routers_then_the_decoder_routers(switch_tiny):
    assert describe(switch_tiny).router_stacks == ("encoder", "encoder", "decoder", "decoder")


# --------------------------------------------------------------------------- identity
@pytest.mark.parametrize("mode", ["off", "pt"])
def test_identity_is_bit_exact(tiny, mode):
    """mode off, and pt at b=0/T=1 (ticks 1-4 of update_every=5), equal the unwrapped model exactly."""
    controller = _controller(tiny.info, mode=mode, update_every=5)
    attachment = attach(tiny.model, controller)
    try:
        for _ in range(4):
            out = _forward(tiny.model, tiny.inputs)
            assert torch.equal(out.logits, tiny.base.logits)
            for ours, base in zip(_router_logits(tiny.family, out), _router_logits(tiny.family, tiny.base), strict=True):
                assert ours.dtype == base.dtype and torch.equal(ours, base)
            if getattr(tiny.base, "aux_loss", None) is not None:
                assert torch.equal(out.aux_loss, tiny.base.aux_loss)
            controller.step()
        assert torch.count_nonzero(controller.pressure) == 0
    finally:
        attachment.remove()


def test_remove_takes_every_hook_off_and_restores_the_base_outputs(tiny):
    controller = _controller(tiny.info, learnable=True)
    with torch.no_grad():
        controller.pressure_offset[:, 3] = 100.0
    attach(tiny.model, controller).remove()
    for layer in range(tiny.info.num_layers):
        assert all(getattr(hook, "__name__", "") != "router_hook" for hook in tiny.router(layer)._forward_hooks.values())
    assert torch.equal(_forward(tiny.model, tiny.inputs).logits, tiny.base.logits)


@pytest.mark.parametrize("name", FAMILY_PRESETS)
def test_identity_in_bfloat16(name):
    """The dtype handling matches HF's: identity also holds bit-exactly in bf16."""
    model = build_toy(name, seed=3).to(torch.bfloat16)
    info = describe(model)
    inputs = _inputs(info.family)
    base = _forward(model, inputs)
    attachment = attach(model, _controller(info, mode="pt"))
    out = _forward(model, inputs)
    attachment.remove()
    assert torch.equal(out.logits, base.logits)
    for ours, hf in zip(_router_logits(info.family, out), _router_logits(info.family, base), strict=True):
        assert ours.dtype == hf.dtype and torch.equal(ours, hf)


# --------------------------------------------------------------------------- steering
def test_large_offset_steers_every_token(tiny):
    """pressure_offset[:, 3] = +100 (centred: +87.5 / -12.5): every real token picks expert 3."""
    controller = _controller(tiny.info, learnable=True)
    with torch.no_grad():
        controller.pressure_offset[:, 3] = 100.0
    attachment = attach(tiny.model, controller)
    try:
        with attachment.record_routing() as recorder:
            out = _forward(tiny.model, tiny.inputs)
    finally:
        attachment.remove()
    for layer in range(tiny.info.num_layers):
        ids = recorder.layer_expert_index(layer)                                 # [tokens, k]
        assert ids.shape[1] == tiny.info.top_k
        assert bool((ids == 3).any(dim=-1).all()), f"layer {layer}: not every token chose expert 3"
        if tiny.info.top_k > 1:
            assert bool(((ids == 3).sum(-1) == 1).all())                         # 3 once, plus another expert
    # prepend=True: HF's output_router_logits (and the aux loss) see the modulated logits.
    for layer_logits in _router_logits(tiny.family, out):
        assert bool((layer_logits.argmax(-1) == 3).all())
    assert not torch.equal(out.logits, tiny.base.logits)


# ----------------------------------------------------------------------------- counts
def test_counts_equal_hf_routing_without_padding(tiny):
    """After one tick (usage="cumulative"), usage equals the unwrapped model's own choices."""
    controller = _controller(tiny.info, usage="cumulative")
    attachment = attach(tiny.model, controller)
    try:
        with attachment.record_routing() as recorder:
            _forward(tiny.model, tiny.inputs)
        controller.step()
    finally:
        attachment.remove()
    assert torch.equal(controller.usage, tiny.base_counts)
    assert torch.equal(recorder.counts(), tiny.base_counts)
    for layer in range(tiny.info.num_layers):
        assert torch.equal(recorder.layer_expert_index(layer), tiny.base_ids[layer])
        assert torch.equal(recorder.layer_token_mask(layer), tiny.masks[layer])


def test_padding_is_excluded(tiny):
    controller = _controller(tiny.info)
    attachment = attach(tiny.model, controller)
    try:
        _forward(tiny.model, tiny.inputs)
        controller.step()
        padded_total = controller.usage.sum(-1)
        # Without the mask every position counts.
        no_mask = {k: v for k, v in tiny.inputs.items() if not k.endswith("attention_mask")}
        controller.reset()
        _forward(tiny.model, no_mask)
        controller.step()
        full_total = controller.usage.sum(-1)
    finally:
        attachment.remove()
    real = torch.tensor([float(mask.sum()) for mask in tiny.masks])
    allpos = torch.tensor([float(mask.numel()) for mask in tiny.masks])
    assert torch.equal(padded_total, real * tiny.info.top_k)
    assert torch.equal(full_total, allpos * tiny.info.top_k)
    assert bool((padded_total < full_total).all())


def _recompute_ids(tiny: Reloaded, layer: int, router_logits: torch.Tensor) -> torch.Tensor:
    """The family's choice recomputed from the (modulated) logits HF recorded: [tokens, k]."""
    family, k = tiny.family, tiny.info.top_k
    if family == "switch_transformers":
        return F.softmax(router_logits, dim=-1).argmax(-1, keepdim=True)
    if family == "deepseek_v3":
        router = tiny.router(layer)
        return deepseek_module.select_experts(
            router_logits, top_k=k, num_group=router.num_group, topk_group=router.topk_group,
            norm_topk_prob=router.norm_topk_prob, routed_scaling_factor=router.routed_scaling_factor,
            e_score_correction_bias=router.e_score_correction_bias)[1]
    if family == "phimoe":
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        return sparsemixer(router_logits, jitter_eps=tiny.router(layer).router_jitter_noise, training=False)[1]
    return router_logits.topk(k, dim=-1).indices                  # softmax is monotonic: same top-k


def test_counts_under_steering_match_recorded_router_logits(tiny):
    """With routing-changing offsets, usage equals the top-k recomputed from output_router_logits."""
    controller = _controller(tiny.info, learnable=True, usage="cumulative")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        controller.pressure_offset.copy_(torch.randn(controller.pressure_offset.shape, generator=generator) * 2)
        controller.log_temperature_offset.copy_(
            torch.randn(controller.log_temperature_offset.shape, generator=generator) * 0.3)
    attachment = attach(tiny.model, controller)
    try:
        with attachment.record_routing() as recorder:
            out = _forward(tiny.model, tiny.inputs)
        controller.step()
    finally:
        attachment.remove()
    recomputed = [_recompute_ids(tiny, layer, logits) for layer, logits in enumerate(_router_logits(tiny.family, out))]
    expected = _counts(recomputed, tiny.masks, tiny.info.num_experts)
    assert torch.equal(controller.usage, expected)
    assert torch.equal(recorder.counts(), expected)
    assert not torch.equal(expected, tiny.base_counts), "offsets should have changed the routing"


# --------------------------------------------------------------------------- disabled
def test_disabled_gives_the_base_model_and_observes_nothing(tiny):
    controller = _controller(tiny.info, learnable=True)
    with torch.no_grad():
        controller.pressure_offset[:, 3] = 100.0
    attachment = attach(tiny.model, controller)
    try:
        with attachment.disabled(), attachment.record_routing() as recorder:
            assert not attachment.enabled
            out = _forward(tiny.model, tiny.inputs)
        assert attachment.enabled
        controller.step()
    finally:
        attachment.remove()
    assert torch.equal(out.logits, tiny.base.logits)
    assert torch.count_nonzero(controller.usage) == 0
    assert torch.equal(recorder.counts(), tiny.base_counts)      # the recorder still saw HF's routing


# ------------------------------------------------------------------------- training
def test_learnable_offsets_get_gradients_in_training(tiny):
    """Controller-only training: frozen base in train mode, finite non-zero offset gradients."""
    model = build_toy(tiny.name, seed=0).train()
    model.requires_grad_(False)
    controller = _controller(tiny.info, learnable=True)
    with torch.no_grad():
        controller.pressure_offset.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    attachment = attach(model, controller)
    try:
        inputs = dict(tiny.inputs)
        if tiny.family == "switch_transformers":
            labels = inputs.pop("decoder_input_ids").clone()
        else:
            labels = inputs["input_ids"].clone()
        with torch.random.fork_rng(devices=[]):                 # jitter / Gumbel sampling: seeded
            torch.manual_seed(0)
            model(**inputs, labels=labels).loss.backward()
    finally:
        attachment.remove()
    gradient = controller.pressure_offset.grad
    assert gradient is not None and bool(torch.isfinite(gradient).all())
    if tiny.family == "phimoe":
        # sparsemixer's estimator gives a layer no gradient when its jitter mask leaves only the pick.
        assert float(gradient.abs().sum()) > 0
    else:
        assert bool((gradient.abs().sum(-1) > 0).all()), "every layer's offsets should receive gradient"


# ------------------------------------------------------------------ stacked controller
@pytest.mark.parametrize("dynamics", ["reference", "loss_free"])
@pytest.mark.parametrize("name", ["mixtral-tiny", "switch-tiny", "deepseek_v3-tiny", "gpt_oss-tiny"])
def test_stacked_controller_steers_only_its_group(name, dynamics):
    """A stacked controller (C=2 configs) steers sequence c of the batch with config c only:
    group 0 (mode off) keeps HF's routing, group 1 (pressure on expert 3) picks expert 3."""
    model = build_toy(name, seed=0)
    info = describe(model)
    inputs = {k: v for k, v in _inputs(info.family).items() if not k.endswith("attention_mask")}
    captured: list[tuple] = []
    handles = [model.get_submodule(path).register_forward_hook(lambda m, a, o: captured.append(o))
               for path in info.router_paths]
    base = _forward(model, inputs)
    for handle in handles:
        handle.remove()
    base_ids = [_hf_expert_ids(info.family, output) for output in captured]

    configs = [PTConfig(mode="off", dynamics=dynamics), PTConfig(mode="pressure", dynamics=dynamics)]
    controller = PTController(info.num_layers, info.num_experts, info.top_k, configs)
    state = controller.state_dict()
    pressure = torch.zeros(state["_pressure"].shape)                            # [C, L, E]
    pressure[1, :, 3] = 50.0
    state["_pressure"] = pressure
    controller.load_state_dict(state)
    attachment = attach(model, controller)
    try:
        with attachment.record_routing() as recorder:
            out = _forward(model, inputs)
    finally:
        attachment.remove()
    for layer in range(info.num_layers):
        ids = recorder.layer_expert_index(layer)                                # [2 * seq, k]
        half = ids.shape[0] // 2
        assert torch.equal(ids[:half], base_ids[layer][:half])                   # group 0: HF's own routing
        assert bool((ids[half:] == 3).any(-1).all())                             # group 1: steered
    # Row 0 is the base model up to batch-shape numerics (per-expert matmuls see other row counts).
    torch.testing.assert_close(out.logits[0], base.logits[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.logits[1], base.logits[1])


# ------------------------------------------------------------------- family specifics
def test_switch_capacity_still_drops_tokens_under_steering(tmp_path):
    """All tokens steered to expert 3 with capacity 3: per sequence only the first 3 are dispatched,
    exactly as HF's own router does with the same bias in its classifier."""
    model = build_toy("switch-tiny", seed=0, expert_capacity=3)
    model.save_pretrained(tmp_path)
    model = type(model).from_pretrained(tmp_path).eval()
    info = describe(model)
    inputs = _inputs(info.family)
    controller = _controller(info, learnable=True)
    with torch.no_grad():
        controller.pressure_offset[:, 3] = 100.0
    attachment = attach(model, controller)
    dispatch = []                                   # router output[0] as the experts receive it
    handles = [model.get_submodule(path).register_forward_hook(lambda m, a, o: dispatch.append(o[0]))
               for path in info.router_paths]
    try:
        with attachment.record_routing() as recorder:
            out = _forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        attachment.remove()
    for layer, expert_index in enumerate(dispatch):                             # [B, S, E]
        seq = expert_index.shape[1]
        assert bool((expert_index[:, :3, 3] == 1).all())
        assert int(expert_index[:, 3:].sum()) == 0, f"layer {layer}: tokens over capacity must be dropped"
        assert int(expert_index.sum()) == BATCH * 3
        assert bool((recorder.layer_expert_index(layer) == 3).all())             # the choice is still 3
        assert recorder.counts(dispatched_only=True)[layer, 3] <= BATCH * 3 < BATCH * seq

    # The same steering done natively by HF (a classifier bias) dispatches identically.
    native = build_toy("switch-tiny", seed=0, expert_capacity=3, router_bias=True)
    missing = native.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert missing and all(key.endswith("router.classifier.bias") for key in missing)
    offset = torch.full((8,), -12.5)
    offset[3] = 87.5
    native_dispatch = []
    for path in info.router_paths:
        router = native.get_submodule(path)
        with torch.no_grad():
            router.classifier.bias.copy_(offset)
        router.register_forward_hook(lambda m, a, o: native_dispatch.append(o[0]))
    native_out = _forward(native.eval(), inputs)
    for ours, hf in zip(dispatch, native_dispatch, strict=True):
        assert torch.equal(ours, hf)
    torch.testing.assert_close(out.logits, native_out.logits, rtol=1e-4, atol=1e-5)


def test_deepseek_loss_free_bias_equals_e_score_correction_bias(tmp_path):
    """The loss_free selection bias acts exactly like DeepSeek's own e_score_correction_bias."""
    model = build_toy("deepseek_v3-tiny", seed=0)
    info = describe(model)
    inputs = _inputs(info.family)
    bias = torch.randn(info.num_layers, info.num_experts, generator=torch.Generator().manual_seed(5)) * 0.2
    controller = _controller(info, dynamics="loss_free", mode="pressure")
    state = controller.state_dict()
    state["_pressure"] = bias.reshape(state["_pressure"].shape)           # the loss_free bias lives there
    controller.load_state_dict(state)
    assert torch.equal(controller.selection_bias(0), bias[0])
    attachment = attach(model, controller)
    with attachment.record_routing() as recorder:
        ours = _forward(model, inputs)
    attachment.remove()
    plain = _forward(model, inputs)
    for layer, path in enumerate(info.router_paths):
        with torch.no_grad():
            model.get_submodule(path).e_score_correction_bias.copy_(bias[layer])
    native = _forward(model, inputs)
    assert torch.equal(ours.logits, native.logits)
    assert not torch.equal(ours.logits, plain.logits)
    assert recorder.num_calls(0) == 1


def test_deepseek_hook_reads_offloaded_correction_bias(tmp_path):
    """Under accelerate disk offload (buffers too) the router's tensors are on meta during the hook."""
    model = build_toy("deepseek_v3-tiny", seed=0)
    info = describe(model)
    with torch.no_grad():
        for path in info.router_paths:
            model.get_submodule(path).e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    model.save_pretrained(tmp_path / "model")
    inputs = _inputs(info.family)
    base = _forward(model, inputs)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload"), offload_buffers=True)
    gate = offloaded.get_submodule(info.router_paths[0])
    assert gate.e_score_correction_bias.device.type == "meta"
    attachment = attach(offloaded, _controller(info, mode="pt"))
    out = _forward(offloaded, inputs)
    attachment.remove()
    assert torch.equal(out.logits, base.logits)


@pytest.mark.parametrize("name", ["mixtral-tiny", "switch-tiny"])
def test_generation_counts_only_real_tokens(name):
    """generate(): KV-cache steps see the newest mask columns; Switch's encoder runs outside the
    top-level forward (generate calls it directly) and its padding is still excluded."""
    model = build_toy(name, seed=0)
    info = describe(model)
    input_ids = torch.randint(3, 1000, (2, 5), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])               # 8 real prompt tokens
    if info.family == "switch_transformers":
        attention_mask = attention_mask.flip(-1)                                    # encoder: right padding
    controller = _controller(info)
    attachment = attach(model, controller)
    try:
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3, min_new_tokens=3,
                           do_sample=False, pad_token_id=0)
        controller.step()
    finally:
        attachment.remove()
    if info.family == "switch_transformers":
        # encoder routers: the 8 real tokens once; decoder routers: 3 steps x 2 sequences.
        expected = torch.tensor([8.0, 8.0, 6.0, 6.0])
    else:
        # prefill: 8 real prompt tokens; then 2 decode steps of 2 tokens (the 3rd new token is not fed back).
        expected = torch.full((info.num_layers,), (8.0 + 2 * 2) * info.top_k)
    assert torch.equal(controller.usage.sum(-1), expected)


def _mixtral_usage_after(call) -> tuple[torch.Tensor, dict, object]:
    """Per-layer usage totals after ``call(model, inputs)`` on a fresh attached mixtral-tiny (one step)."""
    model = build_toy("mixtral-tiny", seed=0)
    info = describe(model)
    inputs = _inputs(info.family)
    controller = _controller(info)
    attachment = attach(model, controller)
    try:
        call(model, inputs)
        controller.step()
    finally:
        attachment.remove()
    return controller.usage.sum(-1), inputs, info


def _real_token_usage(inputs, info) -> torch.Tensor:
    return torch.full((info.num_layers,), float(inputs["attention_mask"].sum()) * info.top_k)


def test_a_positional_attention_mask_under_inference_mode_excludes_padding():
    def call(model, inputs):
        with torch.inference_mode():
            model(inputs["input_ids"], inputs["attention_mask"])

    usage, inputs, info = _mixtral_usage_after(call)
    assert torch.equal(usage, _real_token_usage(inputs, info))


def test_calling_the_backbone_directly_still_excludes_padding():
    def call(model, inputs):
        with torch.no_grad():
            model.model(**inputs)

    usage, inputs, info = _mixtral_usage_after(call)
    assert torch.equal(usage, _real_token_usage(inputs, info))


def test_a_forward_without_attention_mask_counts_every_token():
    def call(model, inputs):
        with torch.no_grad():
            model(input_ids=inputs["input_ids"])

    usage, inputs, info = _mixtral_usage_after(call)
    assert torch.equal(usage, torch.full((info.num_layers,), float(inputs["input_ids"].numel() * info.top_k)))


# ------------------------------------------------------------------------------ errors
def test_non_moe_model_is_rejected_with_the_supported_families():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match="no Mixture-of-Experts router") as error:
        describe(model)
    for family in supported_families():
        assert family in str(error.value)
    with pytest.raises(UnsupportedModelError):
        attach(model, PTController(1, 8, 2))


def test_unsupported_moe_family_is_named_as_such():
    config = transformers.JetMoeConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_key_value_heads=2,
                                       kv_channels=4, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    model = transformers.JetMoeForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match="looks like a Mixture-of-Experts.*not supported") as error:
        describe(model)
    assert "mixtral" in str(error.value) and "switch_transformers" in str(error.value)


def test_an_unexpected_router_attribute_names_the_module_path():
    model = build_toy("mixtral-tiny", seed=0)
    model.model.layers[1].mlp.gate.top_k = None
    with pytest.raises(RouterLayoutError, match=r"'model\.layers\.1\.mlp\.gate'"):
        describe(model)


def test_an_unexpected_router_submodule_names_the_module_path():
    switch = build_toy("switch-tiny", seed=0)
    switch.decoder.block[3].layer[2].mlp.router.classifier = torch.nn.Identity()
    with pytest.raises(RouterLayoutError, match=r"'decoder\.block\.3\.layer\.2\.mlp\.router'"):
        describe(switch)


def test_attach_names_a_wrong_expert_count():
    model = build_toy("mixtral-tiny", seed=0)
    info = describe(model)
    with pytest.raises(WrapperError, match=r"num_experts=16 \(needs num_experts=8\)"):
        attach(model, PTController(info.num_layers, 16, info.top_k))


def test_attach_names_every_shape_mismatch():
    model = build_toy("mixtral-tiny", seed=0)
    with pytest.raises(WrapperError, match=r"num_layers=3 \(needs num_layers=2\).*top_k=1 \(needs top_k=2\)"):
        attach(model, PTController(3, describe(model).num_experts, 1))


def test_attaching_a_second_controller_to_an_attached_model_fails():
    model = build_toy("mixtral-tiny", seed=0)
    info = describe(model)
    attach(model, _controller(info))
    with pytest.raises(WrapperError, match="already has a controller"):
        attach(model, _controller(info))


def test_a_model_whose_attachment_was_removed_can_be_attached_again():
    model = build_toy("mixtral-tiny", seed=0)
    info = describe(model)
    attach(model, _controller(info)).remove()
    attach(model, _controller(info)).remove()


def test_record_routing_cannot_be_nested():
    model = build_toy("mixtral-tiny", seed=0)
    attachment = attach(model, _controller(describe(model)))
    with attachment.record_routing(), pytest.raises(RuntimeError, match="already active"):
        with attachment.record_routing():
            pass


def test_a_loss_free_controller_is_refused_on_phimoe():
    phimoe = build_toy("phimoe-tiny", seed=0)
    with pytest.raises(WrapperError, match="loss_free"):
        attach(phimoe, PTController(2, 8, 2, PTConfig(dynamics="loss_free")))


def test_a_stacked_loss_free_controller_is_refused_on_phimoe():
    phimoe = build_toy("phimoe-tiny", seed=0)
    configs = [PTConfig(dynamics="loss_free", mode="off"), PTConfig(dynamics="loss_free", mode="pressure")]
    with pytest.raises(WrapperError, match="loss_free"):
        attach(phimoe, PTController(2, 8, 2, configs))


# ------------------------------------------------------------------------------- toys
def test_the_research_and_tiny_presets_are_listed():
    assert {"mixtral-2l8e", "mixtral-4l16e", "switch-2l8e", "expertchoice-2l8e", "expertchoice-4l16e", "mixtral-tiny",
            "mixtral-tiny-16e", "switch-tiny", "expertchoice-tiny"} <= set(list_presets())


def test_an_unknown_preset_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown toy preset 'nope'.*mixtral-2l8e"):
        build_toy("nope")


def test_an_unknown_preset_name_close_to_a_preset_suggests_it():
    with pytest.raises(ValueError, match="unknown toy preset 'mixtral-tiy'; did you mean 'mixtral-tiny'\\?"):
        build_toy("mixtral-tiy")


def test_the_closest_preset_ignores_case_and_never_matches_hub_ids_or_distant_names():
    assert closest_preset("Mixtral-2L8E") == "mixtral-2l8e"
    assert closest_preset("switch_2l8e") == "switch-2l8e"
    assert closest_preset("mistralai/mixtral-2l8") is None
    assert closest_preset("gpt2") is None
    assert closest_preset("mixtral") is None


def test_mixtral_2l8e_has_the_reference_models_sizes():
    big = toy_config("mixtral-2l8e")
    assert (big.hidden_size, big.intermediate_size, big.num_attention_heads, big.num_key_value_heads,
            big.num_hidden_layers, big.num_local_experts, big.num_experts_per_tok, big.vocab_size) == \
        (256, 1024, 8, 4, 2, 8, 2, 1000)


def test_mixtral_4l16e_has_four_layers_of_sixteen_experts_at_width_256():
    scaled = toy_config("mixtral-4l16e")
    assert (scaled.num_hidden_layers, scaled.num_local_experts, scaled.hidden_size) == (4, 16, 256)


def test_switch_2l8e_has_eight_experts_in_every_second_block_of_each_stack():
    switch = toy_config("switch-2l8e")
    assert (switch.d_model, switch.num_experts, switch.encoder_sparse_step, switch.decoder_sparse_step) == (256, 8, 2, 2)


def test_toy_config_overrides_replace_preset_values():
    assert toy_config("mixtral-tiny", num_local_experts=4).num_local_experts == 4


def test_build_toy_leaves_the_global_rng_untouched():
    state = torch.random.get_rng_state()
    build_toy("mixtral-tiny", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_build_toy_with_the_same_seed_gives_the_same_weights():
    first, again = (build_toy("mixtral-tiny", seed=0) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))


def test_build_toy_with_another_seed_gives_other_weights():
    first, other = (build_toy("mixtral-tiny", seed=s) for s in (0, 1))
    assert not torch.equal(first.model.layers[0].mlp.gate.weight, other.model.layers[0].mlp.gate.weight)


def test_toy_models_are_built_in_eval_mode():
    assert not build_toy("mixtral-tiny", seed=0).training


def test_toy_models_use_eager_attention_and_grouped_mm_experts():
    config = build_toy("mixtral-tiny", seed=0).config
    assert config._attn_implementation == "eager"
    assert config._experts_implementation == "grouped_mm"


def test_mixtral_tiny_16e_has_four_layers_of_sixteen_experts_top_2():
    sixteen = describe(build_toy("mixtral-tiny-16e"))
    assert (sixteen.num_layers, sixteen.num_experts, sixteen.top_k) == (4, 16, 2)


@pytest.mark.gpu
def test_cuda_identity_and_counts_with_controller_on_the_device():
    model = build_toy("mixtral-tiny", seed=0).cuda()
    info = describe(model)
    assert set(info.router_devices) == {"cuda:0"}
    inputs = {k: v.cuda() for k, v in _inputs(info.family).items()}
    base = _forward(model, inputs)
    controller = _controller(info, mode="pt").cuda()
    attachment = attach(model, controller)
    with attachment.record_routing() as recorder:
        out = _forward(model, inputs)
    controller.step()
    attachment.remove()
    assert torch.equal(out.logits, base.logits)
    assert controller.usage.device.type == "cuda"
    assert torch.equal(controller.usage, recorder.counts())
    assert float(controller.usage.sum()) == float(inputs["attention_mask"].sum()) * 2 * info.num_layers


def test_activation_checkpointing_recompute_is_not_counted_twice():
    """Gradient checkpointing re-runs the routers during backward: same modulation, no second count."""
    model = build_toy("mixtral-tiny", seed=0).train()
    model.requires_grad_(False)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    info = describe(model)
    inputs = _inputs(info.family)
    controller = _controller(info, learnable=True)
    with torch.no_grad():
        controller.pressure_offset.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    attachment = attach(model, controller)
    try:
        with attachment.record_routing() as recorder:
            loss = model(**inputs, labels=inputs["input_ids"], use_cache=False).loss
            calls_after_forward = recorder.num_calls(0)
            loss.backward()
        controller.step()
    finally:
        attachment.remove()
    assert calls_after_forward == recorder.num_calls(0) == 1
    real = float(inputs["attention_mask"].sum())
    assert torch.equal(controller.usage.sum(-1), torch.full((info.num_layers,), real * info.top_k))
    assert float(controller.pressure_offset.grad.abs().sum()) > 0


# ------------------------------------------------------------------ family registration
def test_importing_the_wrappers_package_registers_all_ten_families():
    assert supported_families() == sorted(["deepseek_v3", "expert_choice", "gpt_oss", "granitemoe", "mixtral", "olmoe",
                                           "phimoe", "qwen2_moe", "qwen3_moe", "switch_transformers"])


def test_family_adapter_cannot_be_instantiated_without_route():
    class NoRoute(FamilyAdapter):
        family = "no_route"
        router_classes = ("NoRouteRouter",)

    with pytest.raises(TypeError, match="route"):
        NoRoute()


def test_a_family_registered_by_the_decorator_is_detected_by_its_router_class(monkeypatch):
    """The extension point end to end: a new adapter class and router class, nothing else edited."""
    monkeypatch.setattr(registry, "ADAPTERS", dict(registry.ADAPTERS))
    model = build_toy("mixtral-tiny", seed=0)
    inputs = _inputs("mixtral")
    base = _forward(model, inputs)
    for layer in model.model.layers:
        layer.mlp.gate.__class__ = type("CustomTopKRouter", (type(layer.mlp.gate),), {})

    @register_family
    class CustomAdapter(mixtral.MixtralAdapter):
        family = "custom"
        router_classes = ("CustomTopKRouter",)

    info = describe(model)
    attach(model, _controller(info, mode="pt"))
    assert (info.family, info.router_class) == ("custom", "CustomTopKRouter")
    assert torch.equal(_forward(model, inputs).logits, base.logits)


def test_register_family_refuses_a_router_class_another_family_handles(monkeypatch):
    monkeypatch.setattr(registry, "ADAPTERS", dict(registry.ADAPTERS))

    class Duplicate(mixtral.MixtralAdapter):
        family = "duplicate"

    with pytest.raises(WrapperError, match="'MixtralTopKRouter'.*already handled by the mixtral family"):
        register_family(Duplicate)
    assert "duplicate" not in registry.ADAPTERS


def test_register_family_refuses_an_adapter_without_a_family_name(monkeypatch):
    monkeypatch.setattr(registry, "ADAPTERS", dict(registry.ADAPTERS))

    class Nameless(mixtral.MixtralAdapter):
        family = ""

    with pytest.raises(WrapperError, match="set the class attributes `family` and `router_classes`"):
        register_family(Nameless)


def test_an_unsupported_selection_bias_is_refused_by_the_shared_select():
    model = build_toy("phimoe-tiny", seed=0)
    router = model.get_submodule(describe(model).router_paths[0])
    logits = torch.zeros(3, 8)
    output = (logits, torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="phimoe family has no choice-only selection bias"):
        registry.ADAPTERS["phimoe"].select(router, (), output, logits, torch.zeros(8))


# ------------------------------------------------------------- choice-only biased top-k
def test_topk_with_choice_bias_chooses_by_the_biased_scores_and_returns_the_unbiased_ones():
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    bias = torch.tensor([0.0, 0.0, 0.4])                       # lifts expert 2 above expert 1 / 0
    values, indices = topk_with_choice_bias(scores, 1, bias)
    assert indices.tolist() == [[2], [2]]
    assert values.tolist() == [[scores[0, 2].item()], [scores[1, 2].item()]]


def test_topk_with_choice_bias_without_a_bias_is_torch_topk():
    scores = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    values, indices = topk_with_choice_bias(scores, 2)
    expected = torch.topk(scores, 2, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


def test_topk_with_choice_bias_keeps_the_scores_dtype():
    scores = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    values, _ = topk_with_choice_bias(scores, 2, torch.zeros(8))
    assert values.dtype == torch.bfloat16


# ----------------------------------------------------------------------- stack subsets
def test_describing_switch_decoder_only_gives_only_the_decoder_routers(switch_tiny):
    info = describe(switch_tiny, stacks=("decoder",))
    assert info.num_layers == 2
    assert info.router_stacks == ("decoder", "decoder")
    assert all(path.startswith("decoder.") for path in info.router_paths)


def test_a_switch_decoder_only_controller_has_one_layer_per_decoder_router(switch_tiny, switch_tiny_inputs):
    info = describe(switch_tiny, stacks=("decoder",))
    controller = _controller(info, usage="cumulative")
    attach(switch_tiny, controller, stacks=("decoder",))
    _forward(switch_tiny, switch_tiny_inputs)
    controller.step()
    decoder_tokens = switch_tiny_inputs["decoder_input_ids"].numel()
    assert torch.equal(controller.usage.sum(-1), torch.full((2,), float(decoder_tokens)))


def test_switch_decoder_only_with_an_identity_controller_is_bit_exact(switch_tiny, switch_tiny_inputs):
    base = _forward(switch_tiny, switch_tiny_inputs)
    attach(switch_tiny, _controller(describe(switch_tiny, stacks=("decoder",)), mode="pt"), stacks=("decoder",))
    assert torch.equal(_forward(switch_tiny, switch_tiny_inputs).logits, base.logits)


def test_switch_encoder_routers_left_out_are_untouched_while_the_decoder_is_steered(switch_tiny, switch_tiny_inputs):
    base = _forward(switch_tiny, switch_tiny_inputs)
    controller = _controller(describe(switch_tiny, stacks=("decoder",)), learnable=True)
    with torch.no_grad():
        controller.pressure_offset[:, 3] = 100.0
    attach(switch_tiny, controller, stacks=("decoder",))
    out = _forward(switch_tiny, switch_tiny_inputs)
    for ours, hf in zip(out.encoder_router_logits, base.encoder_router_logits, strict=True):
        assert torch.equal(ours, hf)
    for ours in out.decoder_router_logits:
        assert bool((ours.argmax(-1) == 3).all())


def test_an_unknown_stack_raises_a_one_line_value_error_naming_stacks_and_the_valid_values(switch_tiny):
    with pytest.raises(ValueError, match=r"stacks=\('decocer',\).*valid values: 'encoder', 'decoder'") as error:
        describe(switch_tiny, stacks=("decocer",))
    assert "\n" not in str(error.value)


def test_a_bare_string_for_stacks_is_refused(switch_tiny):
    with pytest.raises(ValueError, match="stacks='decoder' is not a non-empty sequence"):
        describe(switch_tiny, stacks="decoder")


def test_a_decoder_only_model_has_only_the_decoder_stack():
    with pytest.raises(ValueError, match="valid values: 'decoder'"):
        describe(build_toy("mixtral-tiny", seed=0), stacks=("encoder",))
