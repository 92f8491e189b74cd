"""Resumable, shardable sweeps: the cells of a :class:`~chronovisor.eval.config.SweepConfig`, run in
stacks, one atomic JSON per cell in a :class:`~chronovisor.eval.rundir.RunDir`.

    chronovisor sweep configs/quickstart.yaml --out runs/quickstart [--set train.steps=20 ...]
    accelerate launch --multi_gpu --num_processes 2 -m chronovisor.cli sweep CONFIG --out RUN_DIR

A *stack* is a list of cells that run together: one cell (:func:`~chronovisor.eval.protocols.run_cell`)
or, with ``batch_configs: N`` (``frozen``, not streaming), up to N cells of a (model, seed) whose
controllers differ only in η, P, mode (and the off arm), through
:func:`~chronovisor.eval.stacked.run_cells_stacked`.

Re-running the same command skips finished cells; an interrupted sweep loses at most the cells in
progress; a stack runs only its unfinished cells. Cells are bit-reproducible for a fixed device
and torch thread count (``accelerate launch`` sets OMP_NUM_THREADS=1 per process; a lone process
uses torch's default): resuming under another process layout is allowed, and the report flags
on/off pairs whose numerics differ. Under ``accelerate launch`` each process takes every
``num_processes``-th stack, so each cell is run exactly once. On a CPU-only machine accelerate
starts several processes only through its torchrun path, ``--multi_gpu`` (the name
notwithstanding); the sweep then uses ``PartialState(cpu=True)`` (gloo) so the processes see their
ranks.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chronovisor.eval.config import SweepConfig
from chronovisor.eval.protocols import run_cell
from chronovisor.eval.record import CellRecord
from chronovisor.eval.rundir import RunDir
from chronovisor.eval.specs import CellSpec
from chronovisor.eval.stacked import run_cells_stacked, settings_key, stack_key


def plan_stacks(cells: list[CellSpec], stack_size: int) -> list[list[CellSpec]]:
    """The cells in stacks that run together (one :func:`run_cells_stacked` call each).

    ``stack_size`` 1: one cell per stack. Otherwise the cells of one (model, seed, settings) whose
    controllers can share a stacked controller (same :func:`~chronovisor.eval.stacked.stack_key`:
    e.g. the pt / pressure / temperature arms, and separately the loss_free arms) are split into
    the fewest near-equal stacks of at most ``stack_size`` cells, the off arm joining the first
    such set of its seed. Deterministic in its arguments, so every process computes the same
    stacks. Cells no stacked run accepts (other protocols, streaming) stay alone.
    """
    if stack_size <= 1:
        return [[cell] for cell in cells]
    stackable: dict[tuple, list[CellSpec]] = {}
    off_arms: dict[str, list[CellSpec]] = {}
    for cell in cells:
        if cell.protocol != "frozen" or cell.eval.streaming:
            stackable[("alone", cell.cell_id)] = [cell]
        elif cell.is_off:
            off_arms.setdefault(settings_key(cell), []).append(cell)
        else:
            stackable.setdefault((settings_key(cell), stack_key(cell)), []).append(cell)
    for settings, arms in off_arms.items():
        key = next((key for key in stackable if key[0] == settings), None)
        if key is None:
            stackable[("off", settings)] = arms
        else:
            stackable[key] = arms + stackable[key]
    stacks = []
    for members in stackable.values():
        count = -(-len(members) // stack_size)
        size, extra = divmod(len(members), count)
        start = 0
        for i in range(count):
            end = start + size + (i < extra)
            stacks.append(members[start:end])
            start = end
    return stacks


def shard_stacks(stacks: list[list[CellSpec]], process_index: int, num_processes: int) -> list[list[CellSpec]]:
    """This process's stacks: every ``num_processes``-th from ``process_index``."""
    return stacks[process_index::num_processes]


@dataclass
class SweepOutcome:
    """What one process did: cells of its shard run now, skipped (already finished), and in total."""

    run_dir: Path
    ran: list[str]
    skipped: list[str]
    total_cells: int
    complete: bool


def run_sweep(config: SweepConfig, run_dir: RunDir | str | Path, *, process_index: int = 0, num_processes: int = 1,
              device: Any = "cpu", progress: bool = True, command: list[str] | None = None,
              on_cell: Callable[[CellRecord], None] | None = None) -> SweepOutcome:
    """Run this process's shard of stacks, skipping finished cells.

    Args:
        config: the validated sweep.
        run_dir: the run directory (created, or resumed if it holds this config's run).
        process_index, num_processes: this process's rank and the number of processes.
        device: where the models run.
        progress: show a progress bar.
        command: the command line recorded in the manifest (default ``sys.argv``).
        on_cell: called with each cell's record once it is saved (e.g. to log it to a tracker).

    Raises:
        RunDirError: ``run_dir`` holds the run of another config.

    The last process to find every cell finished stamps the manifest complete.
    """
    from tqdm.auto import tqdm

    run_dir = RunDir.of(run_dir)
    run_dir.manifest_for(config.config_hash)
    cells = config.cells()
    if process_index == 0:
        run_dir.start(name=config.name, resolved=config.resolved, config_hash=config.config_hash,
                      cell_ids=[cell.cell_id for cell in cells], command=command or sys.argv,
                      num_processes=num_processes, stack_size=config.stack_size)
    stacks = shard_stacks(plan_stacks(cells, config.stack_size), process_index, num_processes)
    mine = [cell for stack in stacks for cell in stack]
    todo_stacks = [[cell for cell in stack if not run_dir.is_finished(cell.cell_id)] for stack in stacks]
    pending = {cell.cell_id for stack in todo_stacks for cell in stack}
    skipped = [cell.cell_id for cell in mine if cell.cell_id not in pending]
    ran = []
    bar = tqdm(total=len(mine), initial=len(skipped), desc=f"sweep {config.name} [{process_index + 1}/{num_processes}]",
               unit="cell", position=process_index, disable=not progress, dynamic_ncols=True)
    try:
        for todo in todo_stacks:
            if not todo:
                continue
            names = ", ".join(cell.cell_id for cell in todo)
            bar.set_postfix_str(names if len(todo) == 1 else f"{todo[0].cell_id} +{len(todo) - 1} stacked", refresh=True)
            started = time.perf_counter()
            try:
                if len(todo) == 1:
                    results = [run_cell(todo[0], run_dir, device=device)]
                else:
                    results = run_cells_stacked(todo, run_dir, device=device)
            except Exception as error:
                raise RuntimeError(f"{'cell' if len(todo) == 1 else 'stacked cells'} {names} failed: {error}") from error
            elapsed = (time.perf_counter() - started) / len(todo)
            for result in results:
                result.record.wall_time_s = elapsed
                result.record.process_index = process_index
                run_dir.save_cell(result)
                ran.append(result.record.cell_id)
                if on_cell is not None:
                    on_cell(result.record)
                bar.update(1)
    finally:
        bar.close()
    complete = all(run_dir.is_finished(cell.cell_id) for cell in cells)
    if complete:
        run_dir.mark_finished()
    return SweepOutcome(run_dir.path, ran, skipped, len(cells), complete)


def distributed_shard() -> tuple[int, int, Any]:
    """(process_index, num_processes, device) from accelerate's PartialState.

    Without CUDA, ``PartialState(cpu=True)`` so that processes started by ``accelerate launch``
    (torchrun) join a gloo group and see their ranks instead of each believing it is alone.
    """
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and state.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but accelerate sees {state.num_processes}; "
                           f"each process would run every cell")
    return state.process_index, state.num_processes, state.device


def describe_cells(config: SweepConfig, run_dir: RunDir | None = None) -> str:
    """One line per cell (for ``--dry-run``): its id, prefixed ``done``/``todo`` when a run directory is given."""
    lines = []
    for cell in config.cells():
        state = ""
        if run_dir is not None:
            state = "done " if run_dir.is_finished(cell.cell_id) else "todo "
        lines.append(f"{state}{cell.cell_id}")
    return "\n".join(lines)
