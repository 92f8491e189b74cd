"""PEFT models inside and around a :class:`~chronovisor.model.ChronovisorModel`.

Two orders are supported (see the README's PEFT recipe):

* ``chronovisor.wrap(get_peft_model(hf_model, lora_config), config)``: the wrapper sits on top of
  the PEFT model; ``freeze_base`` keeps the adapter weights trainable, ``save_pretrained`` writes
  adapter and controller into one directory, ``from_pretrained`` restores both and
  ``merge_and_unload`` merges the adapter and keeps the controller.
* ``get_peft_model(chronovisor.wrap(hf_model, config), lora_config)``: PEFT sits on top; its
  ``get_peft_model`` freezes every non-adapter parameter, the controller's offsets included, so
  :func:`restore_controller_training` (which :class:`~chronovisor.trainer.ChronovisorCallback`
  calls) makes them trainable again.

``peft`` is imported only when the model at hand can be a PEFT model (``peft`` already imported).
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

#: The file PEFT's ``save_pretrained`` writes next to the adapter weights.
ADAPTER_CONFIG_FILE = "adapter_config.json"


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (or ``PeftMixedModel``); False whenever peft was never imported."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, (peft.PeftModel, peft.PeftMixedModel))


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters PEFT trains in ``model``: adapter weights (e.g. ``lora_A``/``lora_B``) and the
    trained copies of ``modules_to_save``.

    Args:
        model: a PEFT model (see :func:`is_peft_model`).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    prefix = getattr(model.base_model, "prefix", None)
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and prefix:
            found.update({id(p): p for name, p in module.named_parameters() if prefix in name})
        elif isinstance(module, AuxiliaryTrainingWrapper):
            trained = getattr(module, "modules_to_save", None)
            if isinstance(trained, nn.Module):
                found.update({id(p): p for p in trained.parameters()})
    return list(found.values())


def has_adapter(directory: str | Path) -> bool:
    """True when ``directory`` holds a PEFT adapter (its ``adapter_config.json``)."""
    return (Path(directory) / ADAPTER_CONFIG_FILE).is_file()


def load_adapter(model: nn.Module, directory: str | Path, is_trainable: bool) -> nn.Module:
    """``PeftModel.from_pretrained(model, directory)``: the adapter saved in ``directory`` on ``model``.

    Args:
        model: the transformers model the adapter was trained on.
        directory: holds ``adapter_config.json`` and the adapter weights.
        is_trainable: keep the adapter weights trainable (PEFT freezes them otherwise).
    """
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory), is_trainable=is_trainable)


def restore_controller_training(model: nn.Module) -> list[nn.Parameter]:
    """Make the controller offsets trainable again after ``get_peft_model`` froze them.

    Applies to every :class:`~chronovisor.model.ChronovisorModel` inside ``model`` whose offsets
    were trainable when it was built (``wrap``, or ``from_pretrained(..., is_trainable=True)``);
    offsets frozen on purpose (``controller_trainable = False``) stay frozen. Call it after
    ``get_peft_model`` and before building the optimizer. Returns the parameters it re-enabled.

    Args:
        model: a PEFT model around a ChronovisorModel (or any module containing one).
    """
    from chronovisor.model import ChronovisorModel

    enabled: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, ChronovisorModel) and module.controller_trainable:
            frozen = [p for p in module.controller.parameters() if not p.requires_grad]
            for parameter in frozen:
                parameter.requires_grad_(True)
            enabled.extend(frozen)
    return enabled
