"""The calibration sections of summary.md (docs/calibration.md), as lists of blocks: markdown lines
and :class:`~chronovisor.eval.tables.Table` objects (the report renders them and writes each as CSV).

The numbers are :mod:`.contrasts`' and :mod:`.tables`'; this module only words and lays them out:
the header flags (DIRTY TREE, MISCALIBRATED), the primary (pre-registered) contrasts, the noise
floor, the exploratory direct contrasts, baselines, separation, the slow field and provenance.
"""

from __future__ import annotations

import math
from typing import Any

from chronovisor.eval import contrasts, stats
from chronovisor.eval.contrasts import ContrastResult, NoiseFloor
from chronovisor.eval.pairing import Run, SettingSummary
from chronovisor.eval.rundir import file_slug
from chronovisor.eval.specs import Contrast
from chronovisor.eval.tables import Table, _ci, _num, _pct, baselines_table, bigram_failures

#: One block of summary.md: a markdown line or a table.
Block = str | Table

NO_PLACEBO = "no placebo arm: noise floor unknown"
FIXED_ORDER = "phase order is fixed in this data: separation cannot be told apart from position"


def _group(protocol: str, model: str) -> str:
    return f"{protocol}, {model}"


def _p(value: float) -> str:
    return _num(value) if math.isfinite(value) else "–"


# ------------------------------------------------------------------------------- header
def dirty_tree(manifest: dict[str, Any]) -> bool:
    return bool((manifest.get("git") or {}).get("dirty"))


def header_flags(run: Run, floors: dict[tuple[str, str], NoiseFloor | None]) -> list[str]:
    """Block quotes at the top of the report: a dirty tree and every MISCALIBRATED group."""
    lines = []
    if dirty_tree(run.manifest):
        commit = (run.manifest.get("git") or {}).get("commit", "unknown")[:12]
        lines += [f"> **DIRTY TREE**: the code that ran this sweep had uncommitted changes; commit `{commit}` "
                  "alone does not reproduce it.", ""]
    for (protocol, model), floor in floors.items():
        if floor is not None and floor.miscalibrated:
            lines += [f"> **MISCALIBRATED** ({_group(protocol, model)}): the placebo arm's own t-test gives "
                      f"p = {_p(floor.interval.p_value)} < 0.05 (mean Δloss {_pct(floor.interval.mean)} %). The "
                      "protocol moves the loss with no effect in the bias: no arm's result in this group can be "
                      "trusted.", ""]
    return lines


# ------------------------------------------------------------------------------- contrasts
def _per_seed(result: ContrastResult) -> str:
    return ", ".join(f"s{seed} {value:+.3f}" for seed, value in result.values.items()) or "–"


def _contrast_row(result: ContrastResult, holm: bool) -> list[str]:
    row = [f"`{result.contrast.name}`", _group(result.protocol, result.model), str(len(result.values))]
    if result.result is None:
        return row + [f"– ({result.reason})", "–"] + (["–"] if holm else []) + ["–", _per_seed(result)]
    interval = result.result.interval
    return row + [_ci(interval, _pct), _p(interval.p_value)] + ([_p(result.holm_p)] if holm else []) + [
        _p(result.result.signed_rank.p_value), _per_seed(result)]


def primary_section(declared: tuple[Contrast, ...], results: list[ContrastResult]) -> list[Block]:
    lines = ["## Primary (pre-registered)", ""]
    if not declared:
        return lines + ["No primary contrast was declared in this run's config (`primary:`): every comparison in "
                        "this report is **exploratory**.", ""]
    header = ["contrast", "group", "n", "mean Δloss % [95% t CI]", "t p", "Holm p (t)", "Wilcoxon p",
              "per seed (Δloss %)"]
    return lines + [
        f"Declared in the config before the run: {', '.join(f'`{c.name}`' for c in declared)}. `A - off` is A's "
        "per-seed Δloss % against its paired off arm; `A - B` is A's Δloss % minus B's, seed by seed, over the "
        "seeds where both exist. Holm's correction runs across exactly this family "
        f"({len(results)} test(s): every declared contrast in every protocol/model group; an untestable one is "
        "left out of the count) and adjusts the **paired t-test's** p. The Wilcoxon signed-rank p is shown "
        "unadjusted beside it.", "", Table("primary_contrasts", header, [_contrast_row(result, True) for result in results]), ""]


def exploratory_contrast_section(results: list[ContrastResult]) -> list[Block]:
    if not results:
        return []
    header = ["contrast", "group", "n", "mean Δloss % [95% t CI]", "t p", "Wilcoxon p", "per seed (Δloss %)"]
    return ["## Exploratory: direct contrasts", "",
            "**Exploratory**: not declared in `primary:`, p-values uncorrected, for generating hypotheses only. "
            "Each contrast pairs the arms' Δloss % seed by seed (\"only the combination works\" needs such a "
            "contrast, not one significant arm beside a non-significant one).", "",
            Table("exploratory_contrasts", header, [_contrast_row(result, False) for result in results]), ""]


# ------------------------------------------------------------------------------- noise floor
def noise_floor_section(floors: dict[tuple[str, str], NoiseFloor | None]) -> list[Block]:
    lines = ["## Noise floor", "",
             "The `placebo` arm runs the whole controller path with a pressure scale of 1e-7 (about one float32 "
             "rounding unit), so its Δloss % is the protocol's own noise. SD = standard deviation across seeds "
             "of its per-seed Δloss %; MDE = the smallest mean Δloss % a two-sided paired t-test at α = 0.05 "
             "detects with 80% power at that SD and n (noncentral t). **MISCALIBRATED** = the placebo's own "
             "t-test is significant at 5%.", ""]
    rows, missing = [], []
    for (protocol, model), floor in floors.items():
        if floor is None:
            missing.append(_group(protocol, model))
            continue
        status = "**MISCALIBRATED**" if floor.miscalibrated else ("ok" if not floor.reason else floor.reason)
        rows.append([protocol, model, str(floor.n), _num(floor.sd), _num(floor.mde), _ci(floor.interval, _pct),
                     _p(floor.interval.p_value), status])
    if rows:
        lines += [Table("noise_floor", ["protocol", "model", "placebo n", "SD of Δloss %", "MDE (80%, α 0.05) Δloss %",
                          "placebo mean Δloss % [95% t CI]", "placebo t p", "status"], rows), ""]
    lines += [f"- {group}: **{NO_PLACEBO}**." for group in missing]
    return lines + ([""] if missing else [])


# ------------------------------------------------------------------------------- baselines
def baselines_section(run: Run) -> list[Block]:
    lines = ["## Baselines and loss floor", "", baselines_table(run), "",
             "Count bigram (interpolated absolute discounting) and unigram (add-one) are fit on the same training "
             "tokens and scored on the same held-out tokens. The Bayes floor is the expected loss of the optimal "
             "causal predictor of the synthetic generator (topic and phase inferred from the prefix); no model "
             "can be expected to beat it. Uniform = ln V.", ""]
    for (protocol, model), (failed, n) in bigram_failures(run).items():
        if failed:
            lines += [f"- **{_group(protocol, model)}: off arm does not beat the count bigram ({failed}/{n} seeds)**: "
                      "a Δloss measured on a model that has not learnt more than pair counts says little about "
                      "routing.", ""]
    return lines


# ------------------------------------------------------------------------------- separation
def noncausal_section(run: Run) -> list[Block]:
    """Expert Choice runs only (else no lines): per arm, the causal held-out loss (the reported one,
    threshold routing) beside the non-causal one (capacity routing, which reads later tokens), and
    their paired gap over seeds: the size of the future-token leak."""
    groups: dict[tuple[str, str, str], list] = {}
    for record in run.records.values():
        if record.heldout.noncausal_loss is not None:
            groups.setdefault((record.protocol, record.model, record.variant), []).append(record)
    if not groups:
        return []
    rows = []
    for (protocol, model, variant), records in sorted(groups.items()):
        causal = [r.heldout.loss for r in records]
        noncausal = [r.heldout.noncausal_loss for r in records]
        gap = stats.paired_t_interval([n - c for n, c in zip(noncausal, causal, strict=True)])
        rows.append([protocol, model, variant, str(len(records)), _num(sum(causal) / len(causal), 4),
                     _num(sum(noncausal) / len(noncausal), 4), _ci(gap, lambda v: f"{v:+.4f}")])
    return ["## Expert Choice: causal vs non-causal held-out loss", "",
            "Held-out losses above are causal (per-expert thresholds learned in training). With capacity routing "
            "each expert picks from the whole sequence, later tokens included; that loss is not a valid "
            "next-token loss and is shown only to size the leak (gap = non-causal − causal, 95% t interval).", "",
            Table("causal_vs_noncausal", ["protocol", "model", "arm", "n", "causal loss", "non-causal loss", "gap [95% CI]"],
                  rows), ""]


def separation_section(run: Run, summaries: list[SettingSummary]) -> list[Block]:
    lines = ["## Separation", ""]
    if contrasts.phase_order_fixed(run):
        lines += [f"**{FIXED_ORDER[0].upper() + FIXED_ORDER[1:]}** (with a fixed order a token's position predicts "
                  "its phase, and autocorrelated routing passes for separation).", ""]
    header = ["arm", "seeds", "excess-sep (mean)", "permutation p (mean over seeds × layers)",
              "share of tests p < 0.05"]
    for (protocol, model), rows in contrasts.separation_rows(summaries).items():
        lines += [f"### {_group(protocol, model)}", "", Table(file_slug(f"separation_{protocol}_{model}"), header, [
            [row.label, str(row.n), f"{row.excess:+.2e}" if math.isfinite(row.excess) else "–", _p(row.mean_p),
             _num(row.rejected)] for row in rows]), ""]
    return lines


# ------------------------------------------------------------------------------- slow field
def slow_field_section(summaries: list[SettingSummary]) -> list[Block]:
    fields = contrasts.slow_fields(summaries)
    if not fields:
        return []
    rows = [[field.protocol, field.model, field.label, f"{field.eta:g}", str(field.update_every), f"{field.ticks:g}",
             _num(field.tau_local), f"{field.covered_local:.3f}", _num(field.tau_global), f"{field.covered_global:.3f}"]
            for field in fields]
    lines = ["## Slow field", "",
             "How far T̄ relaxed in the arms that deliver temperature: τ_local = u/η and τ_global = u/(η·g) ticks "
             "(u = update_every, g = eta_global_factor; 2u/η by default); covered = 1 − exp(−ticks/τ). An arm "
             "that ends at a small fraction tests a field that has barely moved.", "",
             Table("slow_field", ["protocol", "model", "arm", "η", "u", "ticks", "τ_local", "covered (local)", "τ_global",
                     "covered (global)"], rows), ""]
    barely = [field.label for field in fields if field.covered_global < 0.5]
    if barely:
        lines += [f"- T̄_global covered less than half of its relaxation in: {', '.join(barely)}.", ""]
    return lines


# ------------------------------------------------------------------------------- provenance
def numerics_line(run: Run) -> str:
    """The numerics the cells ran under (device, torch threads), from the records."""
    seen = sorted({(str(r.numerics.get("device")), str(r.numerics.get("torch_threads"))) for r in run.records.values()})
    return "; ".join(f"{device}, {threads} torch thread(s)" for device, threads in seen) or "–"
