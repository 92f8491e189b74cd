"""PEFT (LoRA) and the controller in both orders, on a tiny Mixtral, under the real Trainer.

Order A: ``get_peft_model(chronovisor.wrap(base), lora)``; order B: ``chronovisor.wrap(get_peft_model(base, lora))``.
LoRA weights and controller offsets train together, the base stays frozen, both are saved and
restored; each of PEFT's traps either works or raises an error that says what to do.
"""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import chronovisor
from chronovisor import PTConfig
from chronovisor.eval.text_datasets import lm_collator, load_lm_dataset
from chronovisor.model import ChronovisorModel
from chronovisor.peft_support import restore_controller_training
from chronovisor.trainer import ChronovisorCallback
from chronovisor.wrappers import build_toy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = torch.arange(4, 20).reshape(2, 8)


def _lora(**overrides) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **overrides)


def _peft_on_top(**overrides) -> PeftModel:
    """Order A: PEFT around the wrapper."""
    wrapped = chronovisor.wrap(build_toy("mixtral-tiny", seed=0), PTConfig(learnable=True), freeze_base=True)
    return get_peft_model(wrapped, _lora(**overrides))


def _wrapper_on_top() -> ChronovisorModel:
    """Order B: the wrapper around PEFT."""
    return chronovisor.wrap(get_peft_model(build_toy("mixtral-tiny", seed=0), _lora()), PTConfig(learnable=True),
                            freeze_base=True)


def _trainable(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def _train(model, output_dir, text_corpus, word_tokenizer_dir, **kwargs) -> Trainer:
    dataset = load_lm_dataset(text_corpus[0], word_tokenizer_dir, max_length=24)
    args = TrainingArguments(output_dir=str(output_dir), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=0.05)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=lm_collator(word_tokenizer_dir),
                      callbacks=[ChronovisorCallback()])
    trainer.train(**kwargs)
    return trainer


@torch.no_grad()
def _randomise(pressure_offset: torch.Tensor, model) -> None:
    """Random pressure offsets and LoRA B weights (B starts at zero), so both change the output."""
    pressure_offset.normal_(0, 0.5)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.normal_(0, 0.1)


def _lora_b(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_B" in n])


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and "controller" not in n}


# ------------------------------------------------------------------------- order A: PEFT on top
def test_peft_on_top_freezes_the_offsets_and_a_training_forward_says_how_to_restore_them():
    model = _peft_on_top()
    assert not any("controller" in name for name in _trainable(model))
    model.train()
    with pytest.raises(RuntimeError, match=r"restore_controller_training\(peft_model\)"):
        model(input_ids=IDS, labels=IDS)
    assert len(restore_controller_training(model)) == 2
    assert {name for name in _trainable(model) if "controller" in name} == {
        "base_model.model.controller.pressure_offset", "base_model.model.controller.log_temperature_offset"}
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert model.get_base_model().controller.pressure_offset.grad is not None


def test_peft_on_top_under_the_trainer_trains_lora_and_offsets_with_the_base_frozen(tmp_path, text_corpus,
                                                                                     word_tokenizer_dir):
    model = _peft_on_top()
    base_before = _base_weights(model)
    _train(model, tmp_path, text_corpus, word_tokenizer_dir)
    wrapper = model.get_base_model()
    assert float(_lora_b(model).abs().max()) > 0
    assert float(wrapper.controller.pressure_offset.detach().abs().max()) > 0
    assert wrapper.controller.ticks == 4
    assert all(torch.equal(base_before[n], p) for n, p in model.named_parameters() if n in base_before)


def test_peft_on_top_checkpoints_hold_adapter_and_controller_and_restore_both(tmp_path, text_corpus,
                                                                              word_tokenizer_dir):
    model = _peft_on_top()
    _train(model, tmp_path, text_corpus, word_tokenizer_dir)
    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "controller.safetensors").is_file()
    wrapper = ChronovisorModel.from_pretrained(build_toy("mixtral-tiny", seed=0), checkpoint, is_trainable=True)
    assert not isinstance(wrapper.model, PeftModel)               # the adapter goes on top, as it was trained
    restored = PeftModel.from_pretrained(wrapper, checkpoint, is_trainable=True)
    restore_controller_training(restored)                          # PEFT froze the offsets again
    assert _trainable(restored) == _trainable(model)
    for peft_model in (model, restored):
        peft_model.get_base_model().step_mode = "manual"
        peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_peft_on_top_resumes_adapter_and_controller_from_a_checkpoint(tmp_path, text_corpus, word_tokenizer_dir):
    straight = _peft_on_top()
    _train(straight, tmp_path, text_corpus, word_tokenizer_dir)
    resumed = _peft_on_top()
    _train(resumed, tmp_path, text_corpus, word_tokenizer_dir, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.get_base_model().controller.ticks == 4
    torch.testing.assert_close(resumed.get_base_model().controller.pressure_offset,
                               straight.get_base_model().controller.pressure_offset, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_lora_b(resumed), _lora_b(straight), rtol=1e-5, atol=1e-6)


def test_modules_to_save_controller_is_refused_because_the_hooks_would_keep_the_original():
    model = _peft_on_top(modules_to_save=["controller"])
    with pytest.raises(ValueError, match="leave 'controller' out of modules_to_save"):
        model(input_ids=IDS)


def test_peft_on_top_merge_and_unload_returns_the_wrapper_with_merged_weights_and_the_same_output():
    model = _peft_on_top()
    _randomise(model.get_base_model().controller.pressure_offset, model)
    model.eval()
    wrapper = model.get_base_model()
    wrapper.step_mode = "manual"
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        merged = model.merge_and_unload()
        assert merged is wrapper and merged.attachment.attached
        torch.testing.assert_close(merged(input_ids=IDS).logits, before, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- order B: wrapper on top
def test_freeze_base_on_a_peft_model_keeps_lora_trainable_and_freezes_the_rest():
    model = _wrapper_on_top()
    trainable = _trainable(model)
    assert trainable == {n for n in trainable if "lora_" in n} | {"controller.pressure_offset",
                                                                   "controller.log_temperature_offset"}
    assert sum("lora_" in n for n in trainable) == 8                 # A and B of q and v in 2 layers


def test_wrapper_on_top_under_the_trainer_trains_both_and_checkpoints_hold_only_lora_and_controller(
        tmp_path, text_corpus, word_tokenizer_dir):
    model = _wrapper_on_top()
    base_before = _base_weights(model)
    _train(model, tmp_path, text_corpus, word_tokenizer_dir)
    assert float(_lora_b(model).abs().max()) > 0
    assert float(model.controller.pressure_offset.detach().abs().max()) > 0
    assert all(torch.equal(base_before[n], p) for n, p in model.named_parameters() if n in base_before)
    saved = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    assert {n.split(".")[0] for n in saved} == {"model", "controller", "_extra_state"}
    assert all("lora_" in n for n in saved if n.startswith("model."))


def test_wrapper_on_top_save_pretrained_writes_adapter_and_controller_and_from_pretrained_restores_both(tmp_path):
    model = _wrapper_on_top()
    _randomise(model.controller.pressure_offset, model)
    model.save_pretrained(tmp_path)
    assert {"adapter_model.safetensors", "adapter_config.json", "controller.safetensors",
            "controller_config.json"} <= {p.name for p in tmp_path.iterdir()}
    restored = ChronovisorModel.from_pretrained(build_toy("mixtral-tiny", seed=0), tmp_path, is_trainable=True)
    assert _trainable(restored) == _trainable(model)
    for wrapper in (model, restored):
        wrapper.step_mode = "manual"
        wrapper.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_wrapper_on_top_merge_and_unload_keeps_the_controller_on_the_merged_model_without_old_hooks():
    model = _wrapper_on_top()
    _randomise(model.controller.pressure_offset, model)
    model.step_mode = "manual"
    model.eval()
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        merged = model.merge_and_unload()
        assert isinstance(merged, ChronovisorModel) and merged.controller is model.controller
        assert not model.attachment.attached and not isinstance(merged.model, PeftModel)
        torch.testing.assert_close(merged(input_ids=IDS).logits, before, rtol=1e-4, atol=1e-5)
        merged.step_mode = "manual"
        with merged.disable_controller():
            assert not torch.allclose(merged(input_ids=IDS).logits, before)


def test_merge_and_unload_without_an_adapter_explains_that_unwrap_is_what_to_call():
    model = chronovisor.wrap(build_toy("mixtral-tiny", seed=0))
    with pytest.raises(ValueError, match=r"not a PEFT model.*unwrap\(\) returns the base model"):
        model.merge_and_unload()
