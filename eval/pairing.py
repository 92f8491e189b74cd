"""Paired statistics of a run: every on arm against its seed's off arm, summarised per setting.

For every controller setting (protocol, model, PTConfig minus the seed) each seed's on arm is
paired with that seed's off arm (same init, data and order), per seed

    Δloss %      = 100 · (held-out loss on − off) / off
    Δexcess-sep  = excess separation on − off   (separation minus its permutation null, mean over layers)

and over seeds: robustness k/n (Δloss < 0 and Δexcess-sep > 0) with a Wilson 95% interval, mean
Δloss % with a Student t 95% interval and its t-test, a Wilcoxon signed-rank p-value (and its Holm
correction across all settings, kept for callers; the report labels these per-setting tests
exploratory and shows them uncorrected, see :mod:`.contrasts`), the final T̄ variance across experts
and the routing preservation of the on arm vs the off arm on the held-out tokens.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chronovisor.controllers import PTConfig
from chronovisor.eval import metrics, stats
from chronovisor.eval.record import CellRecord
from chronovisor.eval.rundir import RunDir
from chronovisor.eval.specs import AUX_LOSS, LOSS_FREE, PLACEBO, VARIANTS, arm_label

#: PTConfig fields shown as their own columns; any other field that varies in a run gets one too.
AXIS_FIELDS = ("eta", "pressure_scale")
_HIDDEN_FIELDS = {"seed", "mode", "learnable"}


# ------------------------------------------------------------------------------- loading
@dataclass
class Run:
    """A run directory: its manifest and the records of its finished cells (by cell id)."""

    run_dir: RunDir
    manifest: dict[str, Any]
    records: dict[str, CellRecord]

    @property
    def missing(self) -> list[str]:
        return [cell_id for cell_id in self.manifest["cells"] if cell_id not in self.records]


def load_run(run_dir: RunDir | str | Path) -> Run:
    """Read the manifest and every finished cell it lists (:class:`RunDirError` if there is no manifest)."""
    run_dir = RunDir.of(run_dir)
    manifest = run_dir.read_manifest()
    records = {}
    for cell_id in manifest["cells"]:
        record = run_dir.read_record(cell_id)
        if record is not None:
            records[cell_id] = record
    return Run(run_dir, manifest, records)


# ------------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class Setting:
    """One controller setting of a run: everything but the seed."""

    protocol: str
    model: str
    variant: str
    controller: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, record: CellRecord) -> Setting:
        controller = {key: value for key, value in record.spec["controller"].items() if key not in _HIDDEN_FIELDS}
        return cls(record.protocol, record.model, record.variant, tuple(sorted(controller.items())))

    @property
    def fields(self) -> dict[str, Any]:
        return dict(self.controller)

    @property
    def arm(self) -> str:
        """The arm's name as reports and ``primary:`` contrasts write it (:func:`~.specs.arm_name`)."""
        return arm_label(self.variant, self.fields.get("dynamics", PTConfig().dynamics))

    @property
    def eta(self) -> float:
        return self.fields["eta"]

    @property
    def pressure_scale(self) -> float:
        return self.fields["pressure_scale"]

    @property
    def reference_label(self) -> str:
        """The reference's names for its degenerate P×T runs, when this setting is one."""
        if self.variant != "pt":
            return ""
        if self.eta == 0 and self.pressure_scale == 0:
            return "η=0 and P=0: only T_fast acts"
        if self.eta == 0:
            return 'reference "P-only": η=0, T_fast still acts'
        if self.pressure_scale == 0:
            return 'reference "T-only": P=0, T_fast and T̄ act'
        return ""

    def acts(self, name: str) -> bool:
        """Whether η (``eta``) or P (``pressure_scale``) reaches the router in this arm: the pressure
        and placebo arms deliver no temperature, the temperature arm no pressure, loss_free and the
        aux_loss arm (controller off, a router loss in training) neither field."""
        if self.variant in (LOSS_FREE, AUX_LOSS):
            return False
        if name == "eta":
            return self.variant not in ("pressure", PLACEBO)
        return self.variant != "temperature"


def layer_mean(record: CellRecord, key: str) -> float:
    """A routing metric of the held-out tokens, mean over the analysed layers."""
    return float(getattr(record.heldout.mean_over_layers, key))


@dataclass
class PairedSeed:
    """The paired differences of one seed (on − off)."""

    seed: int
    on: CellRecord
    off: CellRecord
    delta_loss_pct: float
    delta_excess: float
    delta_separation: float
    delta_uncertainty: float
    delta_max_vio: float
    preservation: float
    T_bar_variance: float


def pair_seed(run: Run, on: CellRecord, off: CellRecord) -> PairedSeed:
    on_loss, off_loss = on.heldout.loss, off.heldout.loss
    finite = math.isfinite(on_loss) and math.isfinite(off_loss)
    on_routing, off_routing = run.run_dir.read_routing(on.cell_id), run.run_dir.read_routing(off.cell_id)
    preservation = float(np.mean([metrics.routing_preservation(on_routing[name], off_routing[name])
                                  for name in on_routing]))
    return PairedSeed(
        seed=on.seed,
        on=on,
        off=off,
        delta_loss_pct=metrics.delta_loss_pct(on_loss, off_loss) if finite else math.nan,
        delta_excess=layer_mean(on, "excess_separation") - layer_mean(off, "excess_separation"),
        delta_separation=layer_mean(on, "separation") - layer_mean(off, "separation"),
        delta_uncertainty=layer_mean(on, "uncertainty_coefficient") - layer_mean(off, "uncertainty_coefficient"),
        delta_max_vio=layer_mean(on, "max_vio") - layer_mean(off, "max_vio"),
        preservation=preservation,
        T_bar_variance=float(on.fields.T_bar_variance),
    )


@dataclass
class SettingSummary:
    """Seed-level statistics of one setting (see the module docstring)."""

    setting: Setting
    seeds: list[PairedSeed]
    robustness: stats.Robustness
    loss_ci: stats.TInterval
    wilcoxon: stats.SignedRank
    excess_ci: stats.TInterval
    holm_p: float = math.nan
    diverged: int = 0

    @property
    def n(self) -> int:
        return len(self.seeds)

    def mean(self, name: str) -> float:
        """Mean over seeds of a :class:`PairedSeed` attribute."""
        values = [getattr(seed, name) for seed in self.seeds]
        return float(np.nanmean(values)) if values else math.nan

    def mean_on(self, key: str) -> float:
        """Mean over seeds of the on arm's :func:`layer_mean`."""
        return float(np.mean([layer_mean(seed.on, key) for seed in self.seeds]))

    def mean_loss(self, arm: str) -> float:
        """Mean over seeds of the held-out loss of the ``on`` or ``off`` arm."""
        return float(np.mean([getattr(seed, arm).heldout.loss for seed in self.seeds]))


def summarize(run: Run) -> list[SettingSummary]:
    """Pair every finished on arm with its finished off arm and summarise each setting."""
    groups: dict[Setting, list[PairedSeed]] = defaultdict(list)
    for record in run.records.values():
        if not record.is_on:
            continue
        off = run.records.get(record.paired_off_cell)
        if off is None:
            continue  # the off arm of this seed is not finished yet
        groups[Setting.of(record)].append(pair_seed(run, record, off))
    summaries = []
    for setting, seeds in groups.items():
        seeds.sort(key=lambda seed: seed.seed)
        delta_loss = np.array([seed.delta_loss_pct for seed in seeds])
        delta_excess = np.array([seed.delta_excess for seed in seeds])
        finite = np.isfinite(delta_loss)
        summaries.append(SettingSummary(
            setting=setting,
            seeds=seeds,
            robustness=stats.robustness(np.where(finite, delta_loss, np.nan), delta_excess),
            loss_ci=stats.paired_t_interval(delta_loss[finite]),
            wilcoxon=stats.signed_rank_p(delta_loss[finite]),
            excess_ci=stats.paired_t_interval(delta_excess),
            diverged=int((~finite).sum()),
        ))
    summaries.sort(key=_sort_key)
    adjusted = stats.holm_correction([summary.wilcoxon.p_value for summary in summaries])
    for summary, p_value in zip(summaries, adjusted, strict=True):
        summary.holm_p = float(p_value)
    return summaries


def mismatched_numerics(summaries: list[SettingSummary]) -> int:
    """Number of (on, off) pairs whose arms ran under different device / thread settings."""
    return sum(seed.on.numerics != seed.off.numerics for summary in summaries for seed in summary.seeds)


def _sort_key(summary: SettingSummary) -> tuple:
    setting = summary.setting
    rest = tuple((key, str(value)) for key, value in setting.controller if key not in AXIS_FIELDS + ("dynamics",))
    return (setting.protocol, setting.model, rest, VARIANTS.index(setting.variant), setting.eta,
            setting.pressure_scale)


def varying_fields(summaries: list[SettingSummary]) -> list[str]:
    """Controller fields (besides η and P) whose value differs between settings of the run."""
    values: dict[str, set] = defaultdict(set)
    for summary in summaries:
        for key, value in summary.setting.controller:
            values[key].add(json.dumps(value))
    return [key for key, seen in values.items() if len(seen) > 1 and key not in AXIS_FIELDS and key != "dynamics"]
