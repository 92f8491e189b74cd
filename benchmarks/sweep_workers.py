"""Sweep throughput: cells/hour of ``chronovisor sweep`` today's way vs the default worker pool.

The quickstart grid (``configs/quickstart.yaml``: joint, mixtral-tiny, 7 cells per seed of 400 steps)
for one seed (``--quick``: 5 steps), so that a run takes minutes, run as the CLI runs it, in subprocesses
(process start, imports and the pool's spawns included), alternately:

* ``one process``: ``--workers 1``: one process with torch's default thread count (the cores),
  which is what ``chronovisor sweep`` did before the pool;
* ``pool``: the default: one worker process per usable core, one torch thread each.

``OMP_NUM_THREADS`` is removed from both environments. Reported: cells/hour of each (median
over the rounds), their ratio (target ≥ 1.8 on 2 cores), and whether both wrote the same cells
(their held-out losses are compared but not required equal: one and two threads sum in another
order, and joint training amplifies a rounding difference into a different model).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import Context, row

NAME = "sweep_workers"
TARGET = 1.8
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def _sweep(out: Path, overrides: list[str], workers: list[str]) -> float:
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    command = [sys.executable, "-m", "chronovisor.cli", "sweep", str(CONFIG), "--out", str(out), "--no-progress",
               *workers, *[item for override in overrides for item in ("--set", override)]]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=3600)
    return time.perf_counter() - start


def _losses(run_dir: Path) -> dict[str, float]:
    return {path.stem: json.loads(path.read_text())["heldout"]["loss"]
            for path in sorted((run_dir / "cells").glob("*.json"))}


def run(ctx: Context) -> dict[str, Any]:
    from chronovisor.eval.sweep import usable_cores

    steps, seeds, rounds, nulls = (5, 1, 1, 10) if ctx.quick else (400, 1, 2, 100)
    overrides = [f"train.steps={steps}", f"seeds={seeds}", f"eval.null_permutations={nulls}"]
    arms = {"one process": ["--workers", "1"], "pool": []}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    losses: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="sweep_workers_") as root:
        for r in range(rounds):
            for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                out = Path(root) / f"{name.replace(' ', '_')}_{r}"
                seconds[name].append(_sweep(out, overrides, arms[name]))
                losses[name] = _losses(out)
    cells = len(losses["pool"])
    per_hour = {name: [3600 * cells / s for s in values] for name, values in seconds.items()}
    median = {name: statistics.median(values) for name, values in per_hour.items()}
    speedup = median["pool"] / median["one process"]
    same_cells = sorted(losses["pool"]) == sorted(losses["one process"])
    deltas = [abs(losses["pool"][c] - losses["one process"][c]) / abs(losses["one process"][c])
              for c in losses["pool"] if c in losses["one process"]]
    identical = sum(delta == 0 for delta in deltas)
    grid = (f"quickstart grid, {cells} cells ({seeds} seed(s) × 7), train.steps={steps}, "
            f"eval.null_permutations={nulls}, {usable_cores()} cores")
    rows = [
        row(NAME, f"cells/hour, one process × {usable_cores()} threads ({grid})", median["one process"],
            note=f"{rounds} round(s), median {statistics.median(seconds['one process']):.0f} s per sweep"),
        row(NAME, f"cells/hour, pool of {usable_cores()} workers × 1 thread", median["pool"],
            note=f"median {statistics.median(seconds['pool']):.0f} s per sweep"),
        row(NAME, "speedup: pool / one process", speedup, "×", f"≥ {TARGET}", speedup >= TARGET),
        row(NAME, "same cells written", "yes" if same_cells else "no: other cells", met=same_cells,
            note=f"held-out losses {identical}/{len(deltas)} bit-identical, max relative Δ "
                 f"{max(deltas, default=0.0):.1e}: 1 vs {usable_cores()} threads sum in another order and "
                 f"joint training amplifies it; at equal thread counts the records are bit-identical "
                 f"(tests/test_sweep.py)"),
    ]
    return {"config": str(CONFIG), "overrides": overrides, "cells": cells, "rounds": rounds, "seconds": seconds,
            "cells_per_hour": per_hour, "speedup": speedup, "relative_loss_deltas": deltas, "rows": rows}
