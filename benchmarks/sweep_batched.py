"""(d) Sweep throughput: a 3 × 3 η × P grid of the ``frozen`` protocol, sequential vs stacked.

Nine configurations (η ∈ {0.0075, 0.015, 0.03} × P ∈ {0.25, 0.5, 1.0}, mode ``pt``, seed 0) on one
frozen base (``mixtral-tiny``, the quickstart's model, pretrained briefly by the protocol's own
``pretrained_base`` — untimed, cached in the work directory as in a sweep) and the quickstart's data
sizes (the synthetic phase-structured conversations). Both arms are the library's own entry points:

* **sequential**: ``eval.protocols.run_cell`` per cell, nine times (what a sweep does by default);
* **stacked**: one ``eval.protocols.run_cells_stacked`` call (what ``batch_configs: 9`` does): the
  base is loaded and hashed once, wrapped once with a stacked controller
  (``PTController(L, E, K, [cfg × 9])``), every warm-up and held-out batch is fed repeated nine
  times along the batch axis (group c = configuration c, one tick per batch with each group's own
  loss), and the outputs are split per group into the nine cell records.

The arms run interleaved (alternating order) and are timed end to end; inside each run the time is
split by timing the library functions as they are called: *setup* (``load_conversations``,
``pretrained_base``: cached-base load and hash check), *hashing* (``state_hash``/``tensor_hashes``
of the base: pairing and frozen checks), *metrics* (``_HeldoutAccumulator.finish``: per-layer
separation with its permutation null, NMI, load balance — per cell in both arms) and the rest,
*model* (wrapping, warm-up and held-out forwards, controller ticks, per-group bookkeeping). The
results must agree: per cell, every record field (floats to float32 rounding: a 9× larger batch
may take other GEMM kernels, which moves some activations by an ulp) and every held-out routing
decision.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import Context, row
from chronovisor.controllers import PTConfig

NAME = "sweep_batched"
MODEL = "mixtral-tiny"
ETAS = (0.0075, 0.015, 0.03)
PRESSURES = (0.25, 0.5, 1.0)
TARGET = 3.0
VOLATILE = ("wall_time_s", "process_index")
PHASES = ("setup", "hashing", "metrics")


def _specs(quick: bool):
    from chronovisor.eval import protocols as P

    generator = dict(min_turn_length=20, max_turn_length=40, min_length=160, max_length=260)   # quickstart
    data = P.DataSpec(num_train=16, num_heldout=4 if quick else 8, num_warmup=4 if quick else 10, generator=generator)
    train = P.TrainSpec(pretrain_steps=5 if quick else 20, lr=3e-3)
    evaluation = P.EvalSpec(null_permutations=20 if quick else 100)
    return data, train, evaluation


@contextlib.contextmanager
def _phase_timer(seconds: dict[str, float]):
    """Time the library functions of each phase (module attributes, patched for the block)."""
    from chronovisor.eval import protocols as P

    def timed(phase, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - start
        return wrapper

    patches = [(P, "load_conversations", "setup"), (P, "pretrained_base", "setup"), (P, "state_hash", "hashing"),
               (P, "tensor_hashes", "hashing"), (P._HeldoutAccumulator, "finish", "metrics")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, phase in patches:
            setattr(owner, name, timed(phase, getattr(owner, name)))
        yield seconds
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def _compare(a: Any, b: Any, where: str, out: dict[str, Any]) -> None:
    """Walk two records: largest relative float difference, and the paths of any other difference."""
    if isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
            out["different"].append(where)
        elif not (math.isnan(a) and math.isnan(b)):
            diff = abs(a - b) / max(abs(a), abs(b), 1e-12) if a != b else 0.0
            out["max_rel_diff"] = max(out["max_rel_diff"], diff)
            if not math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6):
                out["different"].append(where)
    elif isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            out["different"].append(f"{where} (keys)")
        for key in a:
            if key in b:
                _compare(a[key], b[key], f"{where}.{key}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out["different"].append(f"{where} (length)")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _compare(x, y, f"{where}[{i}]", out)
    elif a != b:
        out["different"].append(where)


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in record.items() if k not in VOLATILE}, default=float))


def run(ctx: Context) -> dict[str, Any]:
    from chronovisor.eval import protocols as P

    data, train, evaluation = _specs(ctx.quick)
    seed = ctx.seed
    configs = [PTConfig(eta=eta, pressure_scale=p, mode="pt", seed=seed) for eta in ETAS for p in PRESSURES]
    cells = [P.CellSpec("frozen", MODEL, seed, config, data, train, evaluation) for config in configs]
    groups = len(cells)
    device = ctx.device
    rounds = 1 if ctx.quick else 3

    with tempfile.TemporaryDirectory(prefix="chronovisor-bench-") as work:
        work_dir = Path(work)
        conversations = P.load_conversations(data, seed, MODEL, "frozen")
        P.pretrained_base(cells[0], conversations, work_dir, device)        # pretrain + cache, untimed

        arms = {
            "sequential": lambda: [P.run_cell(cell, work_dir, device) for cell in cells],
            "stacked": lambda: P.run_cells_stacked(cells, work_dir, device),
        }
        timing: dict[str, dict[str, list[float]]] = {arm: defaultdict(list) for arm in arms}
        outputs: dict[str, list] = {}
        arms["stacked"]()                                                   # warm-up (allocator, caches)
        for r in range(rounds):
            for arm in (("sequential", "stacked") if r % 2 == 0 else ("stacked", "sequential")):
                seconds = dict.fromkeys(PHASES, 0.0)
                with _phase_timer(seconds):
                    start = time.perf_counter()
                    outputs[arm] = arms[arm]()
                    total = time.perf_counter() - start
                timing[arm]["total"].append(total)
                timing[arm]["model"].append(total - sum(seconds.values()))
                for phase in PHASES:
                    timing[arm][phase].append(seconds[phase])

    # ---- equality: stacked cell c vs run_cell's cell c
    loss_diff, routing_agree, differences, max_rel = [], [], [], 0.0
    for seq, stk in zip(outputs["sequential"], outputs["stacked"], strict=True):
        loss_diff.append(abs(seq.record["heldout"]["loss"] - stk.record["heldout"]["loss"]))
        routing_agree.append(min(float(np.mean(seq.routing[name] == stk.routing[name])) for name in seq.routing)
                             if list(seq.routing) == list(stk.routing) else 0.0)
        out = {"max_rel_diff": 0.0, "different": []}
        _compare(_plain(seq.record), _plain(stk.record), seq.record["cell_id"], out)
        max_rel = max(max_rel, out["max_rel_diff"])
        differences += out["different"]

    med = {arm: {phase: float(np.median(values)) for phase, values in phases.items()} for arm, phases in timing.items()}
    total_speedup = med["sequential"]["total"] / med["stacked"]["total"]
    model_speedup = med["sequential"]["model"] / med["stacked"]["model"]
    per_round = [s / b for s, b in zip(timing["sequential"]["total"], timing["stacked"]["total"], strict=True)]
    cells_per_min = {arm: 60.0 * groups / med[arm]["total"] for arm in med}
    equal = not differences and min(routing_agree) == 1.0
    label = f"{groups} cells ({len(ETAS)}η×{len(PRESSURES)}P), {MODEL}, frozen, {device.type}"

    def split(arm: str) -> str:
        return ", ".join(f"{phase} {med[arm][phase]:.2f}" for phase in ("model", *PHASES))

    rows = [
        row(NAME, f"end-to-end speedup, run_cell × {groups} / run_cells_stacked ({label})", total_speedup, "×",
            f"≥ {TARGET:g}", total_speedup >= TARGET,
            f"sequential {med['sequential']['total']:.2f} s, stacked {med['stacked']['total']:.2f} s; per round "
            + ", ".join(f"{x:.2f}" for x in per_round)),
        row(NAME, "model-phase speedup (wrap, warm-up + held-out forwards, ticks)", model_speedup, "×",
            note=f"seconds: sequential {split('sequential')}; stacked {split('stacked')}"),
        row(NAME, "cells per minute: sequential → stacked", f"{cells_per_min['sequential']:.1f} → "
            f"{cells_per_min['stacked']:.1f}", note="end to end, as a sweep runs them"),
        row(NAME, "stacked == run_cell (every record field, routing)", "equal" if equal else "DIFFERENT", met=equal,
            note=f"max |Δloss| {max(loss_diff):.2g}, max relative float difference {max_rel:.2g} (float32 "
                 f"rounding), min routing agreement {min(routing_agree):.6f}"
                 + (f"; differing: {', '.join(differences[:5])}" if differences else "")),
    ]
    return {
        "model": MODEL, "protocol": "frozen", "grid": {"eta": ETAS, "pressure_scale": PRESSURES}, "rounds": rounds,
        "data": {"num_warmup": data.num_warmup, "num_heldout": data.num_heldout, **data.generator},
        "pretrain_steps": train.pretrain_steps, "null_permutations": evaluation.null_permutations,
        "seconds": {arm: dict(phases) for arm, phases in timing.items()}, "median_seconds": med,
        "end_to_end_speedup": total_speedup, "model_phase_speedup": model_speedup, "per_round_speedup": per_round,
        "cells_per_minute": cells_per_min,
        "equality": {"loss_abs_diff": loss_diff, "routing_agreement": routing_agree, "max_relative_float_diff": max_rel,
                     "differences": differences, "equal": equal},
        "rows": rows,
    }
