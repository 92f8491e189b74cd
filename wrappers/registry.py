"""The registry of supported MoE families: registration, discovery, ``describe`` and ``attach``.

    info = describe(model)            # which family, where the routers are, the controller's shape
    controller = PTController(info.num_layers, info.num_experts, info.top_k, config)
    attachment = attach(model, controller)
    ...                               # model(...) as usual; controller.step() after each forward
    attachment.remove()

Each family module registers its adapter with :func:`register_family` when the
``chronovisor.wrappers`` package is imported. Detection is by router module class
(``type(module).__name__``), one family per model; ``stacks`` restricts a model's routers to some
of its stacks (e.g. only the decoder of an encoder-decoder model).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from torch import nn

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

#: Every registered family, by name (filled by :func:`register_family`).
ADAPTERS: dict[str, FamilyAdapter] = {}

#: The controller-shape fields a model and its controller must agree on.
SHAPE_FIELDS = ("num_layers", "num_experts", "top_k")

AdapterClass = TypeVar("AdapterClass", bound=type[FamilyAdapter])

# Module class names and config attributes that suggest a Mixture-of-Experts model we do not know.
_MOE_CLASS_HINT = re.compile(r"Router|Gating|TopK|Topk|SparseMoe|MoE|Moe|Experts|Expert")
_MOE_CONFIG_HINTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "ffn_config")


def register_family(adapter_class: AdapterClass) -> AdapterClass:
    """Class decorator: register a :class:`FamilyAdapter` subclass as a supported family.

    One instance of the class is created and used for every model of the family.

    Args:
        adapter_class: a concrete subclass with ``family`` and ``router_classes`` set; neither may
            be taken by an already registered family.

    Raises:
        TypeError: not a :class:`FamilyAdapter` subclass, or abstract methods left unimplemented.
        WrapperError: ``family`` / ``router_classes`` unset or already registered.
    """
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, FamilyAdapter)):
        raise TypeError(f"register_family decorates a FamilyAdapter subclass, got {adapter_class!r}")
    adapter = adapter_class()
    name = adapter_class.__name__
    if not adapter.family or not adapter.router_classes:
        raise WrapperError(f"{name}: set the class attributes `family` and `router_classes` before registering it")
    if adapter.family in ADAPTERS:
        raise WrapperError(f"family {adapter.family!r} is already registered by "
                           f"{type(ADAPTERS[adapter.family]).__name__}; give {name} another `family`")
    owners = _router_class_owners()
    for router_class in adapter.router_classes:
        if router_class in owners:
            raise WrapperError(f"router class {router_class!r} of {name} is already handled by the "
                               f"{owners[router_class]} family; one router class belongs to one family")
    ADAPTERS[adapter.family] = adapter
    return adapter_class


def _router_class_owners() -> dict[str, str]:
    """Router class name -> family name, over every registered family."""
    return {router_class: adapter.family for adapter in ADAPTERS.values() for router_class in adapter.router_classes}


def supported_families() -> list[str]:
    """Names of the registered families (``config.model_type`` spelling), sorted."""
    return sorted(ADAPTERS)


def _families_text() -> str:
    return ", ".join(f"{name} ({'/'.join(ADAPTERS[name].router_classes)})" for name in supported_families())


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

    def shape_mismatches(self, shape: Mapping[str, Any]) -> list[str]:
        """Where ``shape`` (a controller's, or a saved one's) does not fit this model.

        Args:
            shape: ``num_layers``, ``num_experts`` and ``top_k`` (missing keys count as None).

        Returns:
            ``"name=have (needs name=want)"`` for each differing field of :data:`SHAPE_FIELDS`.
        """
        return [f"{name}={shape.get(name)} (needs {name}={getattr(self, name)})"
                for name in SHAPE_FIELDS if shape.get(name) != getattr(self, name)]

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


@dataclass(frozen=True)
class Routers:
    """The routers of one model that a controller hooks into, as found by :func:`discover`.

    Attributes:
        model: the model.
        info: the :class:`ModelInfo` (the controller's shape is ``info.num_layers`` x
            ``info.num_experts``, top-``info.top_k``).
        adapter: the family adapter.
        sites: the routers, in controller layer order.
    """

    model: nn.Module = dataclasses.field(repr=False)
    info: ModelInfo
    adapter: FamilyAdapter
    sites: tuple[RouterSite, ...]

    def attach(self, controller: PTController) -> Attachment:
        """Hook ``controller`` into these routers (see :func:`attach`, which raises the same errors)."""
        model, info = self.model, self.info
        existing = getattr(model, "_chronovisor_attachment", None)
        if existing is not None and existing.attached:
            raise WrapperError(f"{type(model).__name__} already has a controller attached; call .remove() on it first")
        mismatches = info.shape_mismatches({name: getattr(controller, name, None) for name in SHAPE_FIELDS})
        if mismatches:
            raise WrapperError(f"controller does not fit {info.model_class} ({info.family}): it has "
                               f"{'; '.join(mismatches)}; routers: {', '.join(info.router_paths)}")
        if not self.adapter.supports_selection_bias and any(c.dynamics == "loss_free" for c in controller.configs):
            raise WrapperError(f"the loss_free dynamics needs a choice-only selection bias, which the {info.family} "
                               f"family does not have ({info.selection_rule}); use another dynamics")
        attachment = Attachment(model, controller, self.adapter, list(self.sites), info)
        controller.family = info.family          # recorded by controller.save()
        return attachment


def discover(model: nn.Module, *, stacks: Sequence[str] | None = None) -> Routers:
    """Find the family and the routers of ``model`` in one pass over its modules.

    Args:
        model: a transformers MoE model (any ``nn.Module`` holding routers of one supported family).
        stacks: keep only the routers of these stacks (:attr:`RouterSite.stack`: ``"decoder"`` for
            decoder-only models, ``"encoder"`` / ``"decoder"`` for Switch Transformers); the
            controller's layers are then the kept routers, renumbered from 0. None keeps them all.

    Raises:
        UnsupportedModelError: no router of a supported family (MoE-looking or not), or routers
            of two families in one model. The message lists the supported families.
        RouterLayoutError: a supported family's router (or model type) whose layout this
            transformers version does not match, or routers of different shapes; the message
            names the module path.
        WrapperError: ``stacks`` names a stack the model does not have (the message lists them).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    owners = _router_class_owners()
    base = getattr(model, "base_model", model)
    base_path = ""
    found: dict[str, list[tuple[str, nn.Module]]] = {}           # family -> its routers, in module order
    for path, module in model.named_modules():
        family = owners.get(type(module).__name__)
        if family is not None:
            found.setdefault(family, []).append((path, module))
        if path and module is base and not base_path:
            base_path = path
    if not found:
        raise _no_router_error(model)
    if len(found) > 1:
        raise UnsupportedModelError(
            f"{type(model).__name__} mixes routers of several families "
            f"({', '.join(f'{f} at {routers[0][0]!r}' for f, routers in found.items())}); "
            f"one family per model is supported"
        )
    family, routers = next(iter(found.items()))
    adapter = ADAPTERS[family]
    sites = _keep_stacks(adapter.router_sites(model, routers, base_path), stacks, family)
    num_experts, top_k = _common_shape(adapter, sites)
    info = ModelInfo(
        family=family,
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
    return Routers(model, info, adapter, tuple(sites))


def _no_router_error(model: nn.Module) -> WrapperError:
    """The error for a model without a router of a registered family, saying what it looks like."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return RouterLayoutError(
                f"{type(model).__name__} is a {adapter.family} model but has no "
                f"{'/'.join(adapter.router_classes)} module: this transformers version lays the "
                f"family out differently than chronovisor.wrappers.{adapter.family} expects"
            )
    hints = [f"{type(module).__name__} at '{path}'" for path, module in model.named_modules()
             if path and _MOE_CLASS_HINT.search(type(module).__name__)]
    config_hints = [name for name in _MOE_CONFIG_HINTS if getattr(config, name, None)]
    if hints or config_hints:
        evidence = hints[0] if hints else f"config.{config_hints[0]}"
        return UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type}) looks like a Mixture-of-Experts model "
            f"({evidence}) but its family is not supported; supported families are: {_families_text()}"
        )
    return UnsupportedModelError(
        f"{type(model).__name__} (model_type={model_type}) has no Mixture-of-Experts router; "
        f"supported families are: {_families_text()}"
    )


def _keep_stacks(sites: list[RouterSite], stacks: Sequence[str] | None, family: str) -> list[RouterSite]:
    """The sites of the requested stacks, renumbered 0..n-1 (all of them for ``stacks=None``)."""
    if stacks is None:
        return sites
    available = tuple(dict.fromkeys(site.stack for site in sites))
    if isinstance(stacks, str) or not stacks or any(stack not in available for stack in stacks):
        raise WrapperError(f"stacks={stacks!r} is not a non-empty sequence of this {family} model's stacks; "
                           f"valid values: {', '.join(repr(stack) for stack in available)}, e.g. "
                           f"stacks=({available[-1]!r},)")
    kept = [site for site in sites if site.stack in stacks]
    return [dataclasses.replace(site, layer=layer) for layer, site in enumerate(kept)]


def _common_shape(adapter: FamilyAdapter, sites: list[RouterSite]) -> tuple[int, int]:
    """``(num_experts, top_k)`` shared by every site; :class:`RouterLayoutError` otherwise."""
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
    return num_experts, top_k


def describe(model: nn.Module, *, stacks: Sequence[str] | None = None) -> ModelInfo:
    """Describe a model's MoE routers (see :class:`ModelInfo`).

    Args:
        model: the transformers model.
        stacks: describe only the routers of these stacks; see :func:`discover`, which raises the
            same errors.
    """
    return discover(model, stacks=stacks).info


def attach(model: nn.Module, controller: PTController, *, stacks: Sequence[str] | None = None) -> Attachment:
    """Hook ``controller`` into the MoE routers of ``model``; returns the :class:`Attachment`.

    The controller must have the model's shape (``describe(model, stacks=stacks)``: num_layers,
    num_experts, top_k); its state may live on any device (fields are moved to each router's
    output device per call; keeping it on the routers' device avoids transfers, and on CUDA a
    controller on the CPU makes ``observe`` copy ids to the host). The model is not modified apart
    from the hooks; ``attachment.remove()`` restores it. A model can carry one attachment at a time.

    Args:
        model: the transformers model.
        controller: the :class:`~chronovisor.controllers.PTController` (single or stacked).
        stacks: hook only the routers of these stacks (see :func:`discover`); the others run
            untouched and the controller never sees them.

    Raises:
        UnsupportedModelError / RouterLayoutError: see :func:`discover`.
        WrapperError (a ValueError): controller shape mismatch, an already attached model, an
            unknown stack, or ``loss_free`` dynamics on a family without a choice-only bias (PhiMoE).
    """
    return discover(model, stacks=stacks).attach(controller)
