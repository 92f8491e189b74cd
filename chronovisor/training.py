"""Controller-only training: the base model stays frozen, the learnable offsets learn.

The loop is a plain ``accelerate`` loop (``Accelerator.backward``, mixed precision and gradient
accumulation as accelerate provides them) over the controller's parameters only:
``pressure_offset`` δb[l, k] and ``log_temperature_offset`` δlogT[l, k] (see :class:`~chronovisor.controllers.PTController`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from chronovisor.model import ChronovisorModel


class ZeroGradientError(RuntimeError):
    """The controller's offsets receive no gradient through this model's routers."""


class NonFiniteTrainingError(ValueError):
    """A training step produced a non-finite loss, gradient or offset; training stopped there.

    The offsets keep the last finite values they had (nothing non-finite is kept or saved).
    """


def _finite_number(value: object, minimum: float, name: str, strict: bool) -> None:
    """Raise unless ``value`` is a real number (not a bool), finite, and > (``strict``) or >= ``minimum``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= minimum if strict else value < minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"TrainConfig.{name}: must be a finite number {bound} (got {value!r})")


def _positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TrainConfig.{name}: must be an integer >= 1 (got {value!r})")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train_controller` (validated at construction)."""

    steps: int = 200
    learning_rate: float = 0.05
    weight_decay: float = 0.0
    log_every: int = 10
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        _positive_int(self.steps, "steps")
        _finite_number(self.learning_rate, 0.0, "learning_rate", strict=True)
        _finite_number(self.weight_decay, 0.0, "weight_decay", strict=False)
        _positive_int(self.log_every, "log_every")
        if self.max_grad_norm is not None:
            _finite_number(self.max_grad_norm, 0.0, "max_grad_norm", strict=True)


def _cycle(batches: Iterable[Mapping[str, torch.Tensor]]) -> Iterator[Mapping[str, torch.Tensor]]:
    cached = list(batches)
    if not cached:
        raise ValueError("train_controller: no training batches")
    while True:
        yield from cached


def _input_device(model: ChronovisorModel, accelerator: Any) -> torch.device | None:
    """Where inputs go: nowhere for an accelerate-dispatched model (its hooks move them),
    else the accelerator's device, where the model is moved as well."""
    if getattr(model.model, "hf_device_map", None):
        return None
    model.to(accelerator.device)
    return accelerator.device


def train_controller(model: ChronovisorModel, batches: Iterable[Mapping[str, torch.Tensor]],
                     config: TrainConfig | None = None, *, accelerator: Any = None,
                     progress: bool = True) -> list[dict[str, float]]:
    """Train only the controller's learnable offsets on ``batches`` (cycled for ``config.steps``).

    Each batch is a mapping of model inputs with ``labels`` (e.g. ``input_ids``,
    ``attention_mask``, ``labels``). The base model is frozen here (``requires_grad_(False)``) and
    put in eval mode (no dropout, no router jitter); the controller ticks after every forward as
    usual. Returns the log: one dict per ``log_every`` steps with the step, the mean training
    loss since the last entry, the largest |delivered pressure offset| and the spread of the
    temperature offsets; each entry also goes to the accelerator's trackers (a no-op without
    any, see :func:`chronovisor.eval.tracking.tracking_accelerator`).

    Every step checks (one host sync) that the loss and the offsets' gradients are finite, and
    after the optimiser step that the offsets are: the first non-finite value stops training with
    :class:`NonFiniteTrainingError`, the offsets keeping their last finite values.

    Raises:
        ValueError: the controller has no learnable offsets, or its mode is ``off``; a batch has
            no target token (every label ``-100``).
        NonFiniteTrainingError: a non-finite loss, gradient or offset (e.g. a learning rate far
            too high, or a NaN in the inputs); the message names the step.
        ZeroGradientError: after the first backward every offset gradient is exactly zero, as
            happens with top-1 routing whose weight is renormalised to 1 (Mixtral/Qwen with k=1):
            the loss then does not depend on the routing logits at all.
    """
    from accelerate import Accelerator

    config = config or TrainConfig()
    controller = model.controller
    if controller.stacked:
        raise ValueError("train_controller trains one configuration: the controller is stacked")
    if not controller.config.learnable:
        raise ValueError("train_controller needs PTConfig(learnable=True): the controller has no trainable offsets")
    if controller.config.mode == "off":
        raise ValueError("train_controller: mode 'off' ignores the controller, so its offsets cannot learn")
    _check_routing_has_gradient(model)
    cached = list(batches)
    _check_targets(cached, shifted=not getattr(model.config, "is_encoder_decoder", False))
    model.freeze_base()
    model.model.eval()
    parameters = [p for p in controller.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("train_controller: the controller's offsets are frozen (load with is_trainable=True)")
    accelerator = accelerator or Accelerator()
    device = _input_device(model, accelerator)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    optimizer = accelerator.prepare(optimizer)

    log: list[dict[str, float]] = []
    running = torch.zeros((), device=parameters[0].device)
    data = _cycle(cached)
    bar = tqdm(range(1, config.steps + 1), desc="controller", disable=not progress)
    for step in bar:
        batch = next(data)
        inputs = {k: (v.to(device) if device is not None and torch.is_tensor(v) else v) for k, v in batch.items()}
        outputs = model(**inputs)
        if outputs.loss is None:
            raise ValueError("train_controller: the batches must include labels (the model returned no loss)")
        accelerator.backward(outputs.loss)
        _require_finite(step, "loss or gradient", [outputs.loss.detach(), *(p.grad for p in parameters)])
        if step == 1:
            _check_gradient_flows(model, parameters)
        if config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
        last_finite = [p.detach().clone() for p in parameters]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        try:
            _require_finite(step, "offset", parameters)
        except NonFiniteTrainingError:
            with torch.no_grad():
                for parameter, value in zip(parameters, last_finite, strict=True):
                    parameter.copy_(value)
            raise
        running += outputs.loss.detach().to(running.device)
        if step % config.log_every == 0 or step == config.steps:
            since = (step - 1) % config.log_every + 1
            with torch.no_grad():
                pressure = controller.pressure_offset - controller.pressure_offset.mean(dim=-1, keepdim=True)
                entry = {
                    "step": step,
                    "loss": float(running) / since,
                    "max_abs_pressure_offset": float(pressure.abs().max()),
                    "log_temperature_offset_std": float(controller.log_temperature_offset.std()),
                }
            log.append(entry)
            accelerator.log({name: value for name, value in entry.items() if name != "step"}, step=step)
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
            running.zero_()
    return log


def _check_targets(batches: list[Mapping[str, torch.Tensor]], shifted: bool) -> None:
    """Every batch needs a target token: a label other than -100 (after the first position when
    ``shifted``: a causal LM scores ``labels[:, 1:]``)."""
    for index, batch in enumerate(batches, start=1):
        labels = batch.get("labels")
        scored = labels[..., 1:] if shifted and torch.is_tensor(labels) else labels
        if torch.is_tensor(scored) and not bool((scored != -100).any()):
            raise ValueError(f"train_controller: batch {index} has no target token (every scored label is -100, "
                             f"e.g. only padding or one-token sequences); drop it or fix its labels")


def _require_finite(step: int, what: str, tensors: list[torch.Tensor | None]) -> None:
    """Raise :class:`NonFiniteTrainingError` if any tensor holds a NaN or an infinity (one host sync)."""
    checks = [torch.isfinite(t).all() for t in tensors if t is not None]
    if checks and not bool(torch.stack(checks).all()):
        raise NonFiniteTrainingError(
            f"train_controller: non-finite {what} at step {step}; training stopped and nothing non-finite was kept "
            f"(lower the learning rate, or check the batch of step {step} for NaN/inf inputs)")


def _check_routing_has_gradient(model: ChronovisorModel) -> None:
    """Refuse top-1 routing whose weight is the constant 1: the loss ignores the router logits.

    (Autograd still returns rounding noise of ~1e-10 there, so this is decided from the family's
    selection rule rather than from the gradients.)
    """
    info, attachment = model.info, model.attachment
    if info.top_k == 1 and all(attachment.adapter.constant_single_weight(site.module) for site in attachment.sites):
        raise ZeroGradientError(
            f"the controller's offsets get no gradient through {info.model_class} ({info.family}, top-1, "
            f"{info.selection_rule}): with a single expert whose weight is renormalised to 1 the loss does not "
            f"depend on the router logits, so gradient training cannot steer it; use the online P×T dynamics "
            f"(no training) or a model with top_k >= 2"
        )


def _check_gradient_flows(model: ChronovisorModel, parameters: list[torch.nn.Parameter]) -> None:
    """Raise :class:`ZeroGradientError` if no offset received any gradient (one host sync, once)."""
    total = sum(p.grad.abs().sum() for p in parameters if p.grad is not None)
    if not torch.is_tensor(total) or float(total) == 0.0:
        info = model.info
        raise ZeroGradientError(
            f"the controller's offsets got no gradient at all through {info.model_class} ({info.family}, "
            f"top-{info.top_k}, {info.selection_rule}) on the first batch"
        )
