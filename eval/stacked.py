"""Several ``frozen`` cells of one seed in stacked forwards: one pretrained base, one stacked controller.

A *stack* is a list of cells that run together: the same model, seed, data, training, evaluation
and load settings, and controllers that differ only in
:data:`~chronovisor.controllers.controller.PER_GROUP_FIELDS` (η, P, mode, seed). The base is
wrapped once with a stacked controller (``PTController(L, E, K, [config_1, ..., config_C])``);
every batch is repeated C times along the batch axis (group c = configuration c). Off arms join as
a ``mode="off"`` group (identity: b = 0, T = 1, bit-identical logits). Each cell gets the record
and routing :func:`~chronovisor.eval.protocols.run_cell` gives it (up to float32 rounding: a
C-times-larger batch may take other GEMM kernels). Encoder–decoder models hook their decoder
routers only, as in :func:`~chronovisor.eval.protocols.run_cell`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from chronovisor.controllers.controller import PER_GROUP_FIELDS
from chronovisor.eval.fields import FieldTrajectory, field_views, summarize_fields
from chronovisor.eval.heldout import HeldoutAccumulator, heldout_batches, noncausal_losses, run_heldout
from chronovisor.eval.inputs import count_changed, tensor_hashes
from chronovisor.eval.protocols import (
    check_base_unchanged,
    controller_stacks,
    prepare_cell,
    warm_up,
    warmup_inputs,
)
from chronovisor.eval.record import ArmResult, CellRecord, ModelSummary, Pairing
from chronovisor.eval.rundir import RunDir
from chronovisor.eval.specs import OFF, CellSpec, stable_hash


def stack_key(cell: CellSpec) -> str | None:
    """Cells with the same key (and the same :func:`settings_key`) can share a stacked controller:
    their controllers agree apart from ``PER_GROUP_FIELDS``. Off arms (None) join any key."""
    if cell.pt_config is None:
        return None
    fields = cell.pt_config.to_dict()
    for name in PER_GROUP_FIELDS:
        fields.pop(name, None)
    return stable_hash(fields)


def settings_key(cell: CellSpec) -> str:
    """The non-controller part of the stacking key: everything but the controller must be equal."""
    settings = cell.relevant_settings()
    settings.pop("controller")
    return stable_hash(settings)


def check_stackable(cells: list[CellSpec]) -> None:
    """Raise ValueError naming the first setting in which ``cells`` cannot share one stacked run."""
    if not cells:
        raise ValueError("run_cells_stacked: no cells")
    first = cells[0]
    allowed = f"stacked cells may differ only in controller {', '.join(PER_GROUP_FIELDS)}"
    for cell in cells:
        if cell.protocol != "frozen":
            raise ValueError(f"run_cells_stacked: only the frozen protocol can stack configurations "
                             f"(cell {cell.cell_id} has protocol {cell.protocol!r})")
        if cell.eval.streaming:
            raise ValueError(f"run_cells_stacked: eval.streaming ticks per turn of one conversation and cannot "
                             f"be stacked (cell {cell.cell_id})")
        mine, theirs = cell.relevant_settings(), first.relevant_settings()
        for name in ("model", "seed", "data", "train", "eval", "load"):
            if mine[name] != theirs[name]:
                detail = ""
                if isinstance(mine[name], dict):
                    keys = sorted(k for k in set(mine[name]) | set(theirs[name])
                                  if mine[name].get(k) != theirs[name].get(k))
                    detail = f" ({', '.join(f'{name}.{k}' for k in keys)})"
                raise ValueError(f"run_cells_stacked: cells differ in {name}{detail}: {first.cell_id} vs "
                                 f"{cell.cell_id}; {allowed}")
    on = [cell for cell in cells if cell.pt_config is not None]
    for cell in on[1:]:
        reference, other = on[0].pt_config.to_dict(), cell.pt_config.to_dict()
        differing = sorted(k for k in reference if k not in PER_GROUP_FIELDS and reference[k] != other.get(k))
        if differing:
            raise ValueError(f"run_cells_stacked: controllers differ in {', '.join(f'controller.{k}' for k in differing)} "
                             f"({on[0].cell_id}: {', '.join(f'{k}={reference[k]!r}' for k in differing)}; "
                             f"{cell.cell_id}: {', '.join(f'{k}={other.get(k)!r}' for k in differing)}); {allowed}")


def run_cells_stacked(cells: list[CellSpec], run_dir: RunDir | str | Path, device: torch.device | str = "cpu",
                      stack_size: int | None = None) -> list[ArmResult]:
    """Run several ``frozen`` cells of one seed in stacked forwards; returns what
    :func:`~chronovisor.eval.protocols.run_cell` returns for each cell, in order.

    Args:
        cells: cells that :func:`check_stackable` accepts (else a ValueError names the setting).
        run_dir: the run directory (the pretrained base is cached there, once for all cells).
        device: where the model runs.
        stack_size: at most this many cells per stacked controller (default: all); memory grows
            with activations of ``stack_size`` × ``eval.batch_size`` / ``train.batch_size``
            conversations per forward.

    ``wall_time_s`` of each record is its share of the whole call.
    """
    import chronovisor

    check_stackable(cells)
    if stack_size is not None and stack_size < 1:
        raise ValueError(f"run_cells_stacked: stack_size must be >= 1 (got {stack_size})")
    started = time.perf_counter()
    device = torch.device(device)
    first = cells[0]
    prepared = prepare_cell(first, RunDir.of(run_dir), device)
    base = prepared.base
    base.requires_grad_(False)
    before = tensor_hashes(base)
    data_hash, warmup = warmup_inputs(base, first, prepared.conversations, device)
    heldout = list(heldout_batches(base, prepared.conversations.heldout, first.eval.batch_size, device))

    shared = next((cell.pt_config for cell in cells if cell.pt_config is not None), None)
    size = stack_size or len(cells)
    parts = []
    for offset in range(0, len(cells), size):
        stack = cells[offset: offset + size]
        # The off arm's config: the shared fields of the on arms, mode off (no field reaches the router).
        configs = [cell.pt_config if cell.pt_config is not None else
                   dataclasses.replace(shared or cell.arm_config(), mode=OFF, seed=cell.seed) for cell in stack]
        groups = len(configs)
        wrapped = chronovisor.wrap(base, configs if groups > 1 else configs[0], step_mode="manual",
                                   stacks=controller_stacks(base))
        controller = wrapped.controller
        views = field_views(controller, groups)
        trajectories = [FieldTrajectory(first.eval.trajectory_every) for _ in stack]

        def tick(_step: int, loss: torch.Tensor, controller=controller, views=views, trajectories=trajectories) -> None:
            controller.step(loss=loss)
            for trajectory, view in zip(trajectories, views, strict=True):
                trajectory.maybe_record(view)

        torch.manual_seed(first.seed)
        warm_up(wrapped, warmup, groups, tick)
        accumulators = [HeldoutAccumulator() for _ in stack]
        run_heldout(wrapped, heldout, accumulators)
        noncausal = noncausal_losses(wrapped, heldout, groups) or [None] * groups
        for cell, accumulator, view, trajectory, leak in zip(stack, accumulators, views, trajectories, noncausal,
                                                             strict=True):
            metrics, routing = accumulator.finish(cell.eval, wrapped.info.num_experts, cell.seed)
            metrics = dataclasses.replace(metrics, noncausal_loss=leak)
            fields = None if cell.is_off else summarize_fields(view, trajectory)
            parts.append((cell, metrics, routing, fields, ModelSummary.of(wrapped.info, controller_stacks(base))))
        wrapped.unwrap()
    changed = count_changed(base, before)
    check_base_unchanged(first.protocol, changed)
    share = (time.perf_counter() - started) / len(cells)
    return [ArmResult(CellRecord.build(
        cell, pairing=Pairing(prepared.init_hash, data_hash), model_info=model_info, heldout=metrics,
        loss_floor=prepared.conversations.loss_floor, baselines=prepared.conversations.baselines, train=None, fields=fields, base_params_changed=changed,
        device=device, wall_time_s=share), routing) for cell, metrics, routing, fields, model_info in parts]
