"""The user surface: ``wrap``, ``load`` and :class:`ChronovisorModel` (PEFT-like).

    import chronovisor
    model = chronovisor.wrap(hf_moe_model, chronovisor.PTConfig(eta=0.015, pressure_scale=0.5))
    out = model(input_ids=ids, labels=ids)      # routers modulated; one controller step() afterwards
    with model.disable_controller():            # the exact base model, for paired baselines
        base_out = model(input_ids=ids, labels=ids)
    model.save_pretrained("my-controller")      # kilobytes: the controller only
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chronovisor.controllers import PTConfig, PTController
from chronovisor.wrappers import Attachment, ModelInfo, Routers, build_toy, discover, list_presets
from chronovisor.wrappers.toy import closest_preset

#: ``step_mode`` values: ``"auto"`` steps the controller after every call, ``"manual"`` leaves it to the caller.
STEP_MODES = ("auto", "manual")


@dataclass
class RoutingRecord:
    """Per-token routing of every MoE layer, filled when a ``record_routing()`` block ends.

    Attributes (one entry per MoE layer, all calls of the block concatenated, on the CPU):
        expert_index: ``[tokens, k]`` int64 selected experts (tokens = flattened batch × sequence,
            in router call order).
        token_mask: ``[tokens]`` bool, True for real (non-padding) tokens.
        weights: ``[tokens, k]`` mixing weights.
        layer_names: router module paths; ``layer_stacks``: ``"encoder"``/``"decoder"`` per layer.
    """

    layer_names: list[str]
    layer_stacks: list[str]
    expert_index: list[torch.Tensor] = field(default_factory=list)
    token_mask: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)


def _execution_device(info: ModelInfo) -> torch.device:
    """Where the first router runs; the controller's state lives there (``meta`` falls back to CPU)."""
    device = torch.device(info.router_devices[0])
    return torch.device("cpu") if device.type == "meta" else device


class ChronovisorModel(nn.Module):
    """A HuggingFace MoE model with a P×T controller hooked into its routers.

    Calls (``forward``, ``generate``) go to the HF model; attributes the wrapper does not have
    itself are looked up on the HF model, as with PEFT's ``PeftModel`` (so ``wrapped.config`` is
    the HF config and ``wrapped.base_model`` is the HF backbone, transformers' meaning of the name).
    With ``step_mode="auto"`` the controller steps once after every forward (passing
    ``outputs.loss`` when there is one) and once after every ``generate`` call; with
    ``step_mode="manual"`` the caller runs ``model.controller.step()``.

    Args:
        model: the transformers MoE model.
        controller: the :class:`~chronovisor.controllers.PTController`, shaped like the hooked routers.
        step_mode: ``"auto"`` or ``"manual"`` (see above).
        routers: which routers to hook, from :func:`chronovisor.wrappers.discover` on ``model``
            (e.g. ``discover(model, stacks=("decoder",))``); None hooks every router.

    Attributes:
        model: the wrapped transformers model, task head included (unchanged apart from router
            hooks); :meth:`get_base_model` returns it too.
        controller: the :class:`~chronovisor.controllers.PTController`.
        info: the :class:`~chronovisor.wrappers.ModelInfo` of the hooked routers (family, paths, shape).
        attachment: the hooks (:class:`~chronovisor.wrappers.Attachment`).
    """

    def __init__(self, model: nn.Module, controller: PTController, step_mode: str = "auto", *,
                 routers: Routers | None = None):
        super().__init__()
        if routers is not None and routers.model is not model:
            raise ValueError("ChronovisorModel: `routers` was discovered on another model; "
                             "pass discover(model) of the model being wrapped")
        self.model = model
        self.controller = controller
        self.attachment: Attachment = (routers or discover(model)).attach(controller)
        self.info: ModelInfo = self.attachment.info
        self.step_mode = step_mode

    # -------------------------------------------------------------- forwarding
    @property
    def step_mode(self) -> str:
        """``"auto"`` (the controller steps after every call) or ``"manual"``; assignable."""
        return self._step_mode

    @step_mode.setter
    def step_mode(self, value: str) -> None:
        if value not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {', '.join(map(repr, STEP_MODES))}, got {value!r}")
        self._step_mode = value

    def _after_call(self, loss: torch.Tensor | None) -> None:
        if self._step_mode == "auto" and self.attachment.enabled:
            self.controller.step(loss=loss)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.model(*args, **kwargs)
        self._after_call(getattr(outputs, "loss", None))
        return outputs

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate``; every decoding step is observed, the controller steps once after."""
        outputs = self.model.generate(*args, **kwargs)
        self._after_call(None)
        return outputs

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not yet set during __init__
                raise
            return getattr(self.model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model, task head included (PEFT's ``get_base_model``)."""
        return self.model

    # ----------------------------------------------------------- PEFT surface
    @contextmanager
    def disable_controller(self) -> Iterator[ChronovisorModel]:
        """Inside the block the model is exactly the base model: no modulation, no counts, no step."""
        with self.attachment.disabled():
            yield self

    @contextmanager
    def record_routing(self, keep_weights: bool = True) -> Iterator[RoutingRecord]:
        """Record every router call in the block; the record is filled (on the CPU) when it ends."""
        record = RoutingRecord(layer_names=list(self.info.router_paths), layer_stacks=list(self.info.router_stacks))
        with self.attachment.record_routing(keep_weights=keep_weights) as recorder:
            yield record
        host = recorder.to_host()
        record.expert_index = host["expert_index"]
        record.token_mask = host["token_mask"]
        record.weights = host.get("weights", [])

    def freeze_base(self) -> ChronovisorModel:
        """``requires_grad_(False)`` on every base parameter: only the controller can train."""
        self.model.requires_grad_(False)
        return self

    def trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts over the base model and the controller."""
        total = trainable = 0
        for parameter in self.parameters():
            total += parameter.numel()
            if parameter.requires_grad:
                trainable += parameter.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        share = 100.0 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.6f}")

    def unwrap(self) -> nn.Module:
        """Remove every hook and return the base model as it was."""
        self.attachment.remove()
        return self.model

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the controller only: ``controller.safetensors`` + ``controller_config.json``.

        The JSON also records the base model's name or path, the family, the router paths and the
        versions of chronovisor, torch, transformers and accelerate.
        """
        import accelerate
        import transformers

        import chronovisor

        base_config = getattr(self.model, "config", None)
        metadata = {
            "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None,
            "family": self.info.family,
            "model_class": self.info.model_class,
            "router_paths": list(self.info.router_paths),
            "versions": {
                "chronovisor": chronovisor.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "accelerate": accelerate.__version__,
            },
        }
        return self.controller.save(directory, metadata=metadata)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, is_trainable: bool = False,
                        step_mode: str = "auto", *, stacks: Sequence[str] | None = None) -> ChronovisorModel:
        """Wrap ``model`` with the controller saved in ``directory``.

        The saved config is used as is. Raises ValueError naming the mismatch when the controller
        was saved for another shape (layers, experts, top-k) or family.

        Args:
            model: the transformers model.
            directory: written by :meth:`save_pretrained`.
            is_trainable: keep the learnable offsets (if any) trainable; False freezes them.
            step_mode: ``"auto"`` or ``"manual"`` (see :class:`ChronovisorModel`).
            stacks: hook only the routers of these stacks, as when the controller was saved
                (see :func:`chronovisor.wrappers.discover`).
        """
        saved = PTController.read_description(directory)
        routers = discover(model, stacks=stacks)
        info = routers.info
        if saved.get("family") not in (None, info.family):
            raise ValueError(f"controller in {directory} was saved for the {saved['family']} family, "
                             f"but {info.model_class} is {info.family}")
        mismatches = info.shape_mismatches(saved)
        if mismatches:
            raise ValueError(f"controller in {directory} does not fit {info.model_class}: it has "
                             f"{', '.join(mismatches)}")
        controller = PTController.load(directory, map_location=_execution_device(info))
        controller.requires_grad_(is_trainable)
        return cls(model, controller, step_mode, routers=routers)


def wrap(model: nn.Module, config: PTConfig | None = None, *, step_mode: str = "auto",
         freeze_base: bool = False, stacks: Sequence[str] | None = None) -> ChronovisorModel:
    """Hook a fresh P×T controller into the MoE routers of ``model``.

    The controller is shaped from the model (MoE layers × experts, top-k) and placed on the device
    where the first router runs (accelerate's execution device for a dispatched model); its fields
    are moved to each router's output device per call, so models spread over several devices work.

    Args:
        model: the transformers MoE model.
        config: the controller's :class:`~chronovisor.controllers.PTConfig` (default: ``PTConfig()``),
            or a sequence of them for a stacked controller.
        step_mode: ``"auto"`` steps the controller after every forward / ``generate``; ``"manual"``
            leaves ``model.controller.step()`` to the caller.
        freeze_base: ``requires_grad_(False)`` on every parameter of ``model`` (controller-only training).
        stacks: hook only the routers of these stacks, e.g. ``("decoder",)`` to leave Switch
            Transformers' encoder routers out; the controller then has one layer per hooked router.
            None hooks every router. An unknown stack raises a ValueError listing the valid ones.
    """
    routers = discover(model, stacks=stacks)
    info = routers.info
    controller = PTController(info.num_layers, info.num_experts, info.top_k, config or PTConfig())
    controller.to(_execution_device(info))
    wrapped = ChronovisorModel(model, controller, step_mode, routers=routers)
    if freeze_base:
        wrapped.freeze_base()
    return wrapped


def load_base_model(name_or_path: str, *, seed: int = 0, device_map: str | dict | None = None,
                    max_memory: dict | None = None, offload_folder: str | Path | None = None,
                    torch_dtype: torch.dtype | str | None = None) -> nn.Module:
    """A transformers model from a toy preset name, a local directory or a hub id.

    Toy presets are built from config with seeded weights (``seed``); directories and hub ids go
    through ``from_pretrained`` with accelerate's ``device_map`` / ``max_memory`` /
    ``offload_folder`` (layers placed on GPUs first, then CPU, then disk). Encoder-decoder configs
    load as ``AutoModelForSeq2SeqLM``, everything else as ``AutoModelForCausalLM``.
    """
    if name_or_path in list_presets():
        model = build_toy(name_or_path, seed=seed)
        model.config.name_or_path = name_or_path  # recorded by save_pretrained as the base model
        if torch_dtype is not None:
            model = model.to(_dtype(torch_dtype))
        if device_map is not None:
            from accelerate import dispatch_model, infer_auto_device_map

            if isinstance(device_map, str):
                model.tie_weights()
                device_map = infer_auto_device_map(model, max_memory=max_memory,
                                                   no_split_module_classes=model._no_split_modules)
            model = dispatch_model(model, device_map=device_map, offload_dir=offload_folder)
        return model.eval()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path} is a path but holds no config.json (not a transformers model "
                                f"directory); toy presets are: {', '.join(list_presets())}")
    guess = None if path.exists() else closest_preset(name_or_path)
    if guess is not None:  # fail fast instead of asking the hub (which retries) for a typo
        raise FileNotFoundError(f"unknown model {name_or_path!r}: did you mean the toy preset {guess!r}? "
                                f"(not a local directory; presets: {', '.join(list_presets())})")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as error:
        raise FileNotFoundError(
            f"cannot load {name_or_path!r}: not a toy preset ({', '.join(list_presets())}), not a local model "
            f"directory, and the hub could not provide it ({error.__class__.__name__})"
        ) from error
    auto_class = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    kwargs: dict[str, Any] = {}
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    if torch_dtype is not None:
        kwargs["dtype"] = _dtype(torch_dtype)
    return auto_class.from_pretrained(name_or_path, **kwargs).eval()


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {value!r} (e.g. float32, bfloat16, float16)")
    return dtype


def load(name_or_path: str, config: PTConfig | None = None, *, controller_dir: str | Path | None = None,
         seed: int = 0, device_map: str | dict | None = None, max_memory: dict | None = None,
         offload_folder: str | Path | None = None, torch_dtype: torch.dtype | str | None = None,
         step_mode: str = "auto", freeze_base: bool = False, is_trainable: bool = False,
         stacks: Sequence[str] | None = None) -> ChronovisorModel:
    """Load a model (see :func:`load_base_model`) and wrap it.

    With ``controller_dir`` the controller saved there is restored (its saved config wins and
    ``config`` must be None; ``is_trainable`` as in :meth:`ChronovisorModel.from_pretrained`);
    otherwise a fresh controller with ``config`` is attached. ``freeze_base``, ``step_mode`` and
    ``stacks`` as in :func:`wrap`; the other arguments as in :func:`load_base_model`.
    """
    base = load_base_model(name_or_path, seed=seed, device_map=device_map, max_memory=max_memory,
                           offload_folder=offload_folder, torch_dtype=torch_dtype)
    if controller_dir is not None:
        if config is not None:
            raise ValueError("pass either config or controller_dir to chronovisor.load, not both")
        wrapped = ChronovisorModel.from_pretrained(base, controller_dir, is_trainable=is_trainable,
                                                   step_mode=step_mode, stacks=stacks)
    else:
        wrapped = wrap(base, config, step_mode=step_mode, stacks=stacks)
    if freeze_base:
        wrapped.freeze_base()
    return wrapped
