"""``chronovisor reproduce``: re-run some cells of a published run here and compare them with it.

    chronovisor reproduce docs/results/<run> --cells 4 [--out SCRATCH_DIR]

The published run directory is only read. N on-arm cells are chosen deterministically and spread
out (:func:`choose_cells`); each is re-run with its seed's off arm through the sweep's own code
(:func:`~chronovisor.eval.protocols.run_cell`, or the whole stack of
:func:`~chronovisor.eval.sweep.plan_stacks` it ran in, through
:func:`~chronovisor.eval.stacked.run_cells_stacked`) into a scratch run directory, where frozen
protocols also recompute their pretrained bases. Verdict of a re-run on-cell:

* **bit-identical**: the on arm and its off arm each ran under the published numerics (device,
  torch threads) and reproduce the held-out loss, the per-conversation losses and, where the routing
  file was published, the routing arrays exactly;
* else **inside the interval**: the re-run Δloss % (on vs its re-run off) lies inside the published
  arm's 95% prediction interval for a new seed (:func:`prediction_interval`);
* else **not reproduced**.

An arm that ran under the published numerics but gives other values is noted as "same numerics,
different result"; its cell is then judged by the interval like any other.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chronovisor.eval import metrics
from chronovisor.eval.config import SweepConfig, parse_resolved
from chronovisor.eval.errors import ConfigError, RunDirError
from chronovisor.eval.record import CellRecord, numerics
from chronovisor.eval.rundir import RESOLVED_CONFIG, RunDir, read_record_file
from chronovisor.eval.specs import CellSpec, stable_hash
from chronovisor.eval.yaml_text import load_yaml

BIT_IDENTICAL = "bit-identical"
INSIDE = "inside the interval"
NOT_REPRODUCED = "not reproduced"
SAME_NUMERICS_DIFFERENT = "same numerics, different result"
CONFIDENCE = 0.95


# ------------------------------------------------------------------------ the interval
@dataclass(frozen=True)
class PredictionInterval:
    """Where a new seed's Δloss % should fall: mean ± t_{n−1,(1+c)/2} · SD · √(1 + 1/n)."""

    mean: float
    low: float
    high: float
    n: int
    reason: str = ""

    def contains(self, value: float) -> bool:
        return math.isfinite(value) and not math.isnan(self.low) and self.low <= value <= self.high

    def describe(self) -> str:
        if math.isnan(self.low):
            return f"no interval ({self.reason})"
        return f"95% PI [{self.low:+.4g}, {self.high:+.4g}] (n={self.n})"


def prediction_interval(values, confidence: float = CONFIDENCE) -> PredictionInterval:
    """The ``confidence`` prediction interval of one new draw from the distribution of ``values``
    (Student t, sample SD with ddof 1); NaN bounds with a reason for fewer than two values."""
    from scipy import stats

    values = np.asarray(values, dtype=float).reshape(-1)
    n = len(values)
    if n < 2:
        mean = float(values.mean()) if n else math.nan
        return PredictionInterval(mean, math.nan, math.nan, n, f"{n} published seed{'s' * (n != 1)}: no spread")
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd * math.sqrt(1 + 1 / n)
    return PredictionInterval(mean, mean - half, mean + half, n)


# --------------------------------------------------------------------- the published run
@dataclass
class Published:
    """A published run directory, validated: its config, manifest and cell records (by cell id)."""

    run_dir: RunDir
    config: SweepConfig
    manifest: dict[str, Any]
    records: dict[str, CellRecord]
    cells: dict[str, CellSpec]

    def pair(self, cell: CellSpec) -> tuple[CellRecord, CellRecord] | None:
        """The published (on, off) records of an on cell, or None when either is missing."""
        on, off = self.records.get(cell.cell_id), self.records.get(cell.paired_off().cell_id)
        return None if on is None or off is None else (on, off)


def load_published(path: str | Path) -> Published:
    """Read and check a published run directory; :class:`RunDirError` naming the file otherwise.

    It needs ``config.yaml`` (whose hash and cells must be those of ``manifest.json`` under this
    code), ``manifest.json`` and ``cells/*.json``; every cell JSON must be a record of the cell its
    file name says, and that cell must be one of the config's.
    """
    run_dir = RunDir(path)
    if not run_dir.path.is_dir():
        raise RunDirError(f"{run_dir.path}: not a directory (expected a published run directory)")
    config_path = run_dir.path / RESOLVED_CONFIG
    if not config_path.is_file():
        raise RunDirError(f"{config_path} is missing: {run_dir.path} is not a published run directory")
    if not run_dir.manifest_path.is_file():
        raise RunDirError(f"{run_dir.manifest_path} is missing: {run_dir.path} is not a published run directory")
    manifest = run_dir.read_manifest()
    try:
        config = parse_resolved(load_yaml(config_path.read_text(), str(config_path)) or {},
                                name=run_dir.path.name)
    except ConfigError as error:
        raise RunDirError(f"{config_path}: {error}") from None
    if manifest.get("config_hash") != config.config_hash:
        raise RunDirError(f"{config_path} is not the config of {run_dir.manifest_path} (config hash "
                          f"{config.config_hash[:12]}, manifest {str(manifest.get('config_hash'))[:12]})")
    cells = {cell.cell_id: cell for cell in config.cells()}
    if list(cells) != manifest.get("cells"):
        commit = (manifest.get("git") or {}).get("commit", "?")
        raise RunDirError(f"{run_dir.manifest_path}: its cell ids differ from those this code derives from "
                          f"{config_path} (cell identities changed since commit {str(commit)[:12]})")
    if not run_dir.cells_dir.is_dir():
        raise RunDirError(f"{run_dir.cells_dir} is missing: {run_dir.path} publishes no cells")
    files = sorted(p for p in run_dir.cells_dir.glob("*.json") if not p.name.startswith("."))
    if not files:
        raise RunDirError(f"{run_dir.cells_dir}: no cell records (*.json)")
    records = {}
    for file in files:
        record = read_record_file(file)
        cell = cells.get(record.cell_id)
        if cell is None:
            raise RunDirError(f"{file}: cell {record.cell_id} is not a cell of {config_path}")
        if stable_hash(record.spec) != cell.digest:
            raise RunDirError(f"{file}: its spec does not match the settings of cell {record.cell_id}")
        records[record.cell_id] = record
    return Published(run_dir, config, manifest, records, cells)


def _arm_key(cell: CellSpec) -> str:
    """The arm of an on cell: its settings without the seed."""
    settings = cell.relevant_settings()
    settings.pop("seed")
    settings["controller"] = {k: v for k, v in settings["controller"].items() if k != "seed"}
    return stable_hash(settings)


def arms(published: Published) -> dict[str, list[CellSpec]]:
    """The on cells whose on and off records are both published, by arm (config order), seeds in order."""
    grouped: dict[str, list[CellSpec]] = {}
    for cell in published.cells.values():
        if not cell.is_off and published.pair(cell) is not None:
            grouped.setdefault(_arm_key(cell), []).append(cell)
    return grouped


def choose_cells(published: Published, count: int) -> list[CellSpec]:
    """``count`` published on cells (all if fewer), deterministic and spread out: round r takes, for
    arm i in config order, that arm's ((i + r) mod n_i)-th seed, so successive arms start at
    different seeds and every arm visits all its seeds before one repeats."""
    if count < 1:
        raise ValueError(f"--cells must be at least 1 (got {count})")
    grouped = list(arms(published).values())
    if not grouped:
        raise RunDirError(f"{published.run_dir.cells_dir}: no on arm is published together with its off arm")
    chosen: list[CellSpec] = []
    for round_ in range(max(len(seeds) for seeds in grouped)):
        for index, seeds in enumerate(grouped):
            if round_ < len(seeds) and len(chosen) < count:
                chosen.append(seeds[(index + round_) % len(seeds)])
    return chosen


# ------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """What ``reproduce`` re-runs: the chosen on cells, the stacks that run them (with their off
    arms), the scratch run directory and the device."""

    published: Published
    chosen: list[CellSpec]
    stacks: list[list[CellSpec]]
    scratch: RunDir
    scratch_is_temporary: bool
    device: torch.device

    @property
    def rerun_cells(self) -> list[CellSpec]:
        return [cell for stack in self.stacks for cell in stack]

    def published_threads(self) -> int | None:
        """The torch thread count of the published re-run cells, if they all ran with the same one."""
        counts = {numerics.get("torch_threads") for numerics in self.published_numerics()}
        return counts.pop() if len(counts) == 1 and None not in counts else None

    def published_numerics(self) -> list[dict[str, Any]]:
        """The distinct numerics of the published records of the re-run cells."""
        distinct: list[dict[str, Any]] = []
        for cell in self.rerun_cells:
            record = self.published.records.get(cell.cell_id)
            if record is not None and record.numerics not in distinct:
                distinct.append(record.numerics)
        return distinct

    def current_numerics(self) -> dict[str, Any]:
        return numerics(self.device)


def default_device(published: Published) -> torch.device:
    """The published cells' device type when this machine has it, else the CPU."""
    kinds = {record.numerics.get("device") for record in published.records.values()}
    return torch.device("cuda" if "cuda" in kinds and torch.cuda.is_available() else "cpu")


def plan_reproduction(run_dir: str | Path, count: int, out: str | Path | None = None,
                      device: str | torch.device | None = None) -> Plan:
    """Validate the published run, choose the cells, and prepare a fresh scratch directory.

    Args:
        run_dir: the published run directory (never written).
        count: on cells to re-run (their off arms come on top).
        out: the scratch directory (must be new or empty, and outside ``run_dir``); default: a fresh
            temporary directory.
        device: where the cells run (default :func:`default_device`).
    """
    from chronovisor.eval.sweep import plan_stacks

    published = load_published(run_dir)
    chosen = choose_cells(published, count)
    try:
        device = torch.device(device) if device is not None else default_device(published)
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from None
    needed = {cell.cell_id for cell in chosen} | {cell.paired_off().cell_id for cell in chosen}
    # Whole stacks, as the sweep ran them: a stacked cell's numbers depend on its stack's size.
    stacks = [stack for stack in plan_stacks(list(published.cells.values()), published.config.stack_size)
              if any(cell.cell_id in needed for cell in stack)]
    if out is None:
        scratch, temporary = Path(tempfile.mkdtemp(prefix="chronovisor-reproduce-")), True
    else:
        scratch, temporary = Path(out), False
        source = published.run_dir.path.resolve()
        if scratch.resolve() == source or source in scratch.resolve().parents:
            raise RunDirError(f"--out {scratch} lies inside the published run {published.run_dir.path}; "
                              f"reproduce never writes there")
        if scratch.exists() and (not scratch.is_dir() or any(scratch.iterdir())):
            raise RunDirError(f"--out {scratch} exists and is not an empty directory; give a new one")
    return Plan(published, chosen, stacks, RunDir(scratch), temporary, device)


# --------------------------------------------------------------------------- comparison
@dataclass
class ArmComparison:
    """A re-run arm against its published record: same numerics? which values differ?"""

    cell_id: str
    same_numerics: bool
    differences: list[str]
    routing_published: bool

    @property
    def equal(self) -> bool:
        return not self.differences


def _same(a: float, b: float) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def compare_arm(published: RunDir, record: CellRecord, scratch: RunDir, rerun: CellRecord) -> ArmComparison:
    """Exact comparison of held-out loss, per-conversation losses and (if published) routing."""
    differences = []
    if not _same(record.heldout.loss, rerun.heldout.loss):
        differences.append("held-out loss")
    mine, theirs = record.heldout.per_conversation_loss, rerun.heldout.per_conversation_loss
    if len(mine) != len(theirs) or not all(_same(a, b) for a, b in zip(mine, theirs, strict=False)):
        differences.append("per-conversation losses")
    routing_published = published.routing_path(record.cell_id).is_file()
    if routing_published:
        old, new = published.read_routing(record.cell_id), scratch.read_routing(rerun.cell_id)
        if list(old) != list(new) or not all(old[name].dtype == new[name].dtype and np.array_equal(old[name], new[name])
                                             for name in old):
            differences.append("routing")
    return ArmComparison(record.cell_id, record.numerics == rerun.numerics, differences, routing_published)


def describe_numerics(values: dict[str, Any]) -> str:
    text = f"device={values.get('device')}, torch_threads={values.get('torch_threads')}"
    return text + (f", cuda={values['cuda']}" if values.get("cuda") else "")


@dataclass
class CellCheck:
    """The verdict of one re-run on cell (see the module docstring)."""

    cell: CellSpec
    verdict: str
    published_loss: float
    rerun_loss: float
    published_delta: float
    rerun_delta: float
    interval: PredictionInterval
    on: ArmComparison
    off: ArmComparison
    notes: list[str] = field(default_factory=list)

    @property
    def same_numerics_different_result(self) -> bool:
        return any(arm.same_numerics and not arm.equal for arm in (self.on, self.off))

    def line(self) -> str:
        text = (f"{self.cell.cell_id}: {self.verdict}; held-out loss {self.published_loss:.6f} -> {self.rerun_loss:.6f}, "
                f"Δloss % {self.published_delta:+.4g} -> {self.rerun_delta:+.4g}, {self.interval.describe()}")
        return text + "".join(f"; {note}" for note in self.notes)


def _delta(on: CellRecord, off: CellRecord) -> float:
    on_loss, off_loss = on.heldout.loss, off.heldout.loss
    if not (math.isfinite(on_loss) and math.isfinite(off_loss)) or off_loss <= 0:
        return math.nan
    return float(metrics.delta_loss_pct(on_loss, off_loss))


def check_cell(plan: Plan, cell: CellSpec) -> CellCheck:
    """Compare a re-run on cell and its off arm (both in the scratch directory) with the published ones."""
    published, scratch = plan.published, plan.scratch
    on, off = published.pair(cell)
    rerun_on, rerun_off = scratch.read_record(cell.cell_id), scratch.read_record(off.cell_id)
    compared = {"": compare_arm(published.run_dir, on, scratch, rerun_on),
                "off arm: ": compare_arm(published.run_dir, off, scratch, rerun_off)}
    seeds = [published.pair(other) for other in arms(published)[_arm_key(cell)]]
    interval = prediction_interval([d for d in (_delta(*pair) for pair in seeds) if math.isfinite(d)])
    rerun_delta = _delta(rerun_on, rerun_off)
    if all(arm.same_numerics and arm.equal for arm in compared.values()):
        verdict = BIT_IDENTICAL
    else:
        verdict = INSIDE if interval.contains(rerun_delta) else NOT_REPRODUCED
    notes = []
    for prefix, arm in compared.items():
        if arm.same_numerics and not arm.equal:
            notes.append(f"{prefix}{SAME_NUMERICS_DIFFERENT} (differs: {', '.join(arm.differences)})")
        elif not arm.same_numerics:
            record = on if not prefix else off
            state = "values equal" if arm.equal else "values differ"
            notes.append(f"{prefix}published under other numerics ({describe_numerics(record.numerics)}; {state})")
        if not arm.routing_published:
            notes.append(f"{prefix}routing not published (not compared)")
    return CellCheck(cell, verdict, on.heldout.loss, rerun_on.heldout.loss, _delta(on, off), rerun_delta, interval,
                     compared[""], compared["off arm: "], notes)


# ------------------------------------------------------------------------------ running
@dataclass
class Reproduction:
    """The outcome of ``reproduce``: one :class:`CellCheck` per chosen on cell."""

    plan: Plan
    checks: list[CellCheck]

    def count(self, verdict: str) -> int:
        return sum(check.verdict == verdict for check in self.checks)

    @property
    def ok(self) -> bool:
        """Every cell bit-identical or inside the interval."""
        return self.count(NOT_REPRODUCED) == 0

    def summary_line(self) -> str:
        text = (f"reproduced: {self.count(BIT_IDENTICAL)}/{len(self.checks)} bit-identical, {self.count(INSIDE)} inside "
                f"the interval, {self.count(NOT_REPRODUCED)} not reproduced")
        different = sum(check.same_numerics_different_result for check in self.checks)
        return text + (f" ({different} with {SAME_NUMERICS_DIFFERENT})" if different else "")


def run_reproduction(plan: Plan, progress: bool = False, command: list[str] | None = None) -> Reproduction:
    """Re-run the plan's stacks into its scratch directory (as the sweep does) and check every chosen cell."""
    from tqdm.auto import tqdm

    from chronovisor.eval.protocols import run_cell
    from chronovisor.eval.stacked import run_cells_stacked

    config, scratch = plan.published.config, plan.scratch
    scratch.start(name=config.name, resolved=config.resolved, config_hash=config.config_hash,
                  cell_ids=[cell.cell_id for cell in plan.rerun_cells], command=command or sys.argv,
                  num_processes=1, stack_size=config.stack_size)
    with tqdm(total=len(plan.rerun_cells), desc=f"reproduce {config.name}", unit="cell", disable=not progress,
              dynamic_ncols=True) as bar:
        for stack in plan.stacks:
            started = time.perf_counter()
            if len(stack) == 1:
                results = [run_cell(stack[0], scratch, device=plan.device)]
            else:
                results = run_cells_stacked(stack, scratch, device=plan.device)
            elapsed = (time.perf_counter() - started) / len(stack)
            for result in results:
                result.record.wall_time_s = elapsed
                result.record.process_index = 0
                scratch.save_cell(result)
                bar.update(1)
    scratch.mark_finished()
    return Reproduction(plan, [check_cell(plan, cell) for cell in plan.chosen])


def describe_commit(git: dict[str, Any] | None) -> str:
    """A manifest's (or :func:`~chronovisor.eval.rundir.git_commit`'s) commit, e.g. ``commit 1a2b3c4d5e6f (dirty)``."""
    return f"commit {str(git.get('commit'))[:12]} ({'dirty' if git.get('dirty') else 'clean'})" if git else "commit unknown"
