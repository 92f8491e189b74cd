"""AdamW steps over a batch schedule (joint training, base pretraining, controller offsets) and the
summary of the in-sample training loss.

A step minimises an *objective*: plain next-token CE (:func:`ce_objective`, every arm but one) or
CE plus the router losses (:func:`~chronovisor.eval.router_losses.aux_loss_objective`, the
``aux_loss`` arm). Either way the controller ticks on, and the curve records, the CE.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from chronovisor.eval import data as data_lib
from chronovisor.eval.inputs import ModelInputs, mean_loss, model_inputs, model_of
from chronovisor.eval.record import TrainSummary
from chronovisor.training import NonFiniteTrainingError

#: Final training steps averaged into the reported (in-sample) training loss, as in the reference's
#: ablation (mean of the last 50 per-step losses).
TRAIN_LOSS_TAIL = 50
#: ``tick(step, loss)``: one controller tick after a forward (and the field trajectory's sample).
Tick = Callable[[int, torch.Tensor], None]
#: ``objective(model, inputs) -> (loss to minimise, next-token CE)`` of one forward.
Objective = Callable[[torch.nn.Module, ModelInputs], tuple[torch.Tensor, torch.Tensor]]


def ce_objective(model: torch.nn.Module, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain next-token CE: ``(CE, CE)``."""
    loss = mean_loss(model, inputs)
    return loss, loss


def train_steps(
    model: torch.nn.Module,
    parameters: list[torch.nn.Parameter],
    batches: data_lib.ConversationBatch,
    schedule: list[list[int]],
    lr: float,
    weight_decay: float,
    device: torch.device,
    after_step: Tick | None = None,
    objective: Objective = ce_objective,
    lr_warmup_steps: int = 0,
    compile: bool = False,
) -> list[float]:
    """AdamW over ``parameters`` on the scheduled batches; returns the per-step training losses.

    Args:
        model: a ChronovisorModel or a bare HF model.
        parameters: what the optimiser updates.
        batches, schedule: the conversations and the indices of each step's batch.
        lr, weight_decay: AdamW settings.
        device: where the inputs go.
        after_step: ``after_step(step, ce)`` runs after each optimiser step (the controller's tick).
        objective: what each step minimises (:data:`Objective`; default plain CE). The returned
            losses are the CE of each step.
        lr_warmup_steps: linear learning-rate warm-up over this many steps (:func:`lr_warmup_schedule`;
            0: ``lr`` from the first step).
        compile: run the forwards (and so the backwards) of the HF model inside ``model``
            through ``torch.compile`` (inductor, dynamic shapes: one graph for every sequence
            length; the router hooks are traced in). The controller must step through
            ``after_step``, not in the wrapper's forward (``step_mode="manual"``).

    Raises:
        NonFiniteTrainingError: a step's loss is NaN or infinite (checked before its update).
    """
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    forward = torch.compile(model_of(model), dynamic=True) if compile else model
    scheduler = lr_warmup_schedule(optimizer, lr_warmup_steps) if lr_warmup_steps else None
    losses = []
    for step, indices in enumerate(schedule):
        inputs = model_inputs(model_of(model), batches.select(indices), device)
        loss, ce = objective(forward, inputs)
        detached = ce.detach()
        losses.append(float(detached))
        if not (math.isfinite(losses[-1]) and (loss is ce or math.isfinite(float(loss.detach())))):
            raise NonFiniteTrainingError(f"training step {step}: the loss is not finite ({losses[-1]}); stopped "
                                         f"before the update, nothing is recorded (lower train.lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step(step, detached)
    return losses


def lr_warmup_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up: step s (counted from 0) runs at ``lr · min(1, (s + 1) / steps)``, then ``lr``.

    Call ``.step()`` after each ``optimizer.step()``.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / steps))


def final_loss(losses: list[float]) -> float | None:
    """Mean of the last :data:`TRAIN_LOSS_TAIL` losses (None without any)."""
    tail = losses[-TRAIN_LOSS_TAIL:]
    return sum(tail) / len(tail) if tail else None


def train_summary(losses: list[float], every: int) -> TrainSummary:
    """The in-sample loss of a training phase: its final value and the curve every ``every`` steps."""
    return TrainSummary(
        note="in-sample training loss (the training conversations); compare arms on heldout.loss",
        steps=len(losses),
        final_loss=final_loss(losses),
        curve_every=every,
        curve=losses[::every],
    )
