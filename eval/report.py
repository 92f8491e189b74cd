"""``chronovisor report RUN_DIR``: summary.md with the calibrated paired statistics, and its plots.

The statistics are :mod:`.pairing`'s and :mod:`.contrasts`', the tables :mod:`.tables`' and
:mod:`.sections`', the figures :mod:`.plots`'. summary.md, in order: header (DIRTY TREE and
MISCALIBRATED flags, provenance), Primary (pre-registered) contrasts with Holm's correction, Noise
floor (placebo SD, MDE), the exploratory per-setting table and direct contrasts, Baselines and loss
floor, Expert Choice's causal vs non-causal loss (those models only), Separation, Slow field,
Ablation, Plots. Outputs (paths relative to the run directory; nothing machine- or time-specific
goes into summary.md, so an interrupted-and-resumed sweep reports exactly like an uninterrupted
one)::

    summary.md
    plots/deltas_<protocol>_<model>.png   per-seed Δloss % per arm, placebo band shaded
    plots/training_<group>.png            training loss on vs off (protocols that train), one per arm
    plots/heatmap_<group>.png             robustness, Δloss %, Δexcess-sep over η × P
    plots/trajectory_<group>.png          T̄_global mean and variance, pressure mean |b| per tick
    plots/routing_<protocol>_<model>.png  expert × turn (and its change vs off), expert × layer, per arm
    plots/load_<protocol>_<model>.png     each expert's share of the held-out top-k slots, per arm
    tables/<name>.csv                     every table of summary.md, the same cells (linked below each)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chronovisor.eval import contrasts, sections
from chronovisor.eval.pairing import Run, SettingSummary, load_run, mismatched_numerics, summarize
from chronovisor.eval.plots import (
    plot_deltas,
    plot_heatmaps,
    plot_load,
    plot_routing,
    plot_training,
    plot_trajectories,
)
from chronovisor.eval.routing_maps import arm_routing, run_routing
from chronovisor.eval.rundir import PLOTS_DIR, TABLES_DIR, RunDir
from chronovisor.eval.sections import Block
from chronovisor.eval.tables import Table, ablation_tables, main_table


@dataclass
class Report:
    """Where the report went (summary.md, its plots and CSV tables) and its main table (markdown)."""

    summary_path: Path
    plots: list[Path] = field(default_factory=list)
    table: str = ""
    tables: list[Path] = field(default_factory=list)


def render(blocks: list[Block]) -> str:
    """The text of ``summary.md``: the lines as they are, each table as markdown with a link to its CSV."""
    return "\n".join(block if isinstance(block, str) else
                     f"{block.markdown}\n\nCSV: [{TABLES_DIR}/{block.name}.csv]({TABLES_DIR}/{block.name}.csv)"
                     for block in blocks)


def summary_blocks(run: Run, summaries: list[SettingSummary], plots: list[Path]) -> list[Block]:
    """The blocks of ``summary.md`` in order (nothing machine- or time-specific in them)."""
    manifest = run.manifest
    config = manifest["config"]
    git = manifest.get("git") or {}
    commit = (f"`{git.get('commit', 'unknown')[:12]}`" + (" **(DIRTY TREE)**" if git.get("dirty") else "")
              if git else "unknown")
    floors = contrasts.noise_floors(summaries)
    declared = contrasts.declared_contrasts(run)
    lines = [f"# Sweep report: {manifest['name']}", ""] + sections.header_flags(run, floors) + [
        f"- protocol **{config['protocol']}**; models {', '.join(config['models'])}; seeds {config['seeds']}",
        f"- cells finished: {len(run.records)}/{len(manifest['cells'])}"
        + (f" (**incomplete**: {len(run.missing)} missing; seeds without both arms are left out)" if run.missing else ""),
        f"- config hash `{manifest['config_hash'][:12]}`; code commit {commit}; "
        f"torch {manifest['versions'].get('torch')}, transformers {manifest['versions'].get('transformers')}",
        f"- numerics of the cells: {sections.numerics_line(run)}",
        "",
        "Every number compares the controller-on arm with the controller-off arm of the **same seed** (same init, "
        "data and order) on **held-out** conversations, "
        + ("evaluated turn by turn through the KV cache with the controller ticking after every turn (streaming). "
           if config["eval"].get("streaming") else "with the fields frozen (no ticks) during evaluation. ") +
        "Δloss % = 100·(on − off)/off of the mean next-token cross-entropy over real tokens. Excess separation = "
        "the reference's separation Σ_k Var_turns(M[:,k]) minus its turn-label permutation null, mean over the "
        "analysed MoE layers. **Robust** = Δloss < 0 and Δexcess-sep > 0 (k/n seeds, Wilson 95% interval). "
        "Δloss intervals are Student t 95% over seeds, everywhere; beside the t-test's p the Wilcoxon "
        "signed-rank p (two-sided). Only the pre-registered contrasts are corrected for multiplicity (Holm); "
        "every other p-value is **exploratory** and uncorrected. T̄ var = variance of T̄_global across experts "
        "at the end (the reference's figure). Preserved = share of top-k choices on held-out tokens equal to the "
        "off arm's" + (" (for joint the arms are different trained models)." if config["protocol"] == "joint" else "."),
        "",
    ]
    mismatched = mismatched_numerics(summaries)
    if mismatched:
        lines += [f"**Warning:** {mismatched} on/off pair(s) ran under different numerics (device or torch thread "
                  "count, e.g. a sweep resumed with another process layout). Training is bit-reproducible only "
                  "under equal numerics, so those differences also contain float-order noise.", ""]
    lines += sections.primary_section(declared, contrasts.primary_contrasts(declared, summaries))
    lines += sections.noise_floor_section(floors)
    lines += ["## Exploratory: controller settings (paired vs the off arm)", "",
              "**Exploratory** (uncorrected p-values: the t-test's and the Wilcoxon signed-rank test's).", "",
              main_table(summaries) if summaries else "_No setting has both arms finished for any seed yet._", ""]
    lines += sections.exploratory_contrast_section(contrasts.exploratory_contrasts(declared, summaries))
    lines += sections.baselines_section(run)
    lines += sections.noncausal_section(run)
    lines += sections.separation_section(run, summaries)
    lines += sections.slow_field_section(summaries)
    tables = ablation_tables(run, summaries)
    if tables:
        lines += ["## Ablation (exploratory)", "",
                  "Arms: `pressure` = b only (T_eff ≡ 1), `temperature` = T only (b ≡ 0), `pt` = both, "
                  "`placebo` = pressure at 1e-7 (the noise floor), "
                  "`loss_free` = DeepSeek's auxiliary-loss-free sign rule (selection-only bias). The reference's "
                  "\"P-only\" (η = 0) and \"T-only\" (P = 0) runs are `pt` settings and labelled as such; note that "
                  "both keep the fast temperature T_fast.", ""]
        for title, table in tables:
            lines += [f"### {title}", "", table, ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{path.stem}]({PLOTS_DIR}/{path.name})" for path in plots]
        lines.append("")
    return lines


def write_report(run_dir: RunDir | str | Path) -> Report:
    """Summarise a run directory into ``summary.md``, ``plots/*.png`` and ``tables/*.csv``.

    Raises:
        RunDirError: ``run_dir`` has no manifest.
    """
    run = load_run(run_dir)
    summaries = summarize(run)
    plots_dir, tables_dir = run.run_dir.plots_dir, run.run_dir.tables_dir
    plots_dir.mkdir(exist_ok=True)
    tables_dir.mkdir(exist_ok=True)
    routing = arm_routing(summaries, run_routing(run))
    plots = (plot_deltas(summaries, plots_dir) + plot_training(summaries, plots_dir)
             + plot_routing(routing, plots_dir) + plot_load(routing, plots_dir)
             + plot_heatmaps(summaries, plots_dir) + plot_trajectories(summaries, plots_dir))
    blocks = summary_blocks(run, summaries, plots)
    run.run_dir.summary_path.write_text(render(blocks))
    tables = [block.write_csv(tables_dir) for block in blocks if isinstance(block, Table)]
    return Report(run.run_dir.summary_path, plots, main_table(summaries).markdown if summaries else "", tables)
