"""PTController: the state and the tick of the P×T controller (DESIGN.md §3).

One controller serves every MoE router of a model. Its state is a set of ``[L, E]`` buffers
(L MoE layers, E experts) living on one device; the router hooks call

    z = controller.modulate(layer, logits)        # before the family's own expert selection
    controller.observe(layer, expert_index, ...)  # after it, accumulating this tick's counts

and after the forward the caller runs ``controller.step(loss=None)``: one tick. None of these
three reads a tensor back to the host: schedules are Python integers, everything else stays on
the device (CUDA can run them asynchronously and torch.compile can trace them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from chronovisor.controllers import dynamics
from chronovisor.controllers.config import PTConfig

STATE_FILE = "controller.safetensors"
CONFIG_FILE = "controller_config.json"
FORMAT_VERSION = 1

# Config fields that decide the state's layout or meaning; a saved state must match them.
_STRUCTURAL_FIELDS = ("dynamics", "usage", "learnable", "credit_window")


class PTController(nn.Module):
    """Pressure (fast) and geological temperature (slow) fields over ``[num_layers, num_experts]``.

    Args:
        num_layers: number of MoE routers L (dense layers do not count).
        num_experts: experts per router E.
        top_k: experts selected per token K (used when the caller gives no routing weights).
        config: a :class:`PTConfig`.

    Buffers are created on the CPU; ``controller.to(device)`` moves them. ``modulate`` moves the
    per-layer fields to the logits' device, so a model dispatched over several devices works with
    the controller on any one of them.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, config: PTConfig | None = None):
        super().__init__()
        for name, value, minimum in (("num_layers", num_layers, 1), ("num_experts", num_experts, 2),
                                     ("top_k", top_k, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"PTController: {name} must be an integer >= {minimum}, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"PTController: top_k ({top_k}) cannot exceed num_experts ({num_experts})")
        config = PTConfig() if config is None else config
        if not isinstance(config, PTConfig):
            raise TypeError(f"PTController: config must be a PTConfig, got {type(config).__name__}")
        self.num_layers, self.num_experts, self.top_k, self.config = num_layers, num_experts, top_k, config
        shape = (num_layers, num_experts)
        for name in ("_usage", "_tick_counts", "_tick_weight_sums", "_pressure", "_phases"):
            self.register_buffer(name, torch.zeros(shape))
        for name in ("_fast_temperature", "_temperature_local", "_effective_temperature"):
            self.register_buffer(name, torch.ones(shape))
        self.register_buffer("_temperature_global", torch.ones(num_experts))
        self.register_buffer("_coherence", torch.zeros(()))
        self.register_buffer("_credit", torch.zeros(()))
        self.register_buffer("_loss_window", torch.full((2 * config.credit_window,), math.nan))
        if config.learnable:
            self.pressure_offset = nn.Parameter(torch.zeros(shape))
            self.log_temperature_offset = nn.Parameter(torch.zeros(shape))
        self.ticks = 0
        self.reset()

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def reset(self) -> None:
        """Back to the initial state of this seed: no usage, b = 0, every temperature 1, tick 0.

        Learnable offsets are left as they are (they are trained, not dynamic).
        """
        for name in ("_usage", "_tick_counts", "_tick_weight_sums", "_pressure", "_coherence", "_credit"):
            getattr(self, name).zero_()
        for name in ("_fast_temperature", "_temperature_local", "_effective_temperature", "_temperature_global"):
            getattr(self, name).fill_(1.0)
        self._loss_window.fill_(math.nan)
        generator = torch.Generator().manual_seed(self.config.seed)
        phases = torch.rand(self._phases.shape, generator=generator, dtype=torch.float64) * dynamics.TWO_PI
        self._phases.copy_(phases.to(self._phases.dtype))
        self._coherence.copy_(dynamics.coherence(self._phases).reshape(()))
        self.ticks = 0

    def _field(self, name: str) -> torch.Tensor:
        return getattr(self, name).detach().clone()

    @property
    def pressure(self) -> torch.Tensor:
        """Dynamic pressure b ``[L, E]`` (for ``loss_free``: its selection-only bias), before mode masks."""
        return self._field("_pressure")

    @property
    def temperature(self) -> torch.Tensor:
        """Dynamic delivered temperature T_eff ``[L, E]``, before mode masks and learnable offsets."""
        return self._field("_effective_temperature")

    @property
    def T_fast(self) -> torch.Tensor:
        """Fast temperature ``[L, E]``."""
        return self._field("_fast_temperature")

    @property
    def T_bar_local(self) -> torch.Tensor:
        """Per-layer geological temperature T̄_local ``[L, E]``."""
        return self._field("_temperature_local")

    @property
    def T_bar_global(self) -> torch.Tensor:
        """Geological temperature shared by all layers T̄_global ``[E]``."""
        return self._field("_temperature_global")

    @property
    def usage(self) -> torch.Tensor:
        """Usage U ``[L, E]`` (cumulative counts or their EMA)."""
        return self._field("_usage")

    @property
    def coherence(self) -> torch.Tensor:
        """Coherence R (0-dim tensor)."""
        return self._field("_coherence")

    @property
    def credit(self) -> torch.Tensor:
        """Commitment credit of the ``delayed`` preset at the last field update (0-dim tensor)."""
        return self._field("_credit")

    # ---------------------------------------------------------- forward path
    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"PTController: layer {layer} out of range for {self.num_layers} MoE layers")

    def delivered_fields(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The additive bias and the divisor that reach layer ``layer``'s logits, each ``[E]`` or None.

        Applies the mode (which fields act) and, with ``learnable``, the offsets:
        b_total = b + (δb − mean_k δb), T_total = T_eff · exp(δlogT). ``loss_free`` contributes no
        logit bias (its bias is for selection only, see :meth:`selection_bias`).
        """
        self._check_layer(layer)
        config = self.config
        # Under autograd the fields are copied: step() updates them in place after the forward,
        # and backward still needs the values the forward used.
        snapshot = torch.Tensor.clone if torch.is_grad_enabled() else torch.Tensor.detach
        bias = divisor = None
        if config.uses_pressure and config.dynamics != "loss_free":
            bias = snapshot(self._pressure[layer])
        if config.uses_temperature:
            divisor = snapshot(self._effective_temperature[layer])
        if config.learnable:
            if config.mode in ("pressure", "pt"):
                offset = self.pressure_offset[layer]
                centred = offset - offset.mean()
                bias = centred if bias is None else bias + centred
            if config.mode in ("temperature", "pt"):
                scale = torch.exp(self.log_temperature_offset[layer])
                divisor = scale if divisor is None else divisor * scale
        return bias, divisor

    def modulate(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """z = (ℓ + b) / T for layer ``layer`` (``paper`` with coupling ``bias``: z = ℓ + b / T).

        ``logits [tokens, E]`` in any dtype and on any device; returns float32 (float64 for float64
        logits) on the logits' device. In mode ``off`` the logits come back unchanged (same object),
        and with b = 0, T = 1 the values are bit-identical to the input.
        """
        if self.config.mode == "off":
            return logits
        bias, divisor = self.delivered_fields(layer)
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        z = logits.to(dtype)
        if self.config.dynamics == "paper" and self.config.paper_coupling == "bias":
            if bias is not None:
                bias = bias if divisor is None else bias / divisor
            divisor = None
        if bias is not None:
            z = z + bias.to(device=z.device, dtype=dtype)
        if divisor is not None:
            z = z / divisor.to(device=z.device, dtype=dtype)
        return z

    def selection_bias(self, layer: int) -> torch.Tensor | None:
        """``loss_free`` only: the bias ``[E]`` to add to the gating scores for the choice of experts.

        The mixing weights must come from the unbiased scores. None for every other preset or
        when the mode has no pressure.
        """
        self._check_layer(layer)
        if self.config.dynamics != "loss_free" or not self.config.uses_pressure:
            return None
        return self._pressure[layer]

    @torch.no_grad()
    def observe(self, layer: int, expert_index: torch.Tensor, weights: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> None:
        """Add one router call's selections to this tick's counts.

        Args:
            layer: MoE layer index.
            expert_index: ``[tokens, k]`` integer ids of the selected experts.
            weights: ``[tokens, k]`` routing weights of those selections (default 1/K each); they
                drive the coherence phases. Non-finite weights count as 0.
            mask: ``[tokens]`` bool, True for real tokens; padding is excluded from every count.
        """
        self._check_layer(layer)
        if expert_index.is_floating_point() or expert_index.is_complex() or expert_index.dim() != 2:
            raise ValueError(
                f"PTController.observe: expert_index must be an integer tensor [tokens, k], "
                f"got dtype {expert_index.dtype} and shape {tuple(expert_index.shape)}"
            )
        tokens, k = expert_index.shape
        device, dtype = self._tick_counts.device, self._tick_counts.dtype
        index = expert_index.to(device=device, dtype=torch.long).reshape(-1)  # [tokens*k]
        if mask is None:
            counted = torch.ones(tokens * k, device=device, dtype=dtype)
        else:
            if mask.shape != (tokens,):
                raise ValueError(f"PTController.observe: mask must have shape [{tokens}], got {tuple(mask.shape)}")
            counted = mask.to(device=device, dtype=dtype).repeat_interleave(k)
        if weights is None:
            weight = counted / self.top_k
        else:
            if weights.shape != expert_index.shape:
                raise ValueError(
                    f"PTController.observe: weights must have shape {tuple(expert_index.shape)}, got {tuple(weights.shape)}"
                )
            weight = torch.nan_to_num(weights.to(device=device, dtype=dtype).reshape(-1), nan=0.0,
                                      posinf=0.0, neginf=0.0) * counted
        self._tick_counts[layer].scatter_add_(0, index, counted)
        self._tick_weight_sums[layer].scatter_add_(0, index, weight)

    # -------------------------------------------------------------- the tick
    @torch.no_grad()
    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """One tick: usage and phases move every tick, the fields every ``update_every`` ticks.

        ``loss`` (a tensor, possibly on another device, or a float) feeds the ``delayed`` preset's
        commitment credit; a missing or non-finite loss counts as no signal.
        """
        config = self.config
        counts = self._tick_counts
        if config.usage == "cumulative":
            self._usage.add_(counts)
        else:
            self._usage.mul_(config.usage_decay).add_(counts, alpha=1.0 - config.usage_decay)
        self._phases.copy_(dynamics.advance_phases(self._phases, counts, self._tick_weight_sums, config))
        self._coherence.copy_(dynamics.coherence(self._phases).reshape(()))
        if config.dynamics == "loss_free":
            self._pressure.add_(dynamics.loss_free_bias_update(counts, config))
        if config.dynamics == "delayed":
            self._record_loss(loss)
        self.ticks += 1
        if self.ticks % config.update_every == 0:
            self._update_fields()
        counts.zero_()
        self._tick_weight_sums.zero_()

    def _record_loss(self, loss: torch.Tensor | float | None) -> None:
        window = self._loss_window
        value = math.nan if loss is None else loss
        value = torch.as_tensor(value).detach().to(device=window.device, dtype=window.dtype).reshape(())
        window.copy_(torch.cat((window[1:], torch.where(torch.isfinite(value), value, math.nan).reshape(1))))

    def _update_fields(self) -> None:
        config = self.config
        if config.dynamics == "loss_free":
            return
        if config.dynamics == "paper":
            self._pressure.copy_(dynamics.pressure(self._usage, config))
            target = dynamics.paper_temperature_target(self._usage, config)
            self._temperature_local.copy_(dynamics.ema(self._temperature_local, target, config.eta))
            self._effective_temperature.copy_(
                self._temperature_local.clamp(config.temperature_min, config.temperature_max))
            return
        local_rate: torch.Tensor | float = config.eta
        if config.dynamics == "delayed":
            self._credit.copy_(dynamics.commitment_credit(self._loss_window, config).reshape(()))
            local_rate = config.eta * self._credit
        global_rate = local_rate * config.eta_global_factor
        # 1. T̄_global follows the layer-mean of the *previous* update's T_fast (the reference's lag).
        self._temperature_global.copy_(
            dynamics.ema(self._temperature_global, self._fast_temperature.mean(dim=0), global_rate))
        # 2. Pressure and fast temperature from the usage so far.
        self._pressure.copy_(dynamics.pressure(self._usage, config))
        self._fast_temperature.copy_(dynamics.fast_temperature(self._usage, self._coherence, config))
        # 3. T̄_local follows the fresh T_fast.
        self._temperature_local.copy_(dynamics.ema(self._temperature_local, self._fast_temperature, local_rate))
        self._effective_temperature.copy_(
            (self._fast_temperature * self._temperature_global * self._temperature_local)
            .clamp(config.temperature_min, config.temperature_max))

    # ------------------------------------------------------------ persistence
    def describe(self) -> dict[str, Any]:
        """Shape, tick and config as plain JSON-able data."""
        return {
            "format_version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "ticks": self.ticks,
            "config": self.config.to_dict(),
        }

    def save(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``controller.safetensors`` (state) and ``controller_config.json`` (shape, tick,
        config, plus ``metadata``) into ``directory``; tensors are copied to the CPU first."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in self.state_dict().items()}
        save_file(tensors, str(directory / STATE_FILE), metadata={"format": "chronovisor-pt"})
        description = self.describe()
        description.update(metadata or {})
        (directory / CONFIG_FILE).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
        return directory

    @staticmethod
    def read_description(directory: str | Path) -> dict[str, Any]:
        """The JSON written by :meth:`save`, with a clear error when the files are missing."""
        directory = Path(directory)
        for name in (STATE_FILE, CONFIG_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"no saved controller in {directory}: {name} is missing")
        description = json.loads((directory / CONFIG_FILE).read_text())
        if description.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory / CONFIG_FILE}: unsupported format_version "
                             f"{description.get('format_version')!r} (expected {FORMAT_VERSION})")
        return description

    def load_state(self, directory: str | Path) -> None:
        """Load a state saved by :meth:`save` into this controller (on its current device).

        Raises ValueError naming the mismatch if the saved state has another shape or preset.
        This controller keeps its own rates and mode; use :meth:`load` to take the saved config.
        """
        directory = Path(directory)
        saved = self.read_description(directory)
        for name in ("num_layers", "num_experts", "top_k"):
            if saved[name] != getattr(self, name):
                raise ValueError(f"controller in {directory} has {name}={saved[name]}, "
                                 f"but this model needs {name}={getattr(self, name)}")
        for name in _STRUCTURAL_FIELDS:
            if saved["config"][name] != getattr(self.config, name):
                raise ValueError(f"controller in {directory} was saved with {name}={saved['config'][name]!r}, "
                                 f"this controller has {name}={getattr(self.config, name)!r}")
        tensors = load_file(str(directory / STATE_FILE))
        device = self._usage.device
        self.load_state_dict({name: tensor.to(device) for name, tensor in tensors.items()})
        self.ticks = int(saved["ticks"])

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device | None = None) -> PTController:
        """Build a controller from a directory written by :meth:`save`, with its saved config."""
        saved = cls.read_description(directory)
        controller = cls(saved["num_layers"], saved["num_experts"], saved["top_k"],
                         PTConfig.from_dict(saved["config"]))
        if map_location is not None:
            controller.to(map_location)
        controller.load_state(directory)
        return controller

    def extra_repr(self) -> str:
        c = self.config
        return (f"layers={self.num_layers}, experts={self.num_experts}, top_k={self.top_k}, mode={c.mode}, "
                f"dynamics={c.dynamics}, eta={c.eta}, pressure_scale={c.pressure_scale}, usage={c.usage}")
