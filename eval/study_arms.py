"""The arms of the frozen real-text study: what each one wraps, and which parameters it may train.

``off``
    The frozen base as it is (wrapped with a ``mode="off"`` controller, so routing is recorded).
``placebo``, ``pt``
    The frozen protocol: a P×T controller runs online over the adaptation stream (one tick per batch,
    no gradient), then is evaluated with its fields frozen. ``placebo`` is the harness's placebo arm.
``controller_only``
    Only the controller's learnable offsets (δb, δlogT) train, by AdamW on the stream (ticks on).
``router_only``
    The standard parameter-efficient baseline: only the routers' weights train.
``lora``
    LoRA via PEFT (``get_peft_model`` on the bare base, before wrapping) on every layer's q/k/v/o
    attention projections; only the adapters train.

Every arm starts from a fresh copy of the same checkpoint; the trainable-parameter count is what
its optimiser updates (0 for the forward-only arms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chronovisor.controllers import PTConfig
from chronovisor.eval.specs import variant_config
from chronovisor.eval.study_config import StudyConfig

#: Arms that adapt by running the controller online (no optimiser).
ONLINE_ARMS = ("placebo", "pt")
#: Arms that adapt with an optimiser, and the config key of their learning rate.
TRAINED_ARMS = {"controller_only": "controller_lr", "router_only": "router_lr", "lora": "lora_lr"}
#: Arms whose base weights must come out bit-identical.
FROZEN_BASE_ARMS = ("off", "placebo", "pt", "controller_only")
#: The attention projections LoRA adapts (Mixtral's module names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class PreparedArm:
    """One arm ready to adapt.

    Attributes:
        arm: its name (one of :data:`~chronovisor.eval.study_config.STUDY_ARMS`).
        wrapped: the ``ChronovisorModel`` (step mode manual).
        trainable: the parameters the arm's optimiser updates (empty for off/placebo/pt).
    """

    arm: str
    wrapped: torch.nn.Module
    trainable: list[torch.nn.Parameter]

    @property
    def trainable_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.trainable)


def arm_pt_config(arm: str, config: StudyConfig, seed: int) -> PTConfig:
    """The controller an arm is wrapped with (``mode="off"`` for off, router_only and lora)."""
    fields = dict(eta=config.eta, pressure_scale=config.pressure_scale, seed=seed)
    if arm in ONLINE_ARMS:
        return variant_config(arm, **fields)
    if arm == "controller_only":
        return variant_config("pt", **fields, learnable=True)
    return PTConfig(mode="off", seed=seed)


def prepare_arm(arm: str, model_dir: str, config: StudyConfig, seed: int) -> PreparedArm:
    """Load a fresh copy of the checkpoint, freeze it, attach the arm's adapters and controller.

    Args:
        arm: the arm's name.
        model_dir: the checkpoint directory (``save_pretrained``).
        config: the study config (controller settings, LoRA rank).
        seed: seeds the controller and the LoRA init.
    """
    import chronovisor
    from chronovisor.model import load_base_model

    base = load_base_model(model_dir)
    base.requires_grad_(False)
    if arm == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        # Injects the adapters into `base` in place; wrapping `base` then routes through them.
        get_peft_model(base, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                                        target_modules=list(LORA_TARGETS)))
    wrapped = chronovisor.wrap(base, arm_pt_config(arm, config, seed), step_mode="manual")
    if arm == "controller_only":
        trainable = [p for p in wrapped.controller.parameters() if p.requires_grad]
    elif arm == "router_only":
        trainable = [p for path in wrapped.info.router_paths for p in base.get_submodule(path).parameters()]
        for parameter in trainable:
            parameter.requires_grad_(True)
    elif arm == "lora":
        trainable = [p for name, p in base.named_parameters() if "lora_" in name]
    else:
        trainable = []
    return PreparedArm(arm, wrapped, trainable)
