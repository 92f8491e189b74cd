"""PTController: the state and the tick (one step) of the P×T controller.

One controller serves every MoE router of a model. Its state is a set of ``[L, E]`` buffers
(L MoE layers, E experts) living on one device; the router hooks call

    z = controller.modulate(layer, logits)        # before the family's own expert selection
    controller.observe(layer, expert_index, ...)  # after it, accumulating this tick's counts

and after the forward the caller runs ``controller.step(loss=None)``: one tick. None of these
three reads a tensor back to the host: schedules are Python integers, everything else stays on
the device (CUDA can run them asynchronously and torch.compile can trace them).

A *stacked* controller (``PTController(L, E, K, [config_1, ..., config_C])``) runs C
configurations in one forward: the batch holds C equal groups of sequences, group c is steered
by configuration c, and every buffer gains a leading ``[C]`` axis. The configurations may differ
in ``eta``, ``pressure_scale``, ``mode`` and ``seed``; everything else is shared. The math is the
same code either way (a single controller is the C = 1 case with the axis hidden).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chronovisor.controllers import dynamics
from chronovisor.controllers.config import PTConfig
from chronovisor.controllers.persistence import (
    FORMAT_VERSION,
    RESERVED_KEYS,
    SavedController,
    read_saved,
    read_state,
    write_controller,
)

# Routing weights are clipped to this magnitude so that their per-tick sums stay finite.
MAX_ROUTING_WEIGHT = 1e4
# Config fields that may differ between the groups of a stacked controller.
PER_GROUP_FIELDS = ("eta", "pressure_scale", "mode", "seed")
# Config fields that decide the state's layout or meaning; a saved state must match them.
_STRUCTURAL_FIELDS = ("dynamics", "usage", "learnable", "credit_window")


class PTController(nn.Module):
    """Pressure (fast) and geological temperature (slow) fields over ``[num_layers, num_experts]``.

    Args:
        num_layers: number of MoE routers L (dense layers do not count).
        num_experts: experts per router E.
        top_k: experts selected per token K (used when the caller gives no routing weights).
        config: a :class:`PTConfig`, or a sequence of C of them for a stacked controller whose
            fields are ``[C, L, E]`` (C groups of the batch, one per configuration).

    Buffers are created on the CPU; ``controller.to(device)`` moves them. ``modulate`` moves the
    per-layer fields to the logits' device, so a model dispatched over several devices works with
    the controller on any one of them.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int,
                 config: PTConfig | Sequence[PTConfig] | None = None):
        super().__init__()
        if isinstance(config, (Mapping, str)):
            raise TypeError(f"PTController: config must be a PTConfig (or a sequence of them for a stacked "
                            f"controller), got a {type(config).__name__}; build one with PTConfig(**values)")
        for name, value, minimum in (("num_layers", num_layers, 1), ("num_experts", num_experts, 2),
                                     ("top_k", top_k, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"PTController: {name} must be an integer >= {minimum}, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"PTController: top_k ({top_k}) cannot exceed num_experts ({num_experts})")
        self.stacked = not (config is None or isinstance(config, PTConfig))
        configs = (config or PTConfig(),) if not self.stacked else tuple(config)
        _check_configs(configs, self.stacked)
        self.num_layers, self.num_experts, self.top_k, self.configs = num_layers, num_experts, top_k, configs
        self.num_groups = len(configs)
        shared = configs[0]
        shape = (self.num_groups, num_layers, num_experts)
        for name in ("_usage", "_tick_counts", "_tick_weight_sums", "_pressure", "_phases"):
            self.register_buffer(name, torch.zeros(shape))
        for name in ("_fast_temperature", "_temperature_local", "_effective_temperature"):
            self.register_buffer(name, torch.ones(shape))
        self.register_buffer("_temperature_global", torch.ones(self.num_groups, 1, num_experts))
        self.register_buffer("_coherence", torch.zeros(self.num_groups, 1, 1))
        self.register_buffer("_credit", torch.zeros(self.num_groups, 1, 1))
        self.register_buffer("_loss_window", torch.full((self.num_groups, 2 * shared.credit_window), math.nan))
        # Per-group settings as [C, 1, 1] tensors (derived from the configs, so not saved).
        per_group = {
            "_eta": [c.eta for c in configs],
            "_pressure_scale": [c.pressure_scale for c in configs],
            "_bias_channel": [c.mode in ("pressure", "pt") for c in configs],
            "_temperature_channel": [c.mode in ("temperature", "pt") for c in configs],
        }
        for name, values in per_group.items():
            self.register_buffer(name, torch.tensor(values).reshape(-1, 1, 1), persistent=False)
        # The fields as they reach the logits, cached once per field update (not saved: derived).
        self.register_buffer("_delivered_bias", torch.zeros(shape), persistent=False)
        self.register_buffer("_delivered_divisor", torch.ones(shape), persistent=False)
        self.register_load_state_dict_post_hook(_cache_after_load)
        # Which terms reach the logits at all (Python booleans: no tensor is read to decide).
        self._any_bias = any(per_group["_bias_channel"]) and (shared.dynamics != "loss_free" or shared.learnable)
        self._any_divisor = any(per_group["_temperature_channel"])
        self._identity = all(c.mode == "off" for c in configs)
        if shared.learnable:
            self.pressure_offset = nn.Parameter(torch.zeros(num_layers, num_experts))
            self.log_temperature_offset = nn.Parameter(torch.zeros(num_layers, num_experts))
        self.ticks = 0
        #: The model family this controller was last attached to (set by the attachment; saved).
        self.family: str | None = None
        self.reset()

    @property
    def config(self) -> PTConfig:
        """The configuration of a single (unstacked) controller."""
        if self.stacked:
            raise AttributeError("a stacked PTController has one config per group: use .configs")
        return self.configs[0]

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def reset(self) -> None:
        """Back to the initial state of this seed: no usage, b = 0, every temperature 1, tick 0.

        Learnable offsets are left as they are (they are trained, not dynamic).
        """
        for name in ("_usage", "_tick_counts", "_tick_weight_sums", "_pressure", "_credit"):
            getattr(self, name).zero_()
        for name in ("_fast_temperature", "_temperature_local", "_effective_temperature", "_temperature_global"):
            getattr(self, name).fill_(1.0)
        self._loss_window.fill_(math.nan)
        for group, config in enumerate(self.configs):
            generator = torch.Generator().manual_seed(config.seed)
            phases = torch.rand(self._phases.shape[1:], generator=generator, dtype=torch.float64) * dynamics.TWO_PI
            self._phases[group].copy_(phases.to(self._phases.dtype))
        self._coherence.copy_(dynamics.coherence(self._phases))
        self._cache_delivered_fields()
        self.ticks = 0

    def _field(self, name: str) -> torch.Tensor:
        value = getattr(self, name).detach().clone()
        return value if self.stacked else value[0]

    @property
    def pressure(self) -> torch.Tensor:
        """Dynamic pressure b ``[L, E]`` (for ``loss_free``: its selection-only bias), before mode masks.

        Stacked controllers return ``[C, L, E]`` here and from every field property below.
        """
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
        return self._field("_temperature_global").squeeze(-2)

    @property
    def usage(self) -> torch.Tensor:
        """Usage U ``[L, E]`` (cumulative counts or their EMA)."""
        return self._field("_usage")

    @property
    def phases(self) -> torch.Tensor:
        """Oscillator phases φ ``[L, E]`` in [0, 2π) (they set the coherence R)."""
        return self._field("_phases")

    @property
    def coherence(self) -> torch.Tensor:
        """Coherence R (0-dim tensor; ``[C]`` when stacked)."""
        return self._field("_coherence").reshape(self._coherence.shape[:1] if self.stacked else ())

    @property
    def credit(self) -> torch.Tensor:
        """Commitment credit of the ``delayed`` preset at the last field update (0-dim; ``[C]`` stacked)."""
        return self._field("_credit").reshape(self._credit.shape[:1] if self.stacked else ())

    # ---------------------------------------------------------- forward path
    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"PTController: layer {layer} out of range for {self.num_layers} MoE layers")

    def _groups(self, tokens: int) -> int:
        """Tokens per group of a router call with ``tokens`` rows."""
        if tokens % self.num_groups:
            raise ValueError(f"PTController: {tokens} tokens do not split into {self.num_groups} equal groups "
                             f"(a stacked controller needs the batch to hold one equal group per configuration)")
        return tokens // self.num_groups

    @torch.no_grad()
    def _cache_delivered_fields(self) -> None:
        """Each group's mode applied to b and T_eff, once per field update (reset, the update ticks
        of :meth:`step`, a loaded state) rather than in every router call: ``[C, L, E]``."""
        self._delivered_bias.copy_(torch.where(self._bias_channel, self._pressure, 0.0))
        self._delivered_divisor.copy_(torch.where(self._temperature_channel, self._effective_temperature, 1.0))

    def delivered_fields(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The additive bias and the divisor that reach layer ``layer``'s logits, each ``[C, E]`` or None.

        Applies each group's mode (which fields act) and, with ``learnable``, the offsets:
        b_total = b + (δb − mean_k δb), T_total = T_eff · exp(δlogT). ``loss_free`` contributes no
        dynamic logit bias (its bias is for selection only, see :meth:`selection_bias`). Without
        offsets these are slices of the fields cached at the last field update: no kernel runs
        here outside autograd.
        """
        self._check_layer(layer)
        shared = self.configs[0]
        # Under autograd the fields are copied: step() updates them in place after the forward,
        # and backward still needs the values the forward used.
        snapshot = torch.Tensor.clone if torch.is_grad_enabled() else torch.Tensor.detach
        if not shared.learnable:
            return (snapshot(self._delivered_bias[:, layer]) if self._any_bias else None,
                    snapshot(self._delivered_divisor[:, layer]) if self._any_divisor else None)
        bias_channel, temperature_channel = self._bias_channel[:, 0], self._temperature_channel[:, 0]   # [C, 1]
        bias = divisor = None
        if self._any_bias:
            dynamic = 0.0 if shared.dynamics == "loss_free" else snapshot(self._pressure[:, layer])
            offset = self.pressure_offset[layer]
            bias = torch.where(bias_channel, dynamic + (offset - offset.mean()), 0.0)
        if self._any_divisor:
            dynamic = snapshot(self._effective_temperature[:, layer]) * torch.exp(self.log_temperature_offset[layer])
            divisor = torch.where(temperature_channel, dynamic, 1.0)
        return bias, divisor

    def modulate(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """z = (ℓ + b) / T for layer ``layer`` (``paper`` with coupling ``bias``: z = ℓ + b / T).

        ``logits [tokens, E]`` in any dtype and on any device; returns float32 (float64 for float64
        logits) on the logits' device. When every group's mode is ``off`` the logits come back
        unchanged (same object); with b = 0, T = 1 the values are bit-identical to the input.
        A stacked controller steers the c-th of C equal consecutive blocks of tokens with group c.
        """
        if self._identity:
            return logits
        bias, divisor = self.delivered_fields(layer)
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        tokens, experts = logits.shape
        z = logits.to(dtype).view(self.num_groups, self._groups(tokens), experts)        # [C, n, E]
        shared = self.configs[0]
        if shared.dynamics == "paper" and shared.paper_coupling == "bias" and bias is not None:
            bias = bias if divisor is None else bias / divisor
            divisor = None
        if bias is not None:
            z = z + bias.to(device=z.device, dtype=dtype).unsqueeze(1)
        if divisor is not None:
            z = z / divisor.to(device=z.device, dtype=dtype).unsqueeze(1)
        return z.view(tokens, experts)

    def selection_bias(self, layer: int, num_tokens: int | None = None) -> torch.Tensor | None:
        """``loss_free`` only: the bias to add to the gating scores for the choice of experts.

        ``[E]`` for a single controller; a stacked one needs ``num_tokens`` and returns
        ``[num_tokens, E]`` (group c's bias on its block of tokens). The mixing weights must come
        from the unbiased scores. None for every other preset or when no group has pressure.
        """
        self._check_layer(layer)
        if self.configs[0].dynamics != "loss_free" or not any(c.mode in ("pressure", "pt") for c in self.configs):
            return None
        bias = torch.where(self._bias_channel[:, 0], self._pressure[:, layer], 0.0)                   # [C, E]
        if not self.stacked:
            return bias[0]
        if num_tokens is None:
            raise ValueError("PTController.selection_bias: a stacked controller needs num_tokens")
        return bias.repeat_interleave(self._groups(num_tokens), dim=0)

    @torch.no_grad()
    def observe(self, layer: int, expert_index: torch.Tensor, weights: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, dispatched: torch.Tensor | None = None) -> None:
        """Add one router call's selections to this tick's counts, after checking them.

        The public entry point: it checks the inputs' dtypes and shapes and that every id names
        an expert (one host sync), then calls :meth:`record_selection`. The router hooks call
        :meth:`record_selection` directly with HF's own ids (no host sync).

        Args:
            layer: MoE layer index.
            expert_index: ``[tokens, top_k]`` integer (not bool) ids in ``[0, num_experts)`` of the
                selected experts (stacked: C equal consecutive blocks of tokens, one per group);
                with ``dispatched``, ``[tokens, k]`` for any k.
            weights: ``[tokens, k]`` floating-point routing weights of those selections
                (default 1/K each); they drive the coherence phases. A token with a NaN weight was
                routed from NaN scores and is not counted; infinite weights count as 0;
                magnitudes are clipped to ``MAX_ROUTING_WEIGHT``.
            mask: ``[tokens]`` bool, True for real tokens; padding is excluded from every count.
            dispatched: ``[tokens, k]`` bool, the dispatch mask: only selections an expert processed
                count (weights too). None: every selection counts (token choice, k per token). With
                it, counting needs no fixed k: Expert Choice passes every expert of every token
                (k = E) and its dispatch mask, so usage is the tokens each expert took.

        Raises:
            ValueError: naming the argument and what is wrong with it.
        """
        self._check_layer(layer)
        columns = self.top_k if dispatched is None else expert_index.shape[-1] if torch.is_tensor(expert_index) else 0
        if (not torch.is_tensor(expert_index) or expert_index.dtype == torch.bool or expert_index.is_floating_point()
                or expert_index.is_complex() or expert_index.dim() != 2 or expert_index.shape[1] != columns):
            raise ValueError(
                f"PTController.observe: expert_index must be an integer tensor [tokens, {self.top_k}] (top_k "
                f"{self.top_k}; any width with a dispatch mask), got {_describe_tensor(expert_index)}")
        if weights is not None and (not torch.is_tensor(weights) or not weights.is_floating_point()):
            raise ValueError(f"PTController.observe: weights must be a floating-point tensor, got "
                             f"{_describe_tensor(weights)}")
        if mask is not None and (not torch.is_tensor(mask) or mask.dtype != torch.bool):
            raise ValueError(f"PTController.observe: mask must be a bool tensor (True = real token), got "
                             f"{_describe_tensor(mask)}; pass attention_mask.bool()")
        if dispatched is not None and (not torch.is_tensor(dispatched) or dispatched.dtype != torch.bool):
            raise ValueError(f"PTController.observe: dispatched must be a bool tensor (True = processed), got "
                             f"{_describe_tensor(dispatched)}")
        outside = (expert_index < 0) | (expert_index >= self.num_experts)
        if bool(outside.any()):
            raise ValueError(f"PTController.observe: expert ids must lie in [0, {self.num_experts}), got "
                             f"{int(expert_index.min())}..{int(expert_index.max())}")
        self.record_selection(layer, expert_index, weights, mask, dispatched)

    @torch.no_grad()
    def record_selection(self, layer: int, expert_index: torch.Tensor, weights: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None, dispatched: torch.Tensor | None = None) -> None:
        """:meth:`observe` without its value checks: the router hooks' entry (no host sync).

        Only shapes are checked (Python integers). Arguments as in :meth:`observe`; ``expert_index``
        may have any number of columns (a family's own choice count).
        """
        self._check_layer(layer)
        if expert_index.is_floating_point() or expert_index.is_complex() or expert_index.dim() != 2:
            raise ValueError(
                f"PTController.observe: expert_index must be an integer tensor [tokens, k], "
                f"got dtype {expert_index.dtype} and shape {tuple(expert_index.shape)}"
            )
        tokens, k = expert_index.shape
        groups = (self.num_groups, self._groups(tokens) * k)                                 # [C, n*k]
        device, dtype = self._tick_counts.device, self._tick_counts.dtype
        index = expert_index.to(device=device, dtype=torch.long).reshape(groups)
        if mask is None:
            real = torch.ones(tokens, device=device, dtype=dtype)
        else:
            if mask.shape != (tokens,):
                raise ValueError(f"PTController.observe: mask must have shape [{tokens}], got {tuple(mask.shape)}")
            real = mask.to(device=device, dtype=dtype)
        if weights is None:
            counted = real.repeat_interleave(k).reshape(groups)
        else:
            if weights.shape != expert_index.shape:
                raise ValueError(
                    f"PTController.observe: weights must have shape {tuple(expert_index.shape)}, got {tuple(weights.shape)}"
                )
            weights = weights.to(device=device, dtype=dtype)
            routed = real * ~torch.isnan(weights).any(dim=-1)          # a NaN weight: routed from NaN scores
            counted = routed.repeat_interleave(k).reshape(groups)
        if dispatched is not None:
            if dispatched.shape != expert_index.shape:
                raise ValueError(f"PTController.observe: dispatched must have shape {tuple(expert_index.shape)}, "
                                 f"got {tuple(dispatched.shape)}")
            counted = counted * dispatched.to(device=device, dtype=dtype).reshape(groups)
        if weights is None:
            weight = counted / self.top_k
        else:
            weight = torch.nan_to_num(weights.reshape(groups), nan=0.0, posinf=0.0, neginf=0.0
                                      ).clamp(-MAX_ROUTING_WEIGHT, MAX_ROUTING_WEIGHT) * counted
        self._tick_counts[:, layer].scatter_add_(1, index, counted)
        self._tick_weight_sums[:, layer].scatter_add_(1, index, weight)

    # -------------------------------------------------------------- the tick
    @torch.no_grad()
    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """One tick: usage and phases move every tick, the fields every ``update_every`` ticks.

        ``loss`` (a tensor, possibly on another device, or a float; stacked: one per group or one
        for all) feeds the ``delayed`` preset's commitment credit; a missing or non-finite loss
        counts as no signal.
        """
        shared = self.configs[0]
        counts = self._tick_counts
        if shared.usage == "cumulative":
            self._usage.add_(counts)
        else:
            self._usage.mul_(shared.usage_decay).add_(counts, alpha=1.0 - shared.usage_decay)
        self._phases.copy_(dynamics.advance_phases(self._phases, counts, self._tick_weight_sums, shared.phase_step))
        self._coherence.copy_(dynamics.coherence(self._phases))
        if shared.dynamics == "loss_free":
            self._pressure.add_(dynamics.loss_free_bias_update(counts, shared.loss_free_rate))
        if shared.dynamics == "delayed":
            self._record_loss(loss)
        self.ticks += 1
        if self.ticks % shared.update_every == 0:
            self._update_fields()
            self._cache_delivered_fields()
        counts.zero_()
        self._tick_weight_sums.zero_()

    def _record_loss(self, loss: torch.Tensor | float | None) -> None:
        window = self._loss_window                                                       # [C, 2W]
        window.copy_(window.roll(-1, dims=1))
        if not torch.is_tensor(loss):
            # A Python number is written as a kernel argument: no host-to-device copy, no sync.
            value = math.nan if loss is None or not math.isfinite(loss) else float(loss)
            window[:, -1].fill_(value)
            return
        # A tensor loss is best passed where the model computed it (already on this device).
        value = loss.detach().to(device=window.device, dtype=window.dtype).reshape(-1)
        window[:, -1].copy_(torch.where(torch.isfinite(value), value, math.nan).expand(self.num_groups))

    def _update_fields(self) -> None:
        shared = self.configs[0]
        if shared.dynamics == "loss_free":
            return
        if shared.dynamics == "paper":
            self._pressure.copy_(dynamics.pressure(self._usage, self._pressure_scale, shared.pressure_gain))
            target = dynamics.paper_temperature_target(self._usage, shared.paper_kappa)
            self._temperature_local.copy_(dynamics.ema(self._temperature_local, target, self._eta))
            self._effective_temperature.copy_(
                self._temperature_local.clamp(shared.temperature_min, shared.temperature_max))
            return
        local_rate = self._eta                                                           # [C, 1, 1]
        if shared.dynamics == "delayed":
            self._credit.copy_(dynamics.commitment_credit(self._loss_window, shared.credit_scale))
            local_rate = local_rate * self._credit
        global_rate = local_rate * shared.eta_global_factor
        # 1. T̄_global follows the layer-mean of the *previous* update's T_fast (the reference's lag).
        self._temperature_global.copy_(dynamics.ema(
            self._temperature_global, self._fast_temperature.mean(dim=-2, keepdim=True), global_rate))
        # 2. Pressure and fast temperature from the usage so far.
        self._pressure.copy_(dynamics.pressure(self._usage, self._pressure_scale, shared.pressure_gain))
        self._fast_temperature.copy_(dynamics.fast_temperature(self._usage, self._coherence, shared))
        # 3. T̄_local follows the fresh T_fast.
        self._temperature_local.copy_(dynamics.ema(self._temperature_local, self._fast_temperature, local_rate))
        self._effective_temperature.copy_(
            (self._fast_temperature * self._temperature_global * self._temperature_local)
            .clamp(shared.temperature_min, shared.temperature_max))

    # ------------------------------------------------------------ persistence
    def describe(self) -> dict[str, Any]:
        """Shape, tick, family and config as plain JSON-able data."""
        return {
            "format_version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "ticks": self.ticks,
            "family": self.family,
            **({"configs": [c.to_dict() for c in self.configs]} if self.stacked
               else {"config": self.configs[0].to_dict()}),
        }

    def save(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``controller.safetensors`` (state) and ``controller_config.json`` (shape, tick,
        family, config, the state's checksum, plus ``metadata``) into ``directory``, atomically.

        Both files are written into a temporary directory that then replaces ``directory`` (its
        other files are kept), so a failure leaves any previous controller there intact; tensors
        are copied to the CPU first.

        Raises:
            ValueError: a tensor is non-finite (nothing non-finite is saved), or ``metadata`` uses a
                key the description owns.
        """
        reserved = sorted(set(metadata or {}) & set(RESERVED_KEYS))
        if reserved:
            raise ValueError(f"PTController.save: metadata may not set {', '.join(reserved)} (recorded by the "
                             f"controller itself)")
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in self.state_dict().items()}
        for name, tensor in tensors.items():
            bad = torch.isinf(tensor) if name == "_loss_window" else ~torch.isfinite(tensor)
            if bool(bad.any()):
                raise ValueError(f"PTController.save: {name} holds non-finite values; refusing to save them "
                                 f"(reset() the controller or retrain it)")
        return write_controller(directory, tensors, {**self.describe(), **(metadata or {})})

    @staticmethod
    def read_description(directory: str | Path) -> SavedController:
        """The validated ``controller_config.json`` written by :meth:`save` (see
        :func:`~chronovisor.controllers.persistence.read_saved`, which raises naming file and field)."""
        return read_saved(directory)

    def load_state(self, directory: str | Path) -> None:
        """Load a state saved by :meth:`save` into this controller (on its current device).

        Raises ValueError naming the mismatch if the saved state has another shape or preset,
        and :class:`~chronovisor.controllers.persistence.ControllerFileError` (a ValueError) naming
        the file and the field if it is corrupt, non-finite or inconsistent. This controller keeps
        its own rates and mode; use :meth:`load` to take the saved config.
        """
        saved = read_saved(directory)
        for name, have in saved.shape.items():
            if have != getattr(self, name):
                raise ValueError(f"controller in {saved.directory} has {name}={have}, "
                                 f"but this model needs {name}={getattr(self, name)}")
        if len(saved.configs) != self.num_groups:
            raise ValueError(f"controller in {saved.directory} has {len(saved.configs)} configuration group(s), "
                             f"this controller has {self.num_groups}")
        if None not in (saved.family, self.family) and saved.family != self.family:
            raise ValueError(f"controller in {saved.directory} was saved for the {saved.family} family, "
                             f"this controller is attached to a {self.family} model")
        for name in _STRUCTURAL_FIELDS:
            have, want = getattr(saved.configs[0], name), getattr(self.configs[0], name)
            if have != want:
                raise ValueError(f"controller in {saved.directory} was saved with {name}={have!r}, "
                                 f"this controller has {name}={want!r}")
        tensors = read_state(saved, self.state_dict())
        device = self._usage.device
        self.load_state_dict({name: tensor.to(device) for name, tensor in tensors.items()})
        self.ticks = saved.ticks
        self.family = saved.family or self.family

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device | None = None) -> PTController:
        """Build a controller from a directory written by :meth:`save`, with its saved config."""
        saved = read_saved(directory)
        controller = cls(saved.num_layers, saved.num_experts, saved.top_k,
                         saved.configs if saved.stacked else saved.configs[0])
        if map_location is not None:
            controller.to(map_location)
        controller.load_state(directory)
        return controller

    def extra_repr(self) -> str:
        c = self.configs[0]
        groups = f"groups={self.num_groups}, " if self.stacked else (
            f"mode={c.mode}, eta={c.eta}, pressure_scale={c.pressure_scale}, ")
        return (f"layers={self.num_layers}, experts={self.num_experts}, top_k={self.top_k}, {groups}"
                f"dynamics={c.dynamics}, usage={c.usage}")


def _cache_after_load(controller: PTController, _incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: the loaded fields reach the logits from the next call on."""
    controller._cache_delivered_fields()


def _check_configs(configs: tuple, stacked: bool) -> None:
    """Every entry a PTConfig; the groups of a stacked controller differ only in PER_GROUP_FIELDS."""
    if not configs:
        raise ValueError("PTController: a stacked controller needs at least one PTConfig")
    for config in configs:
        if not isinstance(config, PTConfig):
            raise TypeError(f"PTController: config must be a PTConfig, got {type(config).__name__}")
    if not stacked:
        return
    if configs[0].learnable:
        raise ValueError("PTController: learnable offsets are not supported in a stacked controller")
    reference = configs[0].to_dict()
    for index, config in enumerate(configs[1:], start=1):
        for name, value in config.to_dict().items():
            if name not in PER_GROUP_FIELDS and value != reference[name]:
                raise ValueError(f"PTController: stacked configs may differ only in {', '.join(PER_GROUP_FIELDS)}; "
                                 f"config {index} has {name}={value!r}, config 0 has {name}={reference[name]!r}")


def _describe_tensor(value: Any) -> str:
    if not torch.is_tensor(value):
        return type(value).__name__
    return f"dtype {value.dtype} and shape {tuple(value.shape)}"
