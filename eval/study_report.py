"""The real-text study's report: paired Δloss per setting and arm, the noise floor, and expert ↔ domain information.

Settings (adapt → evaluate): **in-domain** (adapt on the mixed stream, evaluate each domain),
**shift** (adapt on one domain, evaluate on it) and **other domain** (adapt on one domain,
evaluate on the other: is anything damaged?). Each arm's per-seed Δloss % is taken against the
off arm of the same seed on the same held-out blocks and summarised with the harness's paired
t-interval (:func:`~chronovisor.eval.stats.paired_t_interval`); the noise floor is the placebo
arm's SD across seeds and the minimum detectable effect at α 0.05 and 80 % power for that many
seeds (:func:`~chronovisor.eval.stats.minimum_detectable_effect`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chronovisor.eval import stats
from chronovisor.eval.corpus import DOMAINS
from chronovisor.eval.metrics import delta_loss_pct
from chronovisor.eval.study import NO_STREAM, StudyCell, read_cells
from chronovisor.eval.study_config import OFF_ARM, STUDY_ARMS

REPORT_FILE = "report.md"


@dataclass(frozen=True)
class StudyRow:
    """One (setting, arm) of the table: mean held-out perplexity and the paired Δloss % against off."""

    setting: str
    adapt: str
    evaluate: str
    arm: str
    trainable_parameters: int
    perplexity: float
    delta: stats.TInterval


def settings(streams: set[str]) -> list[tuple[str, str, str]]:
    """(setting, adapt stream, evaluated domain) for the streams the study ran."""
    rows = [("in-domain", "mixed", domain) for domain in DOMAINS if "mixed" in streams]
    rows += [("shift", domain, domain) for domain in DOMAINS if domain in streams]
    rows += [("other domain", domain, other) for domain in DOMAINS if domain in streams
             for other in DOMAINS if other != domain]
    return rows


def study_rows(cells: list[StudyCell]) -> list[StudyRow]:
    """The table's rows; seeds without a finished off cell are left out of the pairing."""
    off = {cell.seed: cell for cell in cells if cell.arm == OFF_ARM}
    rows = []
    for setting, stream, domain in settings({cell.adapt for cell in cells if cell.adapt != NO_STREAM}):
        for arm in STUDY_ARMS:
            members = [c for c in cells if c.arm == arm and c.adapt == (NO_STREAM if arm == OFF_ARM else stream)
                       and c.seed in off]
            if not members:
                continue
            deltas = [delta_loss_pct(c.heldout_loss[domain], off[c.seed].heldout_loss[domain]) for c in members]
            rows.append(StudyRow(setting, stream, domain, arm, members[0].trainable_parameters,
                                 float(np.mean([math.exp(c.heldout_loss[domain]) for c in members])),
                                 stats.paired_t_interval(deltas)))
    return rows


def noise_floor(rows: list[StudyRow]) -> tuple[float, float, int]:
    """(placebo SD of Δloss %, minimum detectable effect, seeds) pooled over the placebo rows' SDs (RMS)."""
    placebo = [row.delta for row in rows if row.arm == "placebo" and math.isfinite(row.delta.sd)]
    if not placebo:
        return math.nan, math.nan, 0
    sd = math.sqrt(float(np.mean([interval.sd ** 2 for interval in placebo])))
    n = min(interval.n for interval in placebo)
    mde = stats.minimum_detectable_effect(sd, n) if sd > 0 and n >= 2 else math.nan
    return sd, mde, n


def mutual_information_rows(cells: list[StudyCell]) -> list[tuple[str, str, list[float], list[stats.TInterval]]]:
    """Per (arm, stream): the mean I(expert; domain) per layer and its paired change against off."""
    off = {cell.seed: cell for cell in cells if cell.arm == OFF_ARM}
    groups: dict[tuple[str, str], list[StudyCell]] = {}
    for cell in cells:
        if cell.seed in off:
            groups.setdefault((cell.arm, cell.adapt), []).append(cell)
    rows = []
    for (arm, stream), members in sorted(groups.items(), key=lambda item: (STUDY_ARMS.index(item[0][0]), item[0][1])):
        layers = len(members[0].mutual_information)
        means = [float(np.mean([c.mutual_information[layer] for c in members])) for layer in range(layers)]
        changes = [stats.paired_t_interval([c.mutual_information[layer] - off[c.seed].mutual_information[layer]
                                            for c in members]) for layer in range(layers)]
        rows.append((arm, stream, means, changes))
    return rows


def _interval(interval: stats.TInterval, digits: int = 2) -> str:
    if not math.isfinite(interval.low):
        return f"{interval.mean:+.{digits}f} (n={interval.n})"
    return f"{interval.mean:+.{digits}f} [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]"


def summary_table(rows: list[StudyRow]) -> list[str]:
    """One line per arm, one column per (setting, adapt → eval): the mean Δloss % [95% CI] against off."""
    columns = list(dict.fromkeys((row.setting, row.adapt, row.evaluate) for row in rows))
    by_key = {(row.arm, row.setting, row.adapt, row.evaluate): row for row in rows}
    lines = ["| arm | trainable params | " + " | ".join(f"{s}: {a} → {e}" for s, a, e in columns) + " |",
             "|---|---:|" + "---|" * len(columns)]
    for arm in STUDY_ARMS:
        if arm == OFF_ARM or not any(key[0] == arm for key in by_key):
            continue
        keys = [(arm, *column) for column in columns]
        cells = [_interval(by_key[key].delta) if key in by_key else "" for key in keys]
        count = next(row.trainable_parameters for row in rows if row.arm == arm)
        lines.append(f"| {arm} | {count:,} | " + " | ".join(cells) + " |")
    return lines


def render_report(out_dir: str | Path) -> str:
    """Write ``report.md`` in a study directory and return its text."""
    cells = read_cells(out_dir)
    rows = study_rows(cells)
    sd, mde, n = noise_floor(rows)
    lines = [f"# Real-text study: {Path(out_dir).name}", "", *summary_table(rows), "",
             f"{len(cells)} cells, seeds {sorted({c.seed for c in cells})}. Δloss % = 100·(arm − off)/off per seed "
             "on the same held-out blocks; mean [95% paired t-interval].", "",
             f"Noise floor (placebo): SD {sd:.2g} % across seeds; minimum detectable effect {mde:.2g} % "
             f"(n = {n}, α 0.05, power 0.8). p: two-sided paired t-test, uncorrected (no contrast was declared "
             "primary: every row is exploratory).", "",
             "| setting | adapt → eval | arm | trainable params | ppl | Δloss % [95% CI] | p |",
             "|---|---|---|---:|---:|---|---:|"]
    for row in rows:
        p_value = "" if row.arm == OFF_ARM or not math.isfinite(row.delta.p_value) else f"{row.delta.p_value:.3g}"
        delta = "—" if row.arm == OFF_ARM else _interval(row.delta)
        lines.append(f"| {row.setting} | {row.adapt} → {row.evaluate} | {row.arm} | {row.trainable_parameters:,} | "
                     f"{row.perplexity:.2f} | {delta} | {p_value} |")
    lines += ["", "## Expert ↔ domain mutual information (bits, held-out tokens of both domains)", "",
              "| arm | adapt | I per layer | Δ vs off per layer [95% CI] |", "|---|---|---|---|"]
    for arm, stream, means, changes in mutual_information_rows(cells):
        shown = ", ".join(f"{value:.3f}" for value in means)
        change = "—" if arm == OFF_ARM else "; ".join(_interval(c, 4) for c in changes)
        lines.append(f"| {arm} | {stream} | {shown} | {change} |")
    text = "\n".join(lines) + "\n"
    (Path(out_dir) / REPORT_FILE).write_text(text)
    return text
