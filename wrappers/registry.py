"""The one registry of supported MoE families: detection, ``describe`` and ``attach``.

    info = describe(model)            # which family, where the routers are, the controller's shape
    controller = PTController(info.num_layers, info.num_experts, info.top_k, config)
    attachment = attach(model, controller)
    ...                               # model(...) as usual; controller.step() after each forward
    attachment.remove()

Detection is by router module class (``type(module).__name__``), one family per model.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from chronovisor.wrappers import (
    deepseek_v3,
    gpt_oss,
    granitemoe,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_moe,
    switch_transformers,
)
from chronovisor.wrappers.base import (
    Attachment,
    FamilyAdapter,
    RouterLayoutError,
    RouterSite,
    UnsupportedModelError,
    WrapperError,
)

if TYPE_CHECKING:  # pragma: no cover
    from chronovisor.controllers import PTController

#: Every supported family, by name.
ADAPTERS: dict[str, FamilyAdapter] = {
    adapter.family: adapter
    for adapter in (
        mixtral.ADAPTER,
        switch_transformers.ADAPTER,
        qwen2_moe.ADAPTER,
        qwen3_moe.ADAPTER,
        olmoe.ADAPTER,
        deepseek_v3.ADAPTER,
        gpt_oss.ADAPTER,
        granitemoe.ADAPTER,
        phimoe.ADAPTER,
    )
}

_ROUTER_CLASS_TO_FAMILY = {cls: adapter.family for adapter in ADAPTERS.values() for cls in adapter.router_classes}

# Module class names and config attributes that suggest a Mixture-of-Experts model we do not know.
_MOE_CLASS_HINT = re.compile(r"Router|Gating|TopK|Topk|SparseMoe|MoE|Moe|Experts|Expert")
_MOE_CONFIG_HINTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "ffn_config")


def supported_families() -> list[str]:
    """Names of the supported families (``config.model_type`` spelling)."""
    return list(ADAPTERS)


def _families_text() -> str:
    return ", ".join(f"{name} ({'/'.join(adapter.router_classes)})" for name, adapter in ADAPTERS.items())


@dataclass(frozen=True)
class ModelInfo:
    """What Chronovisor sees in a model; enough to build the controller with the right shape.

    Attributes:
        family: the family name (e.g. ``"mixtral"``).
        model_type: ``model.config.model_type`` (None without a config).
        model_class: the model's class name.
        router_class: the router module class that gets hooked.
        router_paths: module path of each MoE router, in controller layer order.
        router_stacks: ``"decoder"`` per router (Switch: ``"encoder"`` / ``"decoder"``).
        router_devices: where each router runs (accelerate's execution device when dispatched,
            else its parameters' device; ``"meta"`` only for a model not materialised at all).
        num_layers: number of MoE routers L (the controller's first dimension).
        num_experts: experts per router E.
        top_k: experts selected per token K.
        selection_rule: one line describing the family's selection.
        supports_selection_bias: whether the ``loss_free`` comparator can be used.
    """

    family: str
    model_type: str | None
    model_class: str
    router_class: str
    router_paths: tuple[str, ...]
    router_stacks: tuple[str, ...]
    router_devices: tuple[str, ...]
    num_layers: int
    num_experts: int
    top_k: int
    selection_rule: str
    supports_selection_bias: bool

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("router_paths", "router_stacks", "router_devices"):
            data[key] = list(data[key])
        return data

    def summary(self) -> str:
        """A few human-readable lines (for ``chronovisor inspect``)."""
        lines = [
            f"model:      {self.model_class} (model_type={self.model_type})",
            f"family:     {self.family}",
            f"routers:    {self.num_layers} x {self.router_class}, {self.num_experts} experts, top-{self.top_k}",
            f"selection:  {self.selection_rule}",
            f"loss_free:  {'supported' if self.supports_selection_bias else 'not supported'}",
        ]
        for layer, (path, stack, device) in enumerate(zip(self.router_paths, self.router_stacks, self.router_devices, strict=True)):
            lines.append(f"  layer {layer:>3}  {path}  [{stack}, {device}]")
        return "\n".join(lines)


def _router_device(module: nn.Module) -> str:
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return str(device) if not isinstance(device, int) else f"cuda:{device}"
    for tensor in module.parameters():
        return str(tensor.device)
    return "cpu"


def detect(model: nn.Module) -> tuple[FamilyAdapter, list[RouterSite], int, int]:
    """Find the family and its routers: ``(adapter, sites, num_experts, top_k)``.

    Raises:
        UnsupportedModelError: no router of a supported family (MoE-looking or not), or routers
            of two families in one model. The message lists the supported families.
        RouterLayoutError: a supported family's router (or model type) whose layout this
            transformers version does not match; the message names the module path.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    found: dict[str, str] = {}                                    # family -> first router path
    for path, module in model.named_modules():
        family = _ROUTER_CLASS_TO_FAMILY.get(type(module).__name__)
        if family is not None:
            found.setdefault(family, path)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not found:
        for adapter in ADAPTERS.values():
            if model_type in adapter.model_types:
                raise RouterLayoutError(
                    f"{type(model).__name__} is a {adapter.family} model but has no "
                    f"{'/'.join(adapter.router_classes)} module: this transformers version lays the "
                    f"family out differently than chronovisor.wrappers.{adapter.family} expects"
                )
        hints = [f"{type(module).__name__} at '{path}'" for path, module in model.named_modules()
                 if path and _MOE_CLASS_HINT.search(type(module).__name__)]
        config = getattr(model, "config", None)
        config_hints = [name for name in _MOE_CONFIG_HINTS if getattr(config, name, None)]
        if hints or config_hints:
            evidence = hints[0] if hints else f"config.{config_hints[0]}"
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type={model_type}) looks like a Mixture-of-Experts model "
                f"({evidence}) but its family is not supported; supported families are: {_families_text()}"
            )
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type}) has no Mixture-of-Experts router; "
            f"supported families are: {_families_text()}"
        )
    if len(found) > 1:
        raise UnsupportedModelError(
            f"{type(model).__name__} mixes routers of several families "
            f"({', '.join(f'{f} at {p!r}' for f, p in found.items())}); one family per model is supported"
        )
    adapter = ADAPTERS[next(iter(found))]
    sites = adapter.find_routers(model)
    shapes = [adapter.router_shape(site) for site in sites]
    num_experts, top_k = shapes[0]
    for site, shape in zip(sites, shapes, strict=True):
        if shape != (num_experts, top_k):
            raise RouterLayoutError(
                f"the {adapter.family} router at '{site.path}' has {shape[0]} experts / top-{shape[1]}, but "
                f"'{sites[0].path}' has {num_experts} / top-{top_k}: one controller needs the same shape everywhere"
            )
    if top_k > num_experts:
        raise RouterLayoutError(f"the {adapter.family} router at '{sites[0].path}' selects top-{top_k} "
                                f"of only {num_experts} experts")
    return adapter, sites, num_experts, top_k


def describe(model: nn.Module) -> ModelInfo:
    """Describe a model's MoE routers (see :class:`ModelInfo`); raises like :func:`detect`."""
    return _inspect(model)[0]


def _inspect(model: nn.Module) -> tuple[ModelInfo, FamilyAdapter, list[RouterSite]]:
    adapter, sites, num_experts, top_k = detect(model)
    info = ModelInfo(
        family=adapter.family,
        model_type=getattr(getattr(model, "config", None), "model_type", None),
        model_class=type(model).__name__,
        router_class=type(sites[0].module).__name__,
        router_paths=tuple(site.path for site in sites),
        router_stacks=tuple(site.stack for site in sites),
        router_devices=tuple(_router_device(site.module) for site in sites),
        num_layers=len(sites),
        num_experts=num_experts,
        top_k=top_k,
        selection_rule=adapter.selection_rule,
        supports_selection_bias=adapter.supports_selection_bias,
    )
    return info, adapter, sites


def attach(model: nn.Module, controller: PTController) -> Attachment:
    """Hook ``controller`` into every MoE router of ``model``; returns the :class:`Attachment`.

    The controller must have the model's shape (``describe(model)``: num_layers, num_experts,
    top_k); its state may live on any device (fields are moved to each router's output device
    per call; keeping it on the routers' device avoids transfers, and on CUDA a controller on
    the CPU makes ``observe`` copy ids to the host). The model is not modified apart from the
    hooks; ``attachment.remove()`` restores it. A model can carry one attachment at a time.

    Raises:
        UnsupportedModelError / RouterLayoutError: see :func:`detect`.
        ValueError: controller shape mismatch, an already attached model, or ``loss_free``
            dynamics on a family without a choice-only bias (PhiMoE).
    """
    existing = getattr(model, "_chronovisor_attachment", None)
    if existing is not None and existing.attached:
        raise WrapperError(f"{type(model).__name__} already has a controller attached; call .remove() on it first")
    info, adapter, sites = _inspect(model)
    mismatches = [f"{name}={getattr(controller, name, None)} (needs {name}={getattr(info, name)})"
                  for name in ("num_layers", "num_experts", "top_k")
                  if getattr(controller, name, None) != getattr(info, name)]
    if mismatches:
        raise WrapperError(f"controller does not fit {info.model_class} ({info.family}): it has "
                           f"{'; '.join(mismatches)}; routers: {', '.join(info.router_paths)}")
    config = getattr(controller, "config", None)
    if getattr(config, "dynamics", None) == "loss_free" and not adapter.supports_selection_bias:
        raise WrapperError(f"the loss_free dynamics needs a choice-only selection bias, which the {info.family} "
                           f"family does not have ({info.selection_rule})")
    return Attachment(model, controller, adapter, sites, info)
