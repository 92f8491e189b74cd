"""transformers' Trainer with a wrapped tiny Mixtral: default TrainingArguments, controller-only training.

Real Trainer, real datasets, a tokenizer trained in the test; nothing from the hub.
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import chronovisor
from chronovisor import PTConfig
from chronovisor.eval.text_datasets import lm_collator, load_lm_dataset
from chronovisor.model import ChronovisorModel
from chronovisor.trainer import ChronovisorCallback
from chronovisor.wrappers import build_toy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(text_corpus, word_tokenizer_dir):
    return load_lm_dataset(text_corpus[0], word_tokenizer_dir, max_length=24)


def _wrapped() -> ChronovisorModel:
    return chronovisor.wrap(build_toy("mixtral-tiny", seed=0), PTConfig(learnable=True), freeze_base=True)


def _trainer(model, output_dir, dataset, word_tokenizer_dir, max_steps=4) -> Trainer:
    """Default TrainingArguments apart from where, how long, the batch and the learning rate."""
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, save_steps=2,
                             per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=0.05)
    return Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                   data_collator=lm_collator(word_tokenizer_dir), callbacks=[ChronovisorCallback()])


def test_trainer_with_default_arguments_trains_only_the_offsets_and_ticks_once_per_optimizer_step(
        tmp_path, dataset, word_tokenizer_dir):
    model = _wrapped()
    base_before = {name: tensor.clone() for name, tensor in model.model.state_dict().items()}
    trainer = _trainer(model, tmp_path, dataset, word_tokenizer_dir)
    assert model.step_mode == "optimizer"
    result = trainer.train()
    assert result.global_step == 4 and model.controller.ticks == 4
    assert float(model.controller.pressure_offset.detach().abs().max()) > 0
    assert float(model.controller.log_temperature_offset.detach().abs().max()) > 0
    assert all(torch.equal(base_before[name], tensor) for name, tensor in model.model.state_dict().items())


def test_evaluate_reports_eval_loss_and_leaves_the_controller_untouched(tmp_path, dataset, word_tokenizer_dir):
    model = _wrapped()
    trainer = _trainer(model, tmp_path, dataset, word_tokenizer_dir)
    trainer.train()
    state_before = {name: tensor.clone() for name, tensor in model.controller.state_dict().items()}
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0
    assert model.controller.ticks == 4
    for name, tensor in model.controller.state_dict().items():     # bit for bit (the loss window holds NaN)
        torch.testing.assert_close(tensor, state_before[name], rtol=0, atol=0, equal_nan=True, msg=name)
    # The controller steers the evaluation: the base model alone scores the same data differently.
    with model.disable_controller():
        assert trainer.evaluate()["eval_loss"] != metrics["eval_loss"]


def test_checkpoints_hold_the_controller_only_and_from_pretrained_restores_it(tmp_path, dataset, word_tokenizer_dir):
    model = _wrapped()
    _trainer(model, tmp_path, dataset, word_tokenizer_dir).train()
    checkpoint = tmp_path / "checkpoint-4"
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert saved and all(name.startswith("controller.") or name == "_extra_state" for name in saved)
    assert int(saved["_extra_state"]) == 4
    restored = ChronovisorModel.from_pretrained(build_toy("mixtral-tiny", seed=0), checkpoint, is_trainable=True)
    assert torch.equal(restored.controller.pressure_offset, model.controller.pressure_offset)
    assert torch.equal(restored.controller.temperature, model.controller.temperature)
    assert restored.controller.ticks == 4


def test_resuming_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path, dataset, word_tokenizer_dir):
    straight = _wrapped()
    _trainer(straight, tmp_path / "straight", dataset, word_tokenizer_dir).train()
    resumed = _wrapped()
    trainer = _trainer(resumed, tmp_path / "resumed", dataset, word_tokenizer_dir)
    trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert resumed.controller.ticks == straight.controller.ticks == 4
    for name, tensor in straight.controller.state_dict().items():
        torch.testing.assert_close(resumed.controller.state_dict()[name], tensor, rtol=1e-5, atol=1e-6,
                                   equal_nan=True, msg=name)


def test_a_model_with_nothing_to_train_is_refused_at_trainer_construction(tmp_path, dataset, word_tokenizer_dir):
    model = chronovisor.wrap(build_toy("mixtral-tiny", seed=0), PTConfig(), freeze_base=True)
    with pytest.raises(ValueError, match=r"nothing to train .*PTConfig\(learnable=True\)"):
        _trainer(model, tmp_path, dataset, word_tokenizer_dir)


def test_the_wrapper_state_dict_keeps_trainable_base_weights_once_and_loads_back_strictly():
    model = chronovisor.wrap(build_toy("mixtral-tiny", seed=0, tie_word_embeddings=True), PTConfig(learnable=True))
    state = model.state_dict()
    tied = [name for name in ("model.model.embed_tokens.weight", "model.lm_head.weight") if name in state]
    assert len(tied) == 1                                       # one name per shared tensor
    assert "_extra_state" in state and any(name.startswith("controller.") for name in state)
    model.load_state_dict(state)                                # strict: nothing counts as missing
    model.freeze_base()
    assert set(model.state_dict()) == {name for name in state if not name.startswith("model.")}
    model.load_state_dict(model.state_dict())


def test_optimizer_step_mode_observes_in_training_and_freezes_forward_and_generate_in_eval():
    model = _wrapped()
    model.step_mode = "optimizer"
    ids = torch.arange(4, 12).reshape(1, 8)
    model.train()
    model(input_ids=ids, labels=ids)
    assert model.controller.ticks == 0 and float(model.controller._tick_counts.sum()) > 0
    model.optimizer_step()
    assert model.controller.ticks == 1 and float(model.controller._tick_counts.sum()) == 0
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert model.controller.ticks == 1 and float(model.controller._tick_counts.sum()) == 0
