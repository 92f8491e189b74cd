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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chronovisor.controllers import PTConfig, PTController
from chronovisor.peft_support import adapter_parameters, has_adapter, is_peft_model, load_adapter
from chronovisor.wrappers import Attachment, ModelInfo, Routers, build_toy, discover, list_presets
from chronovisor.wrappers.toy import closest_preset

#: ``step_mode`` values: ``"auto"`` steps the controller after every call, ``"manual"`` leaves it to the
#: caller, ``"optimizer"`` steps once per optimizer step and freezes the controller in eval mode (trainers).
STEP_MODES = ("auto", "manual", "optimizer")


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
    ``step_mode="manual"`` the caller runs ``model.controller.step()``. ``step_mode="optimizer"``
    is for training loops and transformers' Trainer (:class:`~chronovisor.trainer.ChronovisorCallback`
    sets it): in training mode every forward is observed and :meth:`optimizer_step` steps the
    controller once per optimizer step; in eval mode (``model.eval()``) the controller is frozen:
    the routers are steered by its current fields, it observes nothing and never steps.

    ``state_dict()`` holds what training can change: the controller (state, offsets, tick) and the
    base parameters that require grad (PEFT adapter weights, or all of them when the base is not
    frozen, tied weights once); frozen base weights are left out, as from a PEFT adapter, and
    ``load_state_dict`` does not count them as missing.

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
        self._controller_trainable = any(p.requires_grad for p in controller.parameters())
        self._pending_loss: torch.Tensor | None = None
        self.register_state_dict_post_hook(_leave_out_frozen_base)
        self.register_load_state_dict_post_hook(_allow_left_out_base)

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

    @property
    def controller_trainable(self) -> bool:
        """Whether the controller's learnable offsets are meant to train (True after ``wrap`` of a
        learnable config); assigning sets their ``requires_grad``. A training forward raises if
        they were frozen behind this flag's back (as ``get_peft_model`` does)."""
        return self._controller_trainable

    @controller_trainable.setter
    def controller_trainable(self, value: bool) -> None:
        self.attachment.controller.requires_grad_(bool(value))
        self._controller_trainable = bool(value) and any(True for _ in self.attachment.controller.parameters())

    def _after_call(self, loss: torch.Tensor | None) -> None:
        if self._step_mode == "auto" and self.attachment.enabled and self.attachment.attached:
            self.controller.step(loss=loss)

    def _check_controller(self) -> None:
        """Refuse the two ways PEFT can silently cut the controller out of training."""
        if self._modules["controller"] is not self.attachment.controller:
            raise ValueError(
                f"the controller was replaced by a {type(self._modules['controller']).__name__} (PEFT's "
                f"modules_to_save=['controller'] trains a copy that the router hooks never use): leave 'controller' "
                f"out of modules_to_save; after get_peft_model call "
                f"chronovisor.peft_support.restore_controller_training(peft_model) (ChronovisorCallback does it "
                f"under the Trainer) and save the controller with the ChronovisorModel's save_pretrained")
        if (self._controller_trainable and self.training and torch.is_grad_enabled()
                and not all(p.requires_grad for p in self.attachment.controller.parameters())):
            raise RuntimeError(
                "the controller's offsets were frozen after wrapping (get_peft_model freezes every parameter that "
                "is not an adapter): call chronovisor.peft_support.restore_controller_training(peft_model) before "
                "building the optimizer (ChronovisorCallback does it under the Trainer), or set "
                "model.controller_trainable = False to freeze them on purpose")

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; the named arguments are passed on when given.

        They are spelled out so that transformers' Trainer keeps these dataset columns and finds
        ``labels`` (its ``eval_loss``) with default ``TrainingArguments``; everything else goes
        through ``kwargs``.
        """
        named = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask}
        kwargs.update({name: value for name, value in named.items() if value is not None})
        self._check_controller()
        with self._frozen_in_eval():
            outputs = self.model(**kwargs)
        loss = getattr(outputs, "loss", None)
        if self._step_mode != "optimizer":
            self._after_call(loss)
        elif self.training and self.attachment.enabled:
            self._pending_loss = loss.detach() if torch.is_tensor(loss) else None
        return outputs

    def optimizer_step(self) -> None:
        """One controller step after an optimizer step (``step_mode="optimizer"``), with the loss of
        the last training forward (what :class:`~chronovisor.trainer.ChronovisorCallback` calls)."""
        if self.attachment.enabled:
            self.controller.step(loss=self._pending_loss)
        self._pending_loss = None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate``; every decoding step is observed, the controller steps once after
        (``step_mode="optimizer"`` in eval mode: frozen, nothing observed, no step)."""
        with self._frozen_in_eval():
            outputs = self.model.generate(*args, **kwargs)
        self._after_call(None)
        return outputs

    def _frozen_in_eval(self) -> Any:
        """The attachment's ``frozen()`` block for ``step_mode="optimizer"`` in eval mode, else a no-op."""
        return self.attachment.frozen() if self._step_mode == "optimizer" and not self.training else nullcontext()

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
        """``requires_grad_(False)`` on every base parameter: only the controller can train.

        On a PEFT model the adapter weights (and ``modules_to_save`` copies) keep their
        ``requires_grad``: adapter and controller train together.
        """
        keep = {id(p) for p in adapter_parameters(self.model)} if is_peft_model(self.model) else set()
        for parameter in self.model.parameters():
            if id(parameter) not in keep:
                parameter.requires_grad_(False)
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
        """Remove every hook and return the base model as it was; the controller no longer ticks."""
        self.attachment.remove()
        return self.model

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> ChronovisorModel:
        """Merge the PEFT adapter into the base weights and keep the controller.

        Runs ``PeftModel.merge_and_unload(*args, **kwargs)`` and returns a new ChronovisorModel of
        the merged transformers model with this controller (same routers, same step mode); this
        wrapper's hooks are removed. ``unwrap().merge_and_unload()`` gives the plain merged model.
        """
        if not is_peft_model(self.model):
            raise ValueError(f"merge_and_unload: the wrapped {type(self.model).__name__} is not a PEFT model, so there "
                             f"is no adapter to merge; unwrap() returns the base model")
        stacks = tuple(dict.fromkeys(self.info.router_stacks))
        self.attachment.remove()
        merged = self.model.merge_and_unload(*args, **kwargs)
        return ChronovisorModel(merged, self.controller, self._step_mode, routers=discover(merged, stacks=stacks))

    def get_extra_state(self) -> torch.Tensor:
        """The controller's tick count, kept in ``state_dict()`` so that a resumed run keeps its schedule."""
        return torch.tensor(self.attachment.controller.ticks, dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.attachment.controller.ticks = int(state)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the controller: ``controller.safetensors`` + ``controller_config.json``.

        The JSON also records the base model's name or path, the family, the router paths and the
        versions of chronovisor, torch, transformers and accelerate. When the wrapped model is a
        PEFT model its adapter is written into the same directory (PEFT's ``save_pretrained``), so
        :meth:`from_pretrained` restores both; the base weights are never written. (A PEFT model
        *around* the wrapper saves its adapter itself: ``peft_model.save_pretrained(directory)``.)
        """
        if is_peft_model(self.model):
            self.model.save_pretrained(str(directory))
        import accelerate
        import transformers

        import chronovisor

        base_config = getattr(self.model, "config", None)
        metadata = {
            "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None,
            "model_class": self.info.model_class,
            "router_paths": list(self.info.router_paths),
            "adapter_inside": is_peft_model(self.model),
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
        was saved for another shape (layers, experts, top-k) or family. When ``directory`` also
        holds the adapter of a wrapped PEFT model (``chronovisor.wrap(peft_model)``, saved by
        :meth:`save_pretrained`) it is loaded onto ``model`` first. An adapter trained *around* the
        wrapper (``get_peft_model(wrapped)``) goes on top afterwards:
        ``PeftModel.from_pretrained(ChronovisorModel.from_pretrained(base, d), d)``.

        Args:
            model: the transformers model.
            directory: written by :meth:`save_pretrained`.
            is_trainable: keep the learnable offsets (if any) and the adapter trainable; False freezes them.
            step_mode: ``"auto"`` or ``"manual"`` (see :class:`ChronovisorModel`).
            stacks: hook only the routers of these stacks, as when the controller was saved
                (see :func:`chronovisor.wrappers.discover`).
        """
        saved = PTController.read_description(directory)
        if saved.description.get("adapter_inside") and has_adapter(directory) and not is_peft_model(model):
            model = load_adapter(model, directory, is_trainable)
        routers = discover(model, stacks=stacks)
        info = routers.info
        if saved.family not in (None, info.family):
            raise ValueError(f"controller in {directory} was saved for the {saved.family} family, "
                             f"but {info.model_class} is {info.family}")
        mismatches = info.shape_mismatches(saved.shape)
        if mismatches:
            raise ValueError(f"controller in {directory} does not fit {info.model_class}: it has "
                             f"{', '.join(mismatches)}")
        controller = PTController.load(directory, map_location=_execution_device(info))
        controller.requires_grad_(is_trainable)
        return cls(model, controller, step_mode, routers=routers)


def find_wrapper(model: nn.Module) -> ChronovisorModel:
    """The :class:`ChronovisorModel` that ``model`` is or contains (e.g. under a PEFT model).

    Args:
        model: a ChronovisorModel or a module holding one.
    """
    for module in model.modules():
        if isinstance(module, ChronovisorModel):
            return module
    raise ValueError(f"{type(model).__name__} holds no ChronovisorModel: wrap the model with chronovisor.wrap(...) "
                     f"(before or after get_peft_model) first")


def _leave_out_frozen_base(module: ChronovisorModel, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: drop frozen base parameters and second names of shared tensors (tied weights)."""
    frozen = {f"{prefix}model.{name}" for name, parameter in module.model.named_parameters(remove_duplicate=False)
              if not parameter.requires_grad}
    storages: set[int] = set()
    for key in [key for key in state_dict if key.startswith(prefix)]:
        tensor = state_dict[key]
        if key in frozen:
            del state_dict[key]
        elif torch.is_tensor(tensor) and tensor.device.type != "meta" and tensor.numel():
            storage = tensor.untyped_storage().data_ptr()
            if storage in storages:
                del state_dict[key]
            storages.add(storage)


def _allow_left_out_base(module: ChronovisorModel, incompatible_keys: Any) -> None:
    """Load-state-dict post-hook: what :func:`_leave_out_frozen_base` leaves out is not missing."""
    kept = set(module.state_dict())
    left_out = {f"model.{name}" for name in module.model.state_dict()} - kept
    if not left_out:
        return
    incompatible_keys.missing_keys[:] = [
        key for key in incompatible_keys.missing_keys
        if not any(key[start:] in left_out for start in [0] + [i + 1 for i, c in enumerate(key) if c == "."])
    ]


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
            leaves ``model.controller.step()`` to the caller; ``"optimizer"`` see :class:`ChronovisorModel`.
        freeze_base: ``requires_grad_(False)`` on every parameter of ``model`` (controller-only
            training); on a PEFT model the adapter weights stay trainable.
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
    from transformers import AutoConfig

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
    kwargs: dict[str, Any] = {}
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    if torch_dtype is not None:
        kwargs["dtype"] = _dtype(torch_dtype)
    return _auto_class(config).from_pretrained(name_or_path, **kwargs).eval()


def _auto_class(config: Any) -> Any:
    """``AutoModelForSeq2SeqLM`` for an encoder-decoder config, else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def check_model_directory(path: str | Path) -> None:
    """Check, without loading any weight, that a model directory holds a supported MoE model.

    The model is built from its ``config.json`` on the ``meta`` device (no memory, no weights) and
    its routers are discovered, so an unsupported model fails before any work.

    Raises:
        ValueError: ``config.json`` is not a valid transformers config, or the model has no
            router of a supported family (:class:`~chronovisor.wrappers.UnsupportedModelError`).
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{Path(path) / 'config.json'}: not a transformers model config "
                         f"({' '.join(str(error).split())[:200]})") from None
    with torch.device("meta"):
        skeleton = _auto_class(config).from_config(config)
    discover(skeleton)


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
