"""Paired evaluation protocols: the three phases before the held-out evaluation, and :func:`run_cell`.

Every protocol runs one arm at a time (see :mod:`.specs`); the two arms of a seed share the
initial weights, the data and its order.

Encoder–decoder models (Switch Transformers) are wrapped with ``stacks=("decoder",)`` in every
protocol, stacked runs included (:func:`controller_stacks`): their encoder reads a single pad token
(:mod:`.inputs`), so its routers would only add one-token rows to the usage statistics and pull
the global temperature (after 10 ticks the encoder had counted 10 tokens against the decoder's
2116, and the pressure sat pinned). The controller has one layer per decoder router
(``model_info.num_layers`` is the decoder's count, ``model_info.stacks`` says so); the encoder
routers run untouched. Decoder-only models hook every router, as before.

``joint``
    The reference protocol: a toy model trained from its seeded init with the controller live
    (AdamW, plain next-token CE, one tick per forward, ``train.steps`` steps over the training
    conversations). The off arm trains the same init on the same batches in the same order. The
    ``aux_loss`` arm is the off arm trained on CE plus the family's own router losses
    (:mod:`.router_losses`); it is ``joint`` only, since the other protocols train no model weights.
``frozen``
    The base is frozen. Toy presets are first pretrained *without* a controller for
    ``train.pretrain_steps`` (:mod:`.bases`: deterministic per seed, identical for both arms,
    cached in the run directory). The controller then runs online over a warm-up stream of
    ``data.num_warmup`` further training-distribution conversations (ticks on).
``controller_only``
    The frozen base of ``frozen``; only the controller's learnable offsets (δb, δlogT;
    ``PTConfig(learnable=True)``) are trained for ``train.steps`` steps, ticks on. Base parameters
    are checked to be bit-identical afterwards. In the off arm the offsets never reach the router,
    so there is nothing to train: it evaluates the frozen base.

All three end with the same held-out evaluation (:mod:`.heldout`). Several ``frozen`` cells of a
seed can also run together in stacked forwards (:mod:`.stacked`), through the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from chronovisor.eval.bases import build_model, pretrained_base
from chronovisor.eval.fields import FieldTrajectory, summarize_fields
from chronovisor.eval.heldout import evaluate_heldout
from chronovisor.eval.inputs import (
    Conversations,
    ModelInputs,
    count_changed,
    group_mean_losses,
    in_order_batches,
    is_encoder_decoder,
    load_conversations,
    model_inputs,
    repeat_groups,
    schedule_hash,
    state_hash,
    tensor_hashes,
    training_schedule,
)
from chronovisor.eval.record import ArmResult, CellRecord, ModelSummary, Pairing, TrainSummary
from chronovisor.eval.router_losses import aux_loss_objective
from chronovisor.eval.rundir import RunDir
from chronovisor.eval.specs import AUX_LOSS, CellSpec
from chronovisor.eval.train_loop import Tick, ce_objective, train_steps, train_summary


def controller_stacks(model: torch.nn.Module) -> tuple[str, ...] | None:
    """The router stacks a protocol hooks: ``("decoder",)`` for an encoder–decoder model (its encoder
    reads one pad token), None (every router) for a decoder-only one."""
    return ("decoder",) if is_encoder_decoder(model) else None


# ------------------------------------------------------------------------- shared set-up
@dataclass
class PreparedCell:
    """What every arm of a seed starts from: its conversations and its base model (before wrapping).

    Attributes:
        conversations: the seed's conversations.
        base: the HF model (trained from its init in ``joint``; the frozen base otherwise).
        init_hash: :func:`~chronovisor.eval.inputs.state_hash` of ``base`` (the pairing check).
    """

    conversations: Conversations
    base: torch.nn.Module
    init_hash: str


def prepare_cell(cell: CellSpec, run_dir: RunDir, device: torch.device) -> PreparedCell:
    """Seed torch, load the conversations and build (``joint``) or pretrain/load (frozen protocols) the base."""
    torch.manual_seed(cell.seed)
    conversations = load_conversations(cell.data, cell.seed, cell.model, cell.protocol)
    if cell.protocol == "joint":
        base = build_model(cell.model, cell.seed, cell.load, device)
    else:
        base = pretrained_base(cell, conversations, run_dir, device)
    vocab = base.get_output_embeddings().weight.shape[0]
    if conversations.vocab_size > vocab:
        raise ValueError(f"data vocabulary ({conversations.vocab_size} ids) exceeds the model's ({vocab}) for "
                         f"{cell.model}; lower data.vocab_size")
    return PreparedCell(conversations, base, state_hash(base))


def check_base_unchanged(protocol: str, changed: int | None) -> None:
    """RuntimeError if a protocol with a frozen base changed ``changed`` > 0 of its tensors."""
    if changed:
        allowed = "only the controller offsets may train" if protocol == "controller_only" else "nothing may train"
        raise RuntimeError(f"protocol {protocol} changed {changed} tensors of its frozen base; {allowed}")


# ---------------------------------------------------------------------- protocol phases
@dataclass
class PhaseResult:
    """What a protocol's phase before the held-out evaluation reports.

    Attributes:
        data_hash: :func:`~chronovisor.eval.inputs.schedule_hash` of the stream the phase fed.
        train: the in-sample training loss (None if the phase trains nothing).
        base_params_changed: frozen protocols: base tensors that changed (None for ``joint``).
    """

    data_hash: str | None = None
    train: TrainSummary | None = None
    base_params_changed: int | None = None


def warmup_inputs(model: torch.nn.Module, cell: CellSpec, conversations: Conversations,
                  device: torch.device) -> tuple[str, list[ModelInputs]]:
    """The warm-up stream in order, ``train.batch_size`` per forward: (its data hash, the inputs)."""
    warmup = conversations.require_warmup()
    schedule = in_order_batches(len(warmup), cell.train.batch_size)
    return schedule_hash(schedule, warmup), [model_inputs(model, warmup.select(indices), device) for indices in schedule]


def warm_up(wrapped, batches: list[ModelInputs], groups: int, tick: Tick) -> None:
    """Run the frozen model over the warm-up batches, one ``tick(step, loss)`` per batch.

    With a stacked controller of ``groups`` groups each batch is repeated once per group and
    ``loss`` is ``[groups]``, each group's own mean loss.
    """
    wrapped.eval()
    with torch.no_grad():
        for step, inputs in enumerate(batches):
            logits = wrapped(**repeat_groups(inputs.kwargs, groups), use_cache=False).logits
            tick(step, group_mean_losses(logits, inputs.targets, groups))


def _joint_phase(cell: CellSpec, wrapped, conversations: Conversations, device: torch.device, tick: Tick) -> PhaseResult:
    """Train model weights with the controller live (off arm: identity routing), one tick per step;
    the aux_loss arm minimises CE + the router losses."""
    schedule = training_schedule(len(conversations.train), cell.train.batch_size, cell.train.steps, cell.seed)
    wrapped.train()
    objective = aux_loss_objective if cell.objective == AUX_LOSS else ce_objective
    losses = train_steps(wrapped, list(wrapped.model.parameters()), conversations.train, schedule, cell.train.lr,
                         cell.train.weight_decay, device, after_step=tick, objective=objective,
                         lr_warmup_steps=cell.train.lr_warmup_steps, compile=cell.train.compile)
    return PhaseResult(schedule_hash(schedule, conversations.train), train_summary(losses, cell.eval.trajectory_every))


def _frozen_phase(cell: CellSpec, wrapped, conversations: Conversations, device: torch.device, tick: Tick) -> PhaseResult:
    """Run the frozen model over the warm-up stream in order, one tick per batch."""
    data_hash, batches = warmup_inputs(wrapped.model, cell, conversations, device)
    wrapped.model.requires_grad_(False)
    before = tensor_hashes(wrapped.model)
    warm_up(wrapped, batches, 1, tick)
    return PhaseResult(data_hash, None, count_changed(wrapped.model, before))


def _controller_only_phase(cell: CellSpec, wrapped, conversations: Conversations, device: torch.device,
                           tick: Tick) -> PhaseResult:
    """Train only the controller offsets on the frozen base, one tick per step (off arm: nothing to train)."""
    wrapped.model.requires_grad_(False)
    before = tensor_hashes(wrapped.model)
    schedule = training_schedule(len(conversations.train), cell.train.batch_size, cell.train.steps, cell.seed)
    train = None
    if not cell.is_off:
        offsets = [p for p in wrapped.controller.parameters() if p.requires_grad]
        if not offsets:
            raise RuntimeError("controller_only: the controller has no trainable offsets")
        wrapped.eval()  # a frozen base: no dropout or router jitter; gradients still reach the offsets
        losses = train_steps(wrapped, offsets, conversations.train, schedule, cell.train.controller_lr, 0.0, device,
                             after_step=tick, lr_warmup_steps=cell.train.lr_warmup_steps,
                             compile=cell.train.compile)
        train = train_summary(losses, cell.eval.trajectory_every)
    return PhaseResult(schedule_hash(schedule, conversations.train), train, count_changed(wrapped.model, before))


PROTOCOL_PHASES: dict[str, Callable[..., PhaseResult]] = {
    "joint": _joint_phase,
    "frozen": _frozen_phase,
    "controller_only": _controller_only_phase,
}


# ------------------------------------------------------------------------------ the cell
def run_cell(cell: CellSpec, run_dir: RunDir | str | Path, device: torch.device | str = "cpu") -> ArmResult:
    """Run one arm and return its record and held-out routing.

    Args:
        cell: the arm.
        run_dir: the run directory (frozen protocols cache their pretrained base there).
        device: where the model runs (a model with ``load.device_map`` stays where it was loaded).

    Returns:
        The :class:`~chronovisor.eval.record.CellRecord` and the routing (see
        :class:`~chronovisor.eval.record.ArmResult`).
    """
    import chronovisor

    started = time.perf_counter()
    device = torch.device(device)
    prepared = prepare_cell(cell, RunDir.of(run_dir), device)
    config = cell.arm_config()
    wrapped = chronovisor.wrap(prepared.base, config, step_mode="manual", stacks=controller_stacks(prepared.base))
    controller = wrapped.controller
    trajectory = FieldTrajectory(cell.eval.trajectory_every)

    def tick(_step: int, loss: torch.Tensor) -> None:
        controller.step(loss=loss)
        trajectory.maybe_record(controller)

    torch.manual_seed(cell.seed)
    phase = PROTOCOL_PHASES[cell.protocol](cell, wrapped, prepared.conversations, device, tick)
    check_base_unchanged(cell.protocol, phase.base_params_changed)
    heldout, routing = evaluate_heldout(wrapped, prepared.conversations.heldout, cell.eval, device, wrapped.info.num_experts,
                                        cell.seed, tick=tick)
    fields = None
    if not cell.is_off:
        offsets = None
        if config.learnable:
            offsets = {name: float(p.detach().abs().mean()) for name, p in controller.named_parameters()}
        fields = summarize_fields(controller, trajectory, offsets)
    record = CellRecord.build(
        cell, pairing=Pairing(prepared.init_hash, phase.data_hash), model_info=ModelSummary.of(wrapped.info, controller_stacks(prepared.base)),
        heldout=heldout, loss_floor=prepared.conversations.loss_floor, baselines=prepared.conversations.baselines, train=phase.train, fields=fields,
        base_params_changed=phase.base_params_changed, device=device, wall_time_s=time.perf_counter() - started)
    return ArmResult(record, routing)
