"""The calibration of a report (docs/calibration.md): noise floor, pre-registered and exploratory contrasts.

Per (protocol, model) group of a run:

* **noise floor** (:func:`noise_floors`): the SD across seeds of the ``placebo`` arm's per-seed Δloss %,
  the minimum detectable effect of a two-sided paired t-test (α 0.05, power 0.8) at the placebo's n,
  and the placebo's own t-test, whose p < 0.05 marks the group MISCALIBRATED;
* **contrasts** (:func:`evaluate_contrast`): ``A - off`` is A's per-seed Δloss % against its paired
  off arm; ``A - B`` is A's Δloss % minus B's, seed by seed, over the seeds where both exist; each
  gets a Student t interval and a Wilcoxon signed-rank test (:func:`~.stats.paired_contrast`);
* the **primary** family (:func:`primary_contrasts`): the config's ``primary:`` contrasts in every
  group, Holm-corrected together on their t-test p-values; every other comparison is exploratory
  (:func:`exploratory_contrasts`: ``pt - pressure``, ``pt - temperature``, ``pt - placebo`` when the
  arms exist), with uncorrected p-values;
* the per-arm **separation** tests and how far the **slow field** relaxed (:func:`slow_fields`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from chronovisor.eval import stats
from chronovisor.eval.pairing import Run, Setting, SettingSummary
from chronovisor.eval.record import CellRecord
from chronovisor.eval.rundir import RESOLVED_CONFIG
from chronovisor.eval.specs import OFF, PLACEBO, Contrast
from chronovisor.eval.yaml_text import load_yaml

#: Significance level of the placebo's own t-test (MISCALIBRATED below it) and of the MDE.
ALPHA = stats.DEFAULT_ALPHA
#: Direct contrasts added (as exploratory) whenever both arms exist in a group and are not declared.
AUTOMATIC = (Contrast("pt", "pressure"), Contrast("pt", "temperature"), Contrast("pt", PLACEBO))

Group = tuple[str, str]  # (protocol, model)


# ------------------------------------------------------------------------------- arms and groups
def by_group(summaries: list[SettingSummary]) -> dict[Group, list[SettingSummary]]:
    """The summaries of each (protocol, model), in report order."""
    groups: dict[Group, list[SettingSummary]] = defaultdict(list)
    for summary in summaries:
        groups[(summary.setting.protocol, summary.setting.model)].append(summary)
    return dict(groups)


def arm_labels(summaries: list[SettingSummary]) -> dict[Setting, str]:
    """A label per setting, unique within its group: the arm name, plus η, P or any other field that
    differs between the settings of the group sharing that name (e.g. an η grid of ``pt``)."""
    labels: dict[Setting, str] = {}
    for members in by_group(summaries).values():
        for member in members:
            name = member.setting.arm
            same = [other.setting.fields for other in members if other.setting.arm == name]
            varying = [key for key, _ in member.setting.controller
                       if len({repr(fields.get(key)) for fields in same}) > 1]
            labels[member.setting] = name + "".join(_field_label(key, member.setting.fields[key]) for key in varying)
    return labels


def _field_label(key: str, value) -> str:
    name = {"eta": "η", "pressure_scale": "P"}.get(key, key)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f" {name}={value:g}" if number else f" {name}={value}"


def seed_deltas(summary: SettingSummary) -> dict[int, float]:
    """The finite per-seed Δloss % of a setting against its paired off arm (diverged seeds left out)."""
    return {seed.seed: seed.delta_loss_pct for seed in summary.seeds if math.isfinite(seed.delta_loss_pct)}


# ------------------------------------------------------------------------------- noise floor
@dataclass
class NoiseFloor:
    """The placebo arm of one group: its per-seed Δloss % and what they say about the instrument.

    sd: SD across seeds (ddof 1) of the placebo's Δloss %; mde: the smallest mean Δloss % a two-sided
    paired t-test at α 0.05 detects with 80% power for ``n`` seeds of that SD (NaN when undefined,
    ``reason`` says why); interval: the placebo's own t interval and test.
    """

    protocol: str
    model: str
    interval: stats.TInterval
    mde: float
    reason: str = ""

    @property
    def n(self) -> int:
        return self.interval.n

    @property
    def sd(self) -> float:
        return self.interval.sd

    @property
    def miscalibrated(self) -> bool:
        """The placebo's own t-test rejects "no effect" at 5%: the protocol moves the loss by itself."""
        return math.isfinite(self.interval.p_value) and self.interval.p_value < ALPHA


def noise_floor(summary: SettingSummary) -> NoiseFloor:
    """The noise floor measured by a placebo setting."""
    deltas = np.array(list(seed_deltas(summary).values()))
    interval = stats.paired_t_interval(deltas)
    setting = summary.setting
    if interval.n < 2:
        return NoiseFloor(setting.protocol, setting.model, interval, math.nan, "fewer than two placebo seeds")
    if interval.sd == 0:
        return NoiseFloor(setting.protocol, setting.model, interval, 0.0,
                          "the placebo arm equals the off arm on every seed: no measurable noise")
    return NoiseFloor(setting.protocol, setting.model, interval,
                      stats.minimum_detectable_effect(interval.sd, interval.n, ALPHA, stats.DEFAULT_POWER))


def noise_floors(summaries: list[SettingSummary]) -> dict[Group, NoiseFloor | None]:
    """Per group: the noise floor of its (first) placebo setting, or None when it has no placebo arm."""
    floors: dict[Group, NoiseFloor | None] = {}
    for group, members in by_group(summaries).items():
        placebo = [member for member in members if member.setting.variant == PLACEBO]
        floors[group] = noise_floor(placebo[0]) if placebo else None
    return floors


# ------------------------------------------------------------------------------- contrasts
@dataclass
class ContrastResult:
    """One contrast in one group: the per-seed values, the paired test, and the Holm-adjusted t-test p
    (primary contrasts only; NaN for exploratory ones)."""

    contrast: Contrast
    protocol: str
    model: str
    values: dict[int, float]
    result: stats.PairedContrast | None
    reason: str = ""
    holm_p: float = math.nan

    @property
    def p_value(self) -> float:
        """The t-test's p (the one Holm adjusts)."""
        return self.result.interval.p_value if self.result else math.nan


def _arm_deltas(name: str, members: list[SettingSummary]) -> tuple[dict[int, float] | None, str]:
    if name == OFF:
        return None, ""
    found = [member for member in members if member.setting.arm == name]
    if not found:
        return None, f"arm '{name}' has no finished seeds"
    if len(found) > 1:
        return None, f"arm '{name}' names {len(found)} settings"
    return seed_deltas(found[0]), ""


def evaluate_contrast(contrast: Contrast, group: Group, members: list[SettingSummary]) -> ContrastResult:
    """The per-seed values of ``contrast`` in a group and their paired test (see the module docstring)."""
    first, first_reason = _arm_deltas(contrast.arm, members)
    second, second_reason = _arm_deltas(contrast.against, members)
    reason = first_reason or second_reason
    if reason:
        return ContrastResult(contrast, *group, {}, None, reason)
    first = first if first is not None else dict.fromkeys(second, 0.0)
    second = second if second is not None else dict.fromkeys(first, 0.0)
    seeds = sorted(set(first) & set(second))
    values = {seed: first[seed] - second[seed] for seed in seeds}
    if len(seeds) < 2:
        return ContrastResult(contrast, *group, values, None, f"{len(seeds)} seed(s) with both arms: no test")
    result = stats.paired_contrast([first[seed] for seed in seeds], [second[seed] for seed in seeds])
    return ContrastResult(contrast, *group, values, result)


def declared_contrasts(run: Run) -> tuple[Contrast, ...]:
    """The ``primary:`` contrasts of the run's resolved config (``config.yaml``, else the manifest's copy).

    The resolved config is not re-validated with ``parse_config`` (its ``data.generator`` form and its
    model directories need not parse on the reading machine); each entry is parsed with the same
    :meth:`Contrast.parse` the config used when the sweep started.
    """
    path = run.run_dir.path / RESOLVED_CONFIG
    config = load_yaml(path.read_text(), str(path)) if path.is_file() else run.manifest.get("config")
    return tuple(Contrast.parse(text) for text in (config or {}).get("primary") or [])


def primary_contrasts(declared: tuple[Contrast, ...], summaries: list[SettingSummary]) -> list[ContrastResult]:
    """Every declared contrast in every group, with Holm's correction across exactly that family
    (on the t-test p-values; an untestable contrast, NaN p, is left out of the family size)."""
    results = [evaluate_contrast(contrast, group, members)
               for group, members in by_group(summaries).items() for contrast in declared]
    adjusted = stats.holm_family({str(index): result.p_value for index, result in enumerate(results)})
    for index, result in enumerate(results):
        result.holm_p = adjusted[str(index)]
    return results


def exploratory_contrasts(declared: tuple[Contrast, ...], summaries: list[SettingSummary]) -> list[ContrastResult]:
    """The :data:`AUTOMATIC` direct contrasts whose arms exist in a group and that were not declared."""
    results = []
    for group, members in by_group(summaries).items():
        arms = [member.setting.arm for member in members]
        for contrast in AUTOMATIC:
            if contrast not in declared and contrast.arm in arms and contrast.against in arms:
                results.append(evaluate_contrast(contrast, group, members))
    return results


# ------------------------------------------------------------------------------- separation
@dataclass
class SeparationRow:
    """The separation permutation tests of one arm: mean excess separation and mean p over seeds and
    layers, and the share of (seed, layer) tests with p < 0.05."""

    label: str
    n: int
    excess: float
    mean_p: float
    rejected: float


def separation_row(label: str, records: list[CellRecord]) -> SeparationRow:
    p_values = np.array([layer.separation_p for record in records for layer in record.heldout.layers], dtype=float)
    p_values = p_values[np.isfinite(p_values)]
    return SeparationRow(label, len(records),
                         float(np.mean([record.heldout.mean_over_layers.excess_separation for record in records])),
                         float(p_values.mean()) if p_values.size else math.nan,
                         float((p_values < ALPHA).mean()) if p_values.size else math.nan)


def separation_rows(summaries: list[SettingSummary]) -> dict[Group, list[SeparationRow]]:
    """Per group: the off arm, then every setting."""
    labels = arm_labels(summaries)
    rows = {}
    for group, members in by_group(summaries).items():
        offs = {seed.off.cell_id: seed.off for member in members for seed in member.seeds}
        rows[group] = [separation_row(OFF, list(offs.values()))] + [
            separation_row(labels[member.setting], [seed.on for seed in member.seeds]) for member in members]
    return rows


def phase_order_fixed(run: Run) -> bool:
    """Whether any record's held-out conversations visit the phases in one fixed order."""
    return any(record.heldout.phase_order_fixed for record in run.records.values())


# ------------------------------------------------------------------------------- slow field
@dataclass
class SlowField:
    """How far T̄ relaxed in an arm that delivers temperature: τ_local = u/η and τ_global = u/(η·g)
    ticks (g = ``eta_global_factor``, 0.5 by default: 2u/η), covered = 1 − exp(−ticks/τ)."""

    protocol: str
    model: str
    label: str
    eta: float
    update_every: int
    ticks: float
    tau_local: float
    tau_global: float

    @staticmethod
    def covered(ticks: float, tau: float) -> float:
        return 0.0 if math.isinf(tau) else 1.0 - math.exp(-ticks / tau)

    @property
    def covered_local(self) -> float:
        return self.covered(self.ticks, self.tau_local)

    @property
    def covered_global(self) -> float:
        return self.covered(self.ticks, self.tau_global)


def slow_field(summary: SettingSummary, label: str) -> SlowField | None:
    """The slow field of a setting (None when the arm delivers no temperature or has no fields)."""
    setting = summary.setting
    ticks = [seed.on.fields.ticks for seed in summary.seeds if seed.on.fields is not None]
    if not setting.acts("eta") or not ticks:
        return None
    fields = setting.fields
    eta, update_every = float(fields.get("eta", 0.015)), int(fields.get("update_every", 5))
    factor = float(fields.get("eta_global_factor", 0.5))
    tau_local = update_every / eta if eta > 0 else math.inf
    tau_global = update_every / (eta * factor) if eta * factor > 0 else math.inf
    return SlowField(setting.protocol, setting.model, label, eta, update_every, float(np.mean(ticks)),
                     tau_local, tau_global)


def slow_fields(summaries: list[SettingSummary]) -> list[SlowField]:
    labels = arm_labels(summaries)
    found = (slow_field(summary, labels[summary.setting]) for summary in summaries)
    return [field for field in found if field is not None]
