"""Resumable, kill-safe sweeps on every core: the cells of a
:class:`~chronovisor.eval.config.SweepConfig`, run in stacks, one atomic JSON per cell in a
:class:`~chronovisor.eval.rundir.RunDir`.

    chronovisor sweep configs/quickstart.yaml --out runs/quickstart [--workers N] [--set train.steps=20 ...]
    chronovisor sweep CONFIG --out RUN_DIR --engine ray --address HEAD:6379      # a Ray cluster
    accelerate launch --multi_gpu --num_processes 2 -m chronovisor.cli sweep CONFIG --out RUN_DIR

A *stack* is a list of cells that run together: one cell (:func:`~chronovisor.eval.protocols.run_cell`)
or, with ``batch_configs: N`` (``frozen``, not streaming), up to N cells of a (model, seed) whose
controllers differ only in η, P, mode (and the off arm), through
:func:`~chronovisor.eval.stacked.run_cells_stacked`.

**Workers.** ``chronovisor sweep`` starts N worker processes (default: the cores this process may
use, :func:`usable_cores`), each with ``cores // N`` torch threads (1 by default;
``OMP_NUM_THREADS`` overrides it): on a CPU,
independent cells in parallel processes beat one process with many threads, whose OpenMP
barriers stall whenever another process takes a core. Stacks are handed out dynamically: each
worker walks the plan (its own share first, then the others') and runs every unfinished stack
it can *claim* (:meth:`~chronovisor.eval.rundir.RunDir.try_claim`, an exclusive lock a dead
process cannot keep), so a slow cell does not idle the rest, and every process working on the
directory — the workers, a second ``chronovisor sweep`` on the same ``--out``, the processes of
``accelerate launch``, the trials of :mod:`~chronovisor.eval.ray_engine` — runs each cell once.

Re-running the same command skips finished cells; an interrupted sweep loses at most the cells in
progress (the next run removes the claims and temporary files the dead processes left); a stack
runs only its unfinished cells. Cells are bit-reproducible for a fixed device and torch thread
count (recorded per cell): resuming under another process layout is allowed, and the report
flags on/off pairs whose numerics differ. On a CPU-only machine accelerate starts several
processes only through its torchrun path, ``--multi_gpu`` (the name notwithstanding); the sweep
then uses ``PartialState(cpu=True)`` (gloo) so the processes see their ranks.
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
    """This process's share of the stacks: every ``num_processes``-th from ``process_index``."""
    return stacks[process_index::num_processes]


def claim_order(stacks: list[list[CellSpec]], index: int, count: int) -> list[list[CellSpec]]:
    """The order in which process ``index`` of ``count`` tries to claim the stacks: its own share
    first, so that the processes start on different work, then the others'.

    The share is dealt out by (model, seed) when there are at least ``count`` of them: the arms of
    a ``frozen`` seed share one pretrained base, which the first process to need it trains while
    any other process that needs it waits, so the processes start on different seeds. Otherwise
    stack by stack (:func:`shard_stacks`).
    """
    groups = list(dict.fromkeys((stack[0].model, stack[0].seed) for stack in stacks))
    if len(groups) < count:
        return shard_stacks(stacks, index, count) + [stack for i, stack in enumerate(stacks) if i % count != index]
    own = {group for i, group in enumerate(groups) if i % count == index}
    return ([stack for stack in stacks if (stack[0].model, stack[0].seed) in own]
            + [stack for stack in stacks if (stack[0].model, stack[0].seed) not in own])


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` without one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_threads(workers: int) -> int:
    """Torch threads of each of ``workers`` worker processes: ``OMP_NUM_THREADS`` when it is set,
    else the usable cores shared out (at least 1)."""
    setting = os.environ.get("OMP_NUM_THREADS", "")
    return int(setting) if setting.isdigit() and int(setting) > 0 else max(1, usable_cores() // workers)


@dataclass
class SweepOutcome:
    """What one sweep process did: cells run now (by it or its workers), cells already finished
    when it started, and in total."""

    run_dir: Path
    ran: list[str]
    skipped: list[str]
    total_cells: int
    complete: bool


def prepare_run(config: SweepConfig, run_dir: RunDir | str | Path, *, command: list[str] | None,
                num_processes: int, write_manifest: bool = True) -> tuple[RunDir, list[list[CellSpec]], list[str]]:
    """Check (and write) the manifest, remove what dead processes left, and plan the stacks.

    Args:
        config: the validated sweep.
        run_dir: the run directory (created, or resumed if it holds this config's run).
        command: the command line recorded in the manifest (default ``sys.argv``).
        num_processes: processes that run cells (recorded in the manifest).
        write_manifest: False for every process but one when several start together.

    Returns:
        The RunDir, the stacks (:func:`plan_stacks`) and the ids of the cells already finished.

    Raises:
        RunDirError: ``run_dir`` holds the run of another config.
    """
    run_dir = RunDir.of(run_dir)
    run_dir.manifest_for(config.config_hash)
    cells = config.cells()
    if write_manifest:
        run_dir.start(name=config.name, resolved=config.resolved, config_hash=config.config_hash,
                      cell_ids=[cell.cell_id for cell in cells], command=command or sys.argv,
                      num_processes=num_processes, stack_size=config.stack_size)
    run_dir.clean_stale()
    finished = [cell.cell_id for cell in cells if run_dir.is_finished(cell.cell_id)]
    return run_dir, plan_stacks(cells, config.stack_size), finished


def finish_run(config: SweepConfig, run_dir: RunDir, ran: list[str], skipped: list[str]) -> SweepOutcome:
    """Stamp the manifest complete if every cell is finished; the outcome of this process."""
    cells = config.cells()
    complete = all(run_dir.is_finished(cell.cell_id) for cell in cells)
    if complete:
        run_dir.mark_finished()
    return SweepOutcome(run_dir.path, ran, skipped, len(cells), complete)


def run_stack(stack: list[CellSpec], run_dir: RunDir, device: Any, process_index: int) -> list[str]:
    """Run the unfinished cells of a claimed stack and save each; returns their ids.

    Args:
        stack: cells that run together (one, or a stack :func:`run_cells_stacked` accepts).
        run_dir: where their files go.
        device: where the models run.
        process_index: recorded in each cell (which sweep process ran it).

    Raises:
        RuntimeError: naming the cells, when running them failed.
    """
    todo = [cell for cell in stack if not run_dir.is_finished(cell.cell_id)]
    if not todo:
        return []
    names = ", ".join(cell.cell_id for cell in todo)
    started = time.perf_counter()
    try:
        results = [run_cell(todo[0], run_dir, device=device)] if len(todo) == 1 else \
            run_cells_stacked(todo, run_dir, device=device)
    except Exception as error:
        raise RuntimeError(f"{'cell' if len(todo) == 1 else 'stacked cells'} {names} failed: {error}") from error
    elapsed = (time.perf_counter() - started) / len(todo)
    for result in results:
        result.record.wall_time_s = elapsed
        result.record.process_index = process_index
        run_dir.save_cell(result)
    return [cell.cell_id for cell in todo]


def run_claimed(stacks: list[list[CellSpec]], run_dir: RunDir, *, device: Any, process_index: int,
                on_cell: Callable[[str], None] = lambda cell_id: None,
                stop: Callable[[], bool] = lambda: False) -> list[str]:
    """Run, in order, every unfinished stack of ``stacks`` that this process can claim.

    Args:
        stacks: the stacks to try (see :func:`claim_order`).
        run_dir: the run directory.
        device: where the models run.
        process_index: recorded in each cell.
        on_cell: called with each cell id saved.
        stop: checked before each stack; True ends the loop.

    Returns:
        The ids of the cells this process ran.
    """
    ran = []
    for stack in stacks:
        if stop():
            break
        if all(run_dir.is_finished(cell.cell_id) for cell in stack):
            continue
        claim = run_dir.try_claim(stack[0].cell_id)
        if claim is None:                       # another process is running it
            continue
        with claim:
            for cell_id in run_stack(stack, run_dir, device, process_index):
                ran.append(cell_id)
                on_cell(cell_id)
    return ran


def run_sweep(config: SweepConfig, run_dir: RunDir | str | Path, *, workers: int = 1, process_index: int = 0,
              num_processes: int = 1, device: Any = "cpu", progress: bool = True,
              command: list[str] | None = None, on_cell: Callable[[CellRecord], None] | None = None) -> SweepOutcome:
    """Run every unfinished cell this process (and its workers) can claim, skipping finished cells.

    Args:
        config: the validated sweep.
        run_dir: the run directory (created, or resumed if it holds this config's run).
        workers: 1: run the cells in this process, with its torch threads. N > 1: start N worker
            processes (``spawn``) of :func:`worker_threads` torch threads each.
        process_index, num_processes: this process's rank and the number of processes started
            together (``accelerate launch``); each starts its own workers.
        device: where the models run.
        progress: show a progress bar.
        command: the command line recorded in the manifest (default ``sys.argv``).
        on_cell: called with each cell's record once it is saved (e.g. to log it to a tracker).

    Raises:
        RunDirError: ``run_dir`` holds the run of another config.
        RuntimeError: a cell failed (naming it; with workers, after the running cells finished).

    Whoever finds every cell finished stamps the manifest complete.
    """
    from tqdm.auto import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1 (got {workers})")
    run_dir, stacks, skipped = prepare_run(config, run_dir, command=command, num_processes=num_processes * workers,
                                           write_manifest=process_index == 0)
    total = sum(len(stack) for stack in stacks)
    bar = tqdm(total=total, initial=len(skipped), unit="cell", position=process_index, disable=not progress,
               dynamic_ncols=True, desc=f"sweep {config.name} [{process_index + 1}/{num_processes}]"
                                        + (f" {workers} workers" if workers > 1 else ""))
    order = claim_order(stacks, process_index, num_processes)

    def saved(cell_id: str) -> None:
        bar.update(1)
        if on_cell is not None:
            on_cell(run_dir.read_record(cell_id))

    try:
        if workers == 1:
            ran = run_claimed(order, run_dir, device=device, process_index=process_index, on_cell=saved)
        else:
            ran = _run_pool(order, run_dir, workers=workers, device=device, first_index=process_index * workers,
                            on_cell=saved)
    finally:
        bar.close()
    return finish_run(config, run_dir, ran, skipped)


def _run_pool(stacks: list[list[CellSpec]], run_dir: RunDir, *, workers: int, device: Any, first_index: int,
              on_cell: Callable[[str], None]) -> list[str]:
    """Run ``stacks`` in ``workers`` spawned processes; returns the cell ids they ran.

    A failing cell stops the hand-out of further stacks; the running ones finish (nothing is
    lost), then a RuntimeError carries the first failure. A worker that dies (killed, out of
    memory) counts as a failure; its claim died with it.
    """
    import multiprocessing
    import queue

    context = multiprocessing.get_context("spawn")
    messages, stop = context.Queue(), context.Event()
    threads = worker_threads(workers)
    processes = {}
    for slot in range(workers):
        process = context.Process(
            target=_worker, name=f"chronovisor-sweep-{first_index + slot}",
            args=(str(run_dir.path), claim_order(stacks, slot, workers), str(device), threads, first_index + slot,
                  messages, stop))
        process.start()
        processes[first_index + slot] = process
    ran: list[str] = []
    failure = None
    running = set(processes)
    try:
        while running:
            try:
                kind, index, value = messages.get(timeout=1.0)
            except queue.Empty:
                for index in sorted(running):
                    code = processes[index].exitcode
                    if code is not None:
                        running.discard(index)
                        failure = failure or f"sweep worker {index} died (exit code {code}) before it finished"
                        stop.set()
                continue
            if kind == "cell":
                ran.append(value)
                on_cell(value)
            elif kind == "error":
                failure = failure or value
                stop.set()
            else:
                running.discard(index)
    finally:
        stop.set()
        for process in processes.values():
            process.join(timeout=None if failure is None and not running else 60)
            if process.is_alive():
                process.terminate()
                process.join()
    if failure is not None:
        raise RuntimeError(failure)
    return ran


def _worker(run_dir: str, stacks: list[list[CellSpec]], device: str, threads: int, index: int,
            messages: Any, stop: Any) -> None:
    """A worker process of :func:`_run_pool`: claims and runs stacks, reporting each cell saved."""
    import traceback

    import torch

    torch.set_num_threads(threads)
    try:
        run_claimed(stacks, RunDir(run_dir), device=torch.device(device), process_index=index,
                    on_cell=lambda cell_id: messages.put(("cell", index, cell_id)), stop=stop.is_set)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
        traceback.print_exc()
        messages.put(("error", index, str(error)))
    finally:
        messages.put(("done", index, None))


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
