"""Shared hook machinery: what every family adapter plugs into.

One router call, inside the HF forward (``prepend=True`` forward hook on the router module)::

    HF router forward                    -> output tuple, laid out as that family returns it
    hook(router, args, output):
        logits = adapter.router_logits(output)         # [tokens, E], a view of the raw logits
        z      = controller.modulate(layer, logits)    # [tokens, E], float32, on logits.device
        bias   = controller.selection_bias(layer)      # [E] / [tokens, E] or None (``loss_free`` only)
        routing = adapter.select(router, args, output, z, bias)   # the family's exact selection on z
        controller.record_selection(layer, ids, weights, mask, dispatched)  # adapter.observed(routing); detached
        recorder.append(...)                           # optional, stays on the device
        return routing.output                          # replaces the router's output tuple

Because the hook is prepended, HF's own ``output_router_logits`` recorder (a forward hook that
transformers installs lazily, *after* ours) and the auxiliary losses see the modulated logits.

Rules every hook here keeps:

* It reads only ``args`` / ``output`` and small plain attributes of the router (``top_k``,
  ``norm_topk_prob``, ...). Never a weight: under accelerate offload the weights are on ``meta``
  while a hook runs. The one exception (DeepSeek-V3's ``e_score_correction_bias`` buffer [E]) goes
  through :func:`module_tensor`, which knows where accelerate keeps an offloaded tensor.
* Nothing moves to the host: no ``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()``,
  ``nonzero`` or ``bincount``. Counting uses ``scatter_add_``.
* Controller tensors are moved to the output's device (``modulate`` does it for the fields; the
  selection bias and the padding mask are moved here).
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from chronovisor.controllers import PTController
    from chronovisor.wrappers.registry import ModelInfo


# ----------------------------------------------------------------------------- errors
class WrapperError(ValueError):
    """Base class of every error raised by ``chronovisor.wrappers``."""


class UnsupportedModelError(WrapperError):
    """The model has no router of a supported MoE family (the message lists the supported ones)."""


class RouterLayoutError(WrapperError):
    """A router of a supported family does not look the way this transformers version lays it out.

    The message names the module path that could not be handled.
    """


# ------------------------------------------------------------------------ data types
@dataclass(frozen=True)
class RouterSite:
    """One MoE router of a model, as found by a family adapter.

    Attributes:
        layer: the controller's layer index (0..L-1, MoE routers only, in forward order).
        path: the module path, e.g. ``"model.layers.3.mlp.gate"``.
        module: the router module itself (the hook is registered on it).
        stack: ``"decoder"`` for decoder-only models; ``"encoder"`` / ``"decoder"`` for Switch.
        mask_source: path of the module whose forward receives the ``attention_mask`` that covers
            this router's tokens: the HF base model (``"model"`` in ``*ForCausalLM``) for decoder-only
            families, the ``encoder`` / ``decoder`` stack for Switch. ``""`` is the model itself.
    """

    layer: int
    path: str
    module: nn.Module = field(repr=False, compare=False)
    stack: str = "decoder"
    mask_source: str = ""


@dataclass(frozen=True)
class Routing:
    """A router's decision for one call, re-run (or read back) by a family adapter.

    Attributes:
        output: the router's full output tuple, laid out exactly as HF returns it.
        expert_index: ``[tokens, k]`` int64 ids of the chosen experts (Switch: the argmax choice,
            including tokens its capacity limit then drops).
        weights: ``[tokens, k]`` the mixing weights the experts receive.
        dispatched: ``[tokens, k]`` bool, False where a chosen expert did not process the token
            (Switch capacity); None when every choice is processed.
    """

    output: tuple
    expert_index: torch.Tensor
    weights: torch.Tensor
    dispatched: torch.Tensor | None = None


# ------------------------------------------------------------------- family adapters
class FamilyAdapter(abc.ABC):
    """How one model family's routers are found and how their selection is re-run: the extension point.

    A family module subclasses this, sets the class attributes, implements :meth:`route` (the
    family's selection on the modulated logits) and registers the class with
    :func:`~chronovisor.wrappers.registry.register_family`; see ``mixtral.py`` for the plainest one.
    ``router_logits``, ``hf_routing`` and ``route`` must reproduce the family's HF forward exactly
    (bit-identical at z == logits), including dtypes. The other methods have defaults that fit
    HF's ``*TopKRouter`` layout ``(router_logits [tokens, E], weights [tokens, k], indices [tokens, k])``.
    """

    family: str = ""
    #: ``config.model_type`` values of this family (used only to word errors).
    model_types: tuple[str, ...] = ()
    #: class names (``type(module).__name__``) of the router modules that get a hook.
    router_classes: tuple[str, ...] = ()
    #: length of the router's output tuple.
    output_len: int = 3
    #: one line: what the family does with the logits (for ``describe`` / ``chronovisor inspect``).
    selection_rule: str = ""
    #: whether ``route`` honours a choice-only ``selection_bias`` (the ``loss_free`` comparator).
    supports_selection_bias: bool = True

    # -- discovery --------------------------------------------------------------------------
    def router_sites(self, model: nn.Module, routers: list[tuple[str, nn.Module]], mask_source: str
                     ) -> list[RouterSite]:
        """The controller's routers, in forward order, from this family's router modules.

        Args:
            model: the model being wrapped.
            routers: ``(path, module)`` of every router of this family, in module registration order.
            mask_source: path of HF's base model inside ``model`` (``"model"`` in ``*ForCausalLM``,
                ``""`` when ``model`` is the base model): its forward receives the padding
                ``attention_mask`` whichever way the caller enters (task head, ``generate``, base model).
        """
        return [RouterSite(layer=layer, path=path, module=module, mask_source=mask_source)
                for layer, (path, module) in enumerate(routers)]

    def router_shape(self, site: RouterSite) -> tuple[int, int]:
        """``(num_experts, top_k)`` of one router; raises :class:`RouterLayoutError` if unreadable."""
        return int_attr(self, site, "num_experts"), int_attr(self, site, "top_k")

    # -- per call (hot path: no host syncs) ---------------------------------------------------
    def router_logits(self, output: tuple) -> torch.Tensor:
        """The raw router logits ``[tokens, E]`` inside the router's output tuple."""
        return output[0]

    def hf_routing(self, module: nn.Module, args: tuple, output: tuple) -> Routing:
        """HF's own decision, read from its unmodified output (for recording only)."""
        return Routing(output, output[2], output[1])

    def observed(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the controller counts for one call: ``(expert_index, weights, dispatched)``, each ``[tokens, m]``.

        Token-choice families count every selection, dropped ones included: the routing's own
        ``[tokens, k]`` ids and weights, ``dispatched`` None. A family where experts choose
        overrides this to hand over every (token, expert) pair (m = E) with its dispatch mask, so
        usage counts the tokens each expert processes.
        """
        return routing.expert_index, routing.weights, None

    def constant_single_weight(self, module: nn.Module) -> bool:
        """Whether top-1 routing gives every token the weight 1 (renormalised, or a softmax over
        the one choice): then the loss does not depend on the router logits at all."""
        return True

    def select(self, module: nn.Module, args: tuple, output: tuple, z: torch.Tensor,
               selection_bias: torch.Tensor | None) -> Routing:
        """Re-run the family's exact selection with ``z`` in place of the router logits.

        The shared part of every family: refuse a selection bias the family cannot honour, cast
        ``z`` to the dtype of HF's logits (the modulated logits stand in for HF's), then
        :meth:`route`.

        Args:
            module: the router module (read only for plain attributes such as ``top_k``).
            args: the router's positional inputs.
            output: the router's unmodified output tuple.
            z: ``[tokens, E]`` float32 modulated logits, on the logits' device.
            selection_bias: ``loss_free`` only, already on z's device: ``[E]``, or ``[tokens, E]``
                for a stacked controller; it changes the choice only, never the weights.
        """
        if selection_bias is not None and not self.supports_selection_bias:
            raise ValueError(f"the {self.family} family has no choice-only selection bias ({self.selection_rule}): "
                             f"the loss_free dynamics is not supported; use another dynamics")
        z = z.to(self.router_logits(output).dtype)                                # [tokens, E]
        return self.route(module, args, output, z, selection_bias)

    @abc.abstractmethod
    def route(self, module: nn.Module, args: tuple, output: tuple, z: torch.Tensor,
              selection_bias: torch.Tensor | None) -> Routing:
        """The family's selection on ``z [tokens, E]`` (already in the logits' dtype).

        Returns the :class:`Routing`, whose ``output`` is laid out exactly as the router's
        (:meth:`topk_routing` builds the common ``*TopKRouter`` layout). Arguments as in :meth:`select`.
        """

    @staticmethod
    def topk_routing(z: torch.Tensor, weights: torch.Tensor, expert_index: torch.Tensor) -> Routing:
        """The ``*TopKRouter`` layout: output ``(z [tokens, E], weights [tokens, k], expert_index [tokens, k])``."""
        return Routing((z, weights, expert_index), expert_index, weights)


def topk_with_choice_bias(scores: torch.Tensor, top_k: int, selection_bias: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` over the experts, where a selection bias changes the choice but not the values.

    Args:
        scores: ``[tokens, E]`` the scores the family ranks (probabilities or logits).
        top_k: experts per token.
        selection_bias: None, or ``[E]`` / ``[tokens, E]`` float32 on the scores' device. The
            choice is then the top-k of ``scores.float() + selection_bias``.

    Returns:
        ``(values [tokens, k], indices [tokens, k] int64)``: the *unbiased* scores of the chosen
        experts, in the scores' dtype, and their ids.
    """
    if selection_bias is None:
        values, indices = torch.topk(scores, top_k, dim=-1)
        return values, indices
    _, indices = torch.topk(scores.float() + selection_bias, top_k, dim=-1)
    return scores.gather(-1, indices), indices


def int_attr(adapter: FamilyAdapter, site: RouterSite, name: str, minimum: int = 1) -> int:
    """A positive integer attribute of a router (a config value such as ``top_k``), or a clear error."""
    value = getattr(site.module, name, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise layout_error(adapter, site, f"attribute {name!r} should be an integer >= {minimum}, got {value!r}")
    return value


def require_attr(adapter: FamilyAdapter, site: RouterSite, name: str, types: type | tuple[type, ...],
                 kind: str) -> None:
    """Raise :class:`RouterLayoutError` unless the router's attribute ``name`` is an instance of ``types``.

    Args:
        kind: how the message words ``types`` (e.g. ``"a bool"``, ``"a number"``).
    """
    if not isinstance(getattr(site.module, name, None), types):
        raise layout_error(adapter, site, f"attribute {name!r} should be {kind}")


def layout_error(adapter: FamilyAdapter, site: RouterSite, problem: str) -> RouterLayoutError:
    import transformers

    return RouterLayoutError(
        f"cannot handle the {adapter.family} router at '{site.path}' ({type(site.module).__name__}): {problem}. "
        f"chronovisor.wrappers.{adapter.family} follows the layout of transformers 5.x "
        f"(installed: {transformers.__version__})."
    )


def module_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """A small tensor attribute of a router (e.g. a bias buffer ``[E]``), even under offload.

    Outside accelerate's load window an offloaded module's tensors sit on ``meta``; accelerate then
    keeps the values in ``module._hf_hook.weights_map``. Returns a tensor on whatever device it
    lives on; callers move it to the scores' device. Raises :class:`RouterLayoutError` if neither
    place has real values.
    """
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor
    weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights_map is not None and name in weights_map:
        return weights_map[name]
    raise RouterLayoutError(f"{type(module).__name__}.{name} is on the meta device and accelerate holds no copy of it")


# -------------------------------------------------------------------------- recorder
class RoutingRecorder:
    """Per-token routing decisions collected during ``with attachment.record_routing() as rec:``.

    Everything stays on the routers' devices until :meth:`to_host` is called. Per layer ``l``
    (controller index) and per router call, in call order:

    * ``expert_index[l]``: list of ``[tokens, k]`` int64,
    * ``weights[l]``: list of ``[tokens, k]`` mixing weights (detached; empty list if not kept),
    * ``token_mask[l]``: list of ``[tokens]`` bool (True = real token) or None (no padding mask),
    * ``dispatched[l]``: list of ``[tokens, k]`` bool or None (Switch capacity drops).

    Tokens are in the order the router saw them: the flattened ``[batch * seq]`` of that call.
    """

    def __init__(self, num_layers: int, num_experts: int, keep_weights: bool = True):
        self.num_layers, self.num_experts, self.keep_weights = num_layers, num_experts, keep_weights
        self.expert_index: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.weights: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.token_mask: list[list[torch.Tensor | None]] = [[] for _ in range(num_layers)]
        self.dispatched: list[list[torch.Tensor | None]] = [[] for _ in range(num_layers)]

    def append(self, layer: int, routing: Routing, mask: torch.Tensor | None) -> None:
        self.expert_index[layer].append(routing.expert_index.detach())
        if self.keep_weights:
            self.weights[layer].append(routing.weights.detach())
        self.token_mask[layer].append(mask)
        self.dispatched[layer].append(None if routing.dispatched is None else routing.dispatched.detach())

    def num_calls(self, layer: int = 0) -> int:
        return len(self.expert_index[layer])

    def layer_expert_index(self, layer: int) -> torch.Tensor:
        """All calls of one layer concatenated: ``[total_tokens, k]`` int64 on the router's device."""
        return torch.cat(self.expert_index[layer]) if self.expert_index[layer] else torch.empty(0, 0, dtype=torch.long)

    def layer_token_mask(self, layer: int) -> torch.Tensor:
        """``[total_tokens]`` bool, True for real tokens (calls without a padding mask count as all real)."""
        parts = [torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device) if mask is None else mask
                 for ids, mask in zip(self.expert_index[layer], self.token_mask[layer], strict=True)]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.bool)

    def counts(self, dispatched_only: bool = False) -> torch.Tensor:
        """``[L, E]`` float32 selection counts (padding excluded), on the device of layer 0's records.

        ``dispatched_only`` also drops choices an expert did not process (Switch capacity).
        """
        device = next((calls[0].device for calls in self.expert_index if calls), torch.device("cpu"))
        out = torch.zeros(self.num_layers, self.num_experts, device=device)
        for layer in range(self.num_layers):
            for ids, mask, kept in zip(self.expert_index[layer], self.token_mask[layer], self.dispatched[layer], strict=True):
                ones = torch.ones(ids.shape, device=ids.device)                       # [tokens, k]
                if mask is not None:
                    ones = ones * mask.unsqueeze(-1)
                if dispatched_only and kept is not None:
                    ones = ones * kept
                out[layer].scatter_add_(0, ids.reshape(-1).to(device), ones.reshape(-1).to(device))
        return out

    def to_host(self) -> dict[str, list[torch.Tensor]]:
        """Per layer, all calls concatenated and copied to the CPU (the only host transfer)."""
        result: dict[str, list[torch.Tensor]] = {
            "expert_index": [self.layer_expert_index(layer).cpu() for layer in range(self.num_layers)],
            "token_mask": [self.layer_token_mask(layer).cpu() for layer in range(self.num_layers)],
        }
        if self.keep_weights:
            result["weights"] = [torch.cat(w).cpu() if w else torch.empty(0, 0) for w in self.weights]
        return result


# ------------------------------------------------------------------------ attachment
class Attachment:
    """The hooks that connect one controller to one model's routers. Built by :func:`attach`.

    Attributes:
        model: the wrapped HF model (unchanged apart from the hooks).
        controller: the :class:`~chronovisor.controllers.PTController`.
        info: the :class:`~chronovisor.wrappers.registry.ModelInfo` of the model.
        adapter: the family adapter in use; ``sites``: the routers, in controller layer order.

    While :attr:`enabled` (the default) every router call is modulated, re-selected and observed.
    Inside :meth:`disabled` the hooks hand HF's output through untouched (bit-exact base model),
    the controller observes nothing, and an active recorder still records HF's own routing, so
    paired on/off evaluation measures both arms the same way. Inside :meth:`frozen` the routers
    are steered as usual but the controller observes nothing (evaluation that must leave the
    controller as it was). The controller's ``step()`` is the caller's job (once per forward, or
    per turn).
    """

    def __init__(self, model: nn.Module, controller: PTController, adapter: FamilyAdapter,
                 sites: list[RouterSite], info: ModelInfo):
        self.model, self.controller, self.adapter, self.sites, self.info = model, controller, adapter, sites, info
        self._enabled = True
        self._observing = True
        self._recorder: RoutingRecorder | None = None
        self._masks: dict[str, torch.Tensor | None] = {}                # mask source path -> [B, S] mask
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for source in sorted({site.mask_source for site in sites}):
                module = model.get_submodule(source) if source else model
                capture, forget = self._mask_hooks(source, _positional_index(module, "attention_mask"))
                self._handles.append(module.register_forward_pre_hook(capture, with_kwargs=True))
                self._handles.append(module.register_forward_hook(forget, always_call=True))
            for site in sites:
                self._handles.append(site.module.register_forward_hook(self._make_hook(site), prepend=True))
        except BaseException:
            self.remove()
            raise
        model._chronovisor_attachment = self

    # -- public surface ---------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """False: hooks pass HF's routing through unchanged and the controller observes nothing."""
        return self._enabled

    @contextmanager
    def disabled(self) -> Iterator[Attachment]:
        """Run the exact base model inside the block (the recorder, if any, keeps recording)."""
        previous, self._enabled = self._enabled, False
        try:
            yield self
        finally:
            self._enabled = previous

    @contextmanager
    def frozen(self) -> Iterator[Attachment]:
        """Steer the routers inside the block without adding anything to the controller's counts."""
        previous, self._observing = self._observing, False
        try:
            yield self
        finally:
            self._observing = previous

    @contextmanager
    def record_routing(self, keep_weights: bool = True) -> Iterator[RoutingRecorder]:
        """Collect every router call's ``[tokens, k]`` expert ids (and weights) inside the block.

        The recorder stays readable after the block; its tensors stay on the device until
        :meth:`RoutingRecorder.to_host`.
        """
        if self._recorder is not None:
            raise RuntimeError("record_routing() is already active on this model")
        recorder = RoutingRecorder(len(self.sites), self.info.num_experts, keep_weights=keep_weights)
        self._recorder = recorder
        try:
            yield recorder
        finally:
            self._recorder = None

    @property
    def recorder(self) -> RoutingRecorder | None:
        """The recorder of the active ``record_routing()`` block, else None."""
        return self._recorder

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook; the model is the plain HF model again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._masks.clear()
        self._mask_cache.clear()
        if getattr(self.model, "_chronovisor_attachment", None) is self:
            del self.model._chronovisor_attachment

    def __repr__(self) -> str:
        state = "enabled" if self._enabled else "disabled"
        if not self.attached:
            state = "removed"
        return (f"Attachment(family={self.info.family}, layers={len(self.sites)}, "
                f"experts={self.info.num_experts}, top_k={self.info.top_k}, {state})")

    # -- padding masks -------------------------------------------------------------------------
    def _mask_hooks(self, source: str, position: int | None):
        """Pre-hook and post-hook for one mask source: remember its ``attention_mask`` during its forward."""

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            mask = kwargs.get("attention_mask")
            if mask is None and position is not None and position < len(args):
                mask = args[position]
            self._masks[source] = mask if isinstance(mask, torch.Tensor) else None
            self._mask_cache.clear()

        def forget(module: nn.Module, args: tuple, output: Any) -> None:
            self._masks.pop(source, None)
            self._mask_cache.clear()

        return capture, forget

    def token_mask(self, site: RouterSite, tokens: int, device: torch.device) -> torch.Tensor | None:
        """``[tokens]`` bool on ``device`` (True = real token) for one router call, or None.

        Uses the 2-D ``[batch, length]`` ``attention_mask`` of the running forward of the router's
        mask source (see :class:`RouterSite`). When the router sees fewer positions than the mask
        covers (generation with a KV cache) the last positions are used. No mask, or a mask of
        another rank (custom 4-D masks), means every token counts: None.
        """
        mask = self._masks.get(site.mask_source)
        if mask is None or mask.dim() != 2:
            return None
        key = (site.mask_source, tokens, device)
        cached = self._mask_cache.get(key)
        if cached is not None:
            return cached
        batch, length = mask.shape
        if tokens == batch * length:
            flat = mask.reshape(-1)
        elif batch > 0 and tokens % batch == 0 and tokens // batch <= length:
            flat = mask[:, length - tokens // batch:].reshape(-1)                  # newest positions
        else:
            raise ValueError(
                f"router '{site.path}' saw {tokens} tokens, which does not fit the attention_mask of "
                f"shape {tuple(mask.shape)} given to '{site.mask_source}'"
            )
        flat = flat.to(device=device, dtype=torch.bool, non_blocking=True)
        self._mask_cache[key] = flat
        return flat

    # -- the router hook -----------------------------------------------------------------------
    def _make_hook(self, site: RouterSite):
        adapter, controller, layer = self.adapter, self.controller, site.layer

        def router_hook(module: nn.Module, args: tuple, output: Any):
            if not isinstance(output, tuple) or len(output) != adapter.output_len:
                raise layout_error(adapter, site, f"expected the router to return a tuple of {adapter.output_len}, "
                                                  f"got {type(output).__name__}")
            if not self._enabled:
                if self._recorder is not None and not _recomputing_in_backward():
                    routing = adapter.hf_routing(module, args, output)
                    mask = self.token_mask(site, routing.expert_index.shape[0], routing.expert_index.device)
                    self._recorder.append(layer, routing, mask)
                return None

            logits = adapter.router_logits(output)                                   # [tokens, E]
            z = controller.modulate(layer, logits)                                   # [tokens, E] fp32
            bias = _selection_bias(controller, layer, logits.shape[0])               # [E], [tokens, E] or None
            if z is logits and bias is None:                                         # mode "off"
                routing = adapter.hf_routing(module, args, output)
                new_output = None
            else:
                if bias is not None:
                    bias = bias.to(logits.device)
                routing = adapter.select(module, args, output, z, bias)
                new_output = routing.output
            if _recomputing_in_backward():       # activation checkpointing re-runs the forward:
                return new_output                # same routing again, but it must not count twice
            mask = self.token_mask(site, routing.expert_index.shape[0], routing.expert_index.device)
            if self._observing:
                ids, weights, dispatched = adapter.observed(routing)
                controller.record_selection(layer, ids.detach(), weights.detach(), mask, dispatched)
            if self._recorder is not None:
                self._recorder.append(layer, routing, mask)
            return new_output

        return router_hook


def _recomputing_in_backward() -> bool:
    """True while autograd's engine runs this forward again (activation checkpointing recompute).

    Under torch.compile the recompute happens inside the compiled backward and never re-runs
    Python hooks, so the answer is False there (and the graph-task query, which returns a Python
    int, would break ``fullgraph=True``).
    """
    if torch.compiler.is_compiling():
        return False
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _selection_bias(controller: PTController, layer: int, num_tokens: int) -> torch.Tensor | None:
    """The controller's choice-only bias: ``[E]``, or ``[tokens, E]`` for a stacked controller."""
    if getattr(controller, "stacked", False):
        return controller.selection_bias(layer, num_tokens)
    return controller.selection_bias(layer)


def _positional_index(module: nn.Module, name: str) -> int | None:
    """Position of argument ``name`` in ``module.forward`` (None when keyword-only or unknown)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in parameters
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None
