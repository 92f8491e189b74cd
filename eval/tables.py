"""The tables of the report (:class:`Table`: markdown in summary.md, and CSV): per setting, the
ablation per group, and the baselines and loss floors."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chronovisor.eval import stats
from chronovisor.eval.pairing import Run, Setting, SettingSummary, layer_mean, varying_fields
from chronovisor.eval.record import CellRecord
from chronovisor.eval.rundir import file_slug


def _num(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"


def _pct(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:+.1e}" if 0 < abs(value) < 0.005 else f"{value:+.2f}"


def _ci(ci: stats.TInterval, fmt) -> str:
    if not math.isfinite(ci.mean):
        return "–"
    if not math.isfinite(ci.low):
        return f"{fmt(ci.mean)} [n/a]"
    return f"{fmt(ci.mean)} [{fmt(ci.low)}, {fmt(ci.high)}]"


def _sci(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:+.2e}"


def _axis(setting: Setting, name: str) -> str:
    return f"{setting.fields[name]:g}" if setting.acts(name) else "–"


def _T_bar_variance(summary: SettingSummary) -> str:
    return _num(summary.mean("T_bar_variance")) if summary.setting.acts("eta") else "–"


def _robust(summary: SettingSummary) -> str:
    r = summary.robustness
    return f"{r.successes}/{r.n} [{r.low:.2f}, {r.high:.2f}]"


@dataclass
class Table:
    """One table of the report: markdown in summary.md, and the same cells as ``<name>.csv``.

    Attributes:
        name: the CSV file's stem, unique within a report (:func:`~chronovisor.eval.rundir.file_slug`).
        header: the column names.
        rows: the cells as shown (numbers formatted, intervals as ``mean [low, high]``, "–" = none).
    """

    name: str
    header: list[str]
    rows: list[list[str]]

    @property
    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join("---" for _ in self.header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows])

    def write_csv(self, directory: Path) -> Path:
        """Write ``directory/<name>.csv`` (UTF-8, markdown emphasis and code marks removed) and return its path."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for row in [self.header, *self.rows]:
            writer.writerow([cell.replace("**", "").replace("`", "") for cell in row])
        path = directory / f"{self.name}.csv"
        path.write_text(buffer.getvalue(), encoding="utf-8")
        return path


def main_table(summaries: list[SettingSummary]) -> Table:
    """The per-setting table (exploratory): robustness, Δloss t CI, uncorrected t and Wilcoxon p,
    Δexcess, T̄ variance, preservation."""
    extra = varying_fields(summaries)
    header = (["protocol", "model", "arm", "η", "P"] + extra +
              ["n", "robust k/n [Wilson 95%]", "Δloss % [95% t CI]", "t p", "Wilcoxon p",
               "Δexcess-sep [95% CI]", "Δsep (raw)", "ΔU(turn|expert)", "T̄ var", "preserved"])
    rows = []
    for s in summaries:
        fields = s.setting.fields
        diverged = f" ({s.diverged} diverged)" if s.diverged else ""
        rows.append([s.setting.protocol, s.setting.model, _arm_name(s.setting), _axis(s.setting, "eta"),
                     _axis(s.setting, "pressure_scale")] + [str(fields.get(key)) for key in extra] + [
            str(s.n), _robust(s), _ci(s.loss_ci, _pct) + diverged, _num(s.loss_ci.p_value), _num(s.wilcoxon.p_value),
            _ci(s.excess_ci, _sci), _sci(s.mean("delta_separation")), _sci(s.mean("delta_uncertainty")),
            _T_bar_variance(s), f"{s.mean('preservation'):.3f}"])
    return Table("settings", header, rows)


def _arm_name(setting: Setting) -> str:
    label = setting.reference_label
    return f"{setting.arm} · {label}" if label else setting.arm


def ablation_tables(run: Run, summaries: list[SettingSummary]) -> list[tuple[str, Table]]:
    """(title, table) per (protocol, model, other fields) group that has more than one variant.

    Rows: the off arm (absolute values, mean over seeds) and every controller setting (paired
    differences). Labels the reference's "P-only" (η=0) and "T-only" (P=0) settings.
    """
    extra = varying_fields(summaries)
    groups: dict[tuple, list[SettingSummary]] = defaultdict(list)
    for summary in summaries:
        fields = summary.setting.fields
        groups[(summary.setting.protocol, summary.setting.model,
                tuple((key, json.dumps(fields.get(key))) for key in extra))].append(summary)
    tables = []
    for (protocol, model, rest), members in groups.items():
        if len({member.setting.variant for member in members}) < 2:
            continue
        header = ["arm", "η", "P", "n", "held-out loss", "Δloss % [95% CI]", "robust k/n", "excess-sep",
                  "Δexcess-sep", "U(turn|expert)", "MaxVio", "preserved", "T̄ var"]
        offs = {seed.off.cell_id: seed.off for member in members for seed in member.seeds}
        off_records = list(offs.values())
        rows = [["off (baseline)", "–", "–", str(len(off_records)),
                 _num(float(np.mean([r.heldout.loss for r in off_records])), 4), "–", "–",
                 _sci(float(np.mean([layer_mean(r, "excess_separation") for r in off_records]))), "–",
                 _num(float(np.mean([layer_mean(r, "uncertainty_coefficient") for r in off_records]))),
                 _num(float(np.mean([layer_mean(r, "max_vio") for r in off_records]))), "1.000", "–"]]
        for s in members:
            rows.append([_arm_name(s.setting), _axis(s.setting, "eta"), _axis(s.setting, "pressure_scale"), str(s.n),
                         _num(s.mean_loss("on"), 4), _ci(s.loss_ci, _pct), _robust(s),
                         _sci(s.mean_on("excess_separation")), _sci(s.mean("delta_excess")), _num(s.mean_on("uncertainty_coefficient")),
                         _num(s.mean_on("max_vio")), f"{s.mean('preservation'):.3f}", _T_bar_variance(s)])
        suffix = ", ".join(f"{key}={json.loads(value)}" for key, value in rest)
        title = f"{protocol}, {model}" + (f", {suffix}" if suffix else "")
        name = file_slug("_".join(["ablation", protocol, model] + [f"{key}-{json.loads(value)}" for key, value in rest]))
        tables.append((title, Table(name, header, rows)))
    return tables


def _off_records(run: Run) -> dict[tuple[str, str], list[CellRecord]]:
    groups: dict[tuple, list[CellRecord]] = defaultdict(list)
    for record in run.records.values():
        if not record.is_on:
            groups[(record.protocol, record.model)].append(record)
    return dict(sorted(groups.items()))


def bigram_failures(run: Run) -> dict[tuple[str, str], tuple[int, int]]:
    """Per (protocol, model): (k, n), the off arm's seeds whose held-out loss is not below the count
    bigram's, out of its finished seeds."""
    return {group: (sum(r.heldout.loss >= r.baselines.bigram for r in records), len(records))
            for group, records in _off_records(run).items()}


def baselines_table(run: Run) -> Table:
    """Per (protocol, model): the off arm's held-out loss beside the n-gram baselines fit on the same
    training tokens and the data's loss floors (means over the off arm's seeds)."""
    rows = []
    for (protocol, model), records in _off_records(run).items():
        floors = [r.loss_floor for r in records if r.loss_floor]
        train = [r.train.final_loss for r in records if r.train and r.train.final_loss is not None]
        floor = {key: float(np.mean([getattr(f, key) for f in floors])) if floors else math.nan
                 for key in ("bayes", "oracle", "uniform")}
        mean = {key: float(np.mean([getattr(r.baselines, key) for r in records])) for key in ("bigram", "unigram")}
        rows.append([protocol, model, str(len(records)), _num(float(np.mean([r.heldout.loss for r in records])), 4),
                     _num(mean["bigram"], 4), _num(mean["unigram"], 4), _num(floor["bayes"], 4),
                     _num(floor["uniform"], 4), _num(floor["oracle"], 4),
                     _num(float(np.mean(train)), 4) if train else "–"])
    return Table("baselines", ["protocol", "model", "seeds", "off-arm held-out loss", "count bigram", "unigram",
                   "Bayes floor (causal)", "uniform ln V", "oracle floor", "off-arm training loss (in-sample)"], rows)
