"""transformers' ``Trainer`` with a wrapped model: :class:`ChronovisorCallback`.

    model = chronovisor.wrap(hf_model, PTConfig(learnable=True), freeze_base=True)
    trainer = Trainer(model=model, args=TrainingArguments("out"), train_dataset=train, eval_dataset=test,
                      data_collator=collator, callbacks=[ChronovisorCallback()])
    trainer.train()                       # offsets train, base frozen; checkpoint-N/ holds the controller
    trainer.evaluate()                    # eval_loss; the controller is frozen, no tick
    trainer.train(resume_from_checkpoint=True)

The same works with a PEFT model in either order (``get_peft_model(wrapped, lora)`` or
``chronovisor.wrap(peft_model, ...)``): adapter and offsets train together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from chronovisor.controllers.persistence import CONFIG_FILE
from chronovisor.model import find_wrapper
from chronovisor.peft_support import is_peft_model, restore_controller_training


class ChronovisorCallback(TrainerCallback):
    """Connect a :class:`~chronovisor.model.ChronovisorModel` (or a PEFT model around one) to the Trainer.

    * At ``Trainer(...)`` construction: switches the wrapper to ``step_mode="optimizer"`` (the
      controller steps once per optimizer step and is frozen while the Trainer evaluates, so
      ``evaluate()`` leaves it as it was), makes offsets that ``get_peft_model`` froze trainable
      again (before the optimizer is built) and refuses a model with nothing to train.
    * After every optimizer step: one controller step, with the last training forward's loss.
    * On every checkpoint: writes the controller (``save_pretrained``) into ``checkpoint-N/``, so
      ``ChronovisorModel.from_pretrained(base, "out/checkpoint-N")`` restores it (with the adapter
      of a PEFT model).
    * On resume: reloads the controller from that checkpoint when the Trainer itself does not (a
      PEFT model on top restores only its adapter); a wrapper on top is restored by the Trainer
      through its ``state_dict``.
    """

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        wrapper = find_wrapper(model)
        wrapper.step_mode = "optimizer"
        restore_controller_training(model)
        if not any(parameter.requires_grad for parameter in model.parameters()):
            raise ValueError("ChronovisorCallback: the model has nothing to train (base frozen and no learnable "
                             "offsets): wrap with PTConfig(learnable=True), or load the controller with "
                             "is_trainable=True")

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        if state.global_step == 0 or not is_peft_model(model):
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not (checkpoint / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"ChronovisorCallback: resuming at step {state.global_step}, but {checkpoint} holds "
                                    f"no controller ({CONFIG_FILE}); resume from a checkpoint in output_dir that was "
                                    f"written with ChronovisorCallback")
        find_wrapper(model).controller.load_state(checkpoint)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        find_wrapper(model).optimizer_step()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs: Any) -> None:
        if args.should_save:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            find_wrapper(model).save_pretrained(checkpoint)
