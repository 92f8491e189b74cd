"""The Ray engine of ``chronovisor sweep``: every unfinished stack of cells is one Ray Tune trial.

    pip install 'chronovisor[ray]'                                  # on every node, same environment
    ray start --head --port 6379                                    # on the head machine
    ray start --address HEAD:6379                                   # on every other machine
    chronovisor sweep CONFIG --out /shared/runs/NAME --engine ray --address HEAD:6379 [--gpus-per-cell 0.25]

Each trial declares its resources — one CPU (one torch thread, as a local worker: the records are
those of the local engine) and ``--gpus-per-cell`` of a GPU, so that a fraction lets several small
cells share one GPU — and writes the same files into the same run directory as the local engine
(:class:`~chronovisor.eval.rundir.RunDir`). The run directory must therefore be on storage every
node mounts at the same path; Tune's own experiment state goes to ``RUN_DIR/ray/``.

Crash safety and resume come from the run directory, not from Tune's state: a trial runs a stack
only while it holds the stack's claim (so a local sweep on the same directory, or a second Ray
sweep, never runs it twice), a cell is finished once its file is there, and re-running the same
command after a crash — of a trial, a node, the driver or the whole cluster — plans trials for
the unfinished cells only. Trials that fail are reported together at the end, naming their cells.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from chronovisor.eval.config import SweepConfig
from chronovisor.eval.errors import EvalError
from chronovisor.eval.rundir import RunDir
from chronovisor.eval.specs import CellSpec
from chronovisor.eval.sweep import SweepOutcome, finish_run, plan_stacks, prepare_run, run_stack

#: CPUs a trial declares; the cell runs one torch thread, as a worker of the local engine does.
CPUS_PER_CELL = 1


def _import_ray() -> Any:
    try:
        import ray
        from ray import tune
    except ImportError:
        raise EvalError("--engine ray needs Ray Tune: pip install 'chronovisor[ray]' (or 'ray[tune]'), "
                        "on this machine and every node of the cluster") from None
    return ray, tune


def run_sweep_ray(config: SweepConfig, run_dir: RunDir | str | Path, *, address: str | None = None,
                  gpus_per_cell: float = 0.0, progress: bool = True, command: list[str] | None = None) -> SweepOutcome:
    """Run the unfinished cells of a sweep as Ray Tune trials, one per stack.

    Args:
        config: the validated sweep.
        run_dir: the run directory, on storage every node of the cluster mounts at the same path.
        address: the cluster's head, ``HOST:PORT`` (default: ``RAY_ADDRESS``, else a Ray started
            in this process on this machine alone).
        gpus_per_cell: GPUs each trial declares (0: the cells run on the CPU; a fraction in (0, 1]
            lets ``1 / fraction`` cells share a GPU; cells then run on the GPU Ray assigns).
        progress: Tune's progress table.
        command: the command line recorded in the manifest (default ``sys.argv``).

    Returns:
        What the sweep did (``ran``: the cells the trials of this call ran).

    Raises:
        EvalError: Ray is not installed, or ``gpus_per_cell`` is out of range.
        RunDirError: ``run_dir`` holds the run of another config.
        RuntimeError: trials failed (naming their cells); the others' cells are saved.
    """
    if not 0 <= gpus_per_cell <= 1:
        raise EvalError(f"--gpus-per-cell must be in [0, 1] (got {gpus_per_cell}); a cell runs on one device")
    ray, tune = _import_ray()
    run_dir = RunDir(Path(RunDir.of(run_dir).path).resolve())
    run_dir, stacks, skipped = prepare_run(config, run_dir, command=command or sys.argv,
                                           num_processes=len(plan_stacks(config.cells(), config.stack_size)))
    todo = [stack for stack in stacks if not all(run_dir.is_finished(cell.cell_id) for cell in stack)]
    if not todo:
        return finish_run(config, run_dir, [], skipped)
    if not ray.is_initialized():
        # Trials keep the driver's working directory (a config may name relative paths) and
        # run one OpenMP thread per declared CPU.
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=progress,
                 runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0", "OMP_NUM_THREADS": str(CPUS_PER_CELL)}})
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")   # the cell files are the results
    trainable = tune.with_resources(tune.with_parameters(_trial, stacks=todo, run_dir=str(run_dir.path)),
                                    {"cpu": CPUS_PER_CELL, "gpu": gpus_per_cell})
    tuner = tune.Tuner(
        trainable,
        param_space={"stack": tune.grid_search(list(range(len(todo))))},
        tune_config=tune.TuneConfig(reuse_actors=False),
        run_config=tune.RunConfig(name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                  storage_path=str(run_dir.path / "ray"), verbose=1 if progress else 0,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
    results = tuner.fit()
    ran, failures = [], []
    for result in results:
        index = result.config["stack"]
        if result.error is not None:
            names = ", ".join(cell.cell_id for cell in todo[index])
            failures.append(f"{names}: {str(result.error).strip().splitlines()[-1]}")
        else:
            ran += result.metrics.get("ran", [])
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(todo)} Ray trials failed (their cells rerun when you "
                           f"rerun the sweep): " + "; ".join(failures))
    return finish_run(config, run_dir, ran, skipped)


def _trial(params: dict[str, Any], stacks: list[list[CellSpec]], run_dir: str) -> None:
    """One Ray Tune trial: claim and run one stack, report the cells it ran.

    Args:
        params: ``{"stack": index into stacks}``.
        stacks: the unfinished stacks of the sweep.
        run_dir: the run directory (an absolute path every node mounts).
    """
    import ray
    import torch
    from ray import tune

    torch.set_num_threads(CPUS_PER_CELL)
    index = params["stack"]
    device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    directory = RunDir(run_dir)
    claim = directory.try_claim(stacks[index][0].cell_id)
    ran: list[str] = []
    if claim is not None:                       # else another sweep is running this stack now
        with claim:
            ran = run_stack(stacks[index], directory, device, index)
    tune.report({"ran": ran, "cells": len(ran)})
