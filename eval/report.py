"""``chronovisor report RUN_DIR``: paired statistics, summary.md, heatmaps and field trajectories.

For every controller setting (protocol, model, PTConfig minus the seed) the report pairs each seed's
on arm with that seed's off arm (same init, data and order) and computes, per seed,

    Δloss %      = 100 · (held-out loss on − off) / off
    Δexcess-sep  = excess separation on − off   (separation minus its permutation null, mean over layers)

and over seeds: robustness k/n (Δloss < 0 and Δexcess-sep > 0) with a Wilson 95% interval, mean
Δloss % with a paired bootstrap 95% CI, a Wilcoxon signed-rank p-value and its Holm correction
across all settings of the run, the final T̄ variance across experts (the reference's number) and
the routing preservation of the on arm vs the off arm on the held-out tokens (for ``joint`` the two
arms are different trained models, so it is "vs the off arm", not "vs the same base").

Outputs (paths relative to the run directory; nothing machine- or time-specific goes into
summary.md, so an interrupted-and-resumed sweep reports exactly like an uninterrupted one)::

    summary.md
    plots/heatmap_<group>.png       robustness, Δloss %, Δexcess-sep over η × P
    plots/trajectory_<group>.png    T̄_global mean and variance, pressure mean |b| per tick
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chronovisor.eval import metrics, stats
from chronovisor.eval.sweep import MANIFEST, cell_path, routing_path

SUMMARY = "summary.md"
PLOTS_DIR = "plots"
VARIANT_ORDER = ("off", "pressure", "temperature", "pt", "loss_free")
# PTConfig fields shown as their own columns; any other field that varies in a run gets one too.
_AXIS_FIELDS = ("eta", "pressure_scale")
_HIDDEN_FIELDS = {"seed", "mode", "learnable"}


# ------------------------------------------------------------------------------- loading
@dataclass
class Run:
    """A run directory: its manifest and the records of its finished cells (by cell id)."""

    run_dir: Path
    manifest: dict[str, Any]
    records: dict[str, dict[str, Any]]

    @property
    def missing(self) -> list[str]:
        return [cell_id for cell_id in self.manifest["cells"] if cell_id not in self.records]


def load_run(run_dir: str | Path) -> Run:
    """Read ``manifest.json`` and every finished cell it lists."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a sweep run directory: {MANIFEST} is missing")
    manifest = json.loads(path.read_text())
    records = {}
    for cell_id in manifest["cells"]:
        try:
            records[cell_id] = json.loads(cell_path(run_dir, cell_id).read_text())
        except FileNotFoundError:
            continue
    return Run(run_dir, manifest, records)


def _routing(run: Run, cell_id: str) -> dict[str, np.ndarray]:
    with np.load(routing_path(run.run_dir, cell_id)) as stored:
        names = [str(name) for name in stored["layer_names"]]
        return {name: stored[f"layer{i}"] for i, name in enumerate(names)}


# ------------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class Setting:
    """One controller setting of a run: everything but the seed."""

    protocol: str
    model: str
    variant: str
    controller: tuple[tuple[str, Any], ...]

    @property
    def fields(self) -> dict[str, Any]:
        return dict(self.controller)

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
        arm delivers no temperature, the temperature arm no pressure, loss_free neither field."""
        if self.variant == "loss_free":
            return False
        if name == "eta":
            return self.variant != "pressure"
        return self.variant != "temperature"


def setting_of(record: dict[str, Any]) -> Setting:
    spec = record["spec"]
    controller = {key: value for key, value in spec["controller"].items() if key not in _HIDDEN_FIELDS}
    return Setting(spec["protocol"], spec["model"], record["variant"], tuple(sorted(controller.items())))


@dataclass
class PairedSeed:
    """The paired differences of one seed (on − off)."""

    seed: int
    on: dict[str, Any]
    off: dict[str, Any]
    delta_loss_pct: float
    delta_excess: float
    delta_separation: float
    delta_nmi: float
    delta_max_vio: float
    preservation: float
    T_bar_variance: float


def _layer_mean(record: dict[str, Any], key: str) -> float:
    return float(record["heldout"]["mean_over_layers"][key])


def pair_seed(run: Run, on: dict[str, Any], off: dict[str, Any]) -> PairedSeed:
    on_loss, off_loss = on["heldout"]["loss"], off["heldout"]["loss"]
    finite = math.isfinite(on_loss) and math.isfinite(off_loss)
    on_routing, off_routing = _routing(run, on["cell_id"]), _routing(run, off["cell_id"])
    preservation = float(np.mean([metrics.routing_preservation(on_routing[name], off_routing[name])
                                  for name in on_routing]))
    return PairedSeed(
        seed=on["spec"]["seed"],
        on=on,
        off=off,
        delta_loss_pct=metrics.delta_loss_pct(on_loss, off_loss) if finite else math.nan,
        delta_excess=_layer_mean(on, "excess_separation") - _layer_mean(off, "excess_separation"),
        delta_separation=_layer_mean(on, "separation") - _layer_mean(off, "separation"),
        delta_nmi=_layer_mean(on, "nmi") - _layer_mean(off, "nmi"),
        delta_max_vio=_layer_mean(on, "max_vio") - _layer_mean(off, "max_vio"),
        preservation=preservation,
        T_bar_variance=float(on["fields"]["T_bar_variance"]),
    )


@dataclass
class SettingSummary:
    """Seed-level statistics of one setting (see the module docstring)."""

    setting: Setting
    seeds: list[PairedSeed]
    robustness: stats.Robustness
    loss_ci: stats.BootstrapCI
    wilcoxon: stats.SignedRank
    excess_ci: stats.BootstrapCI
    holm_p: float = math.nan
    diverged: int = 0

    @property
    def n(self) -> int:
        return len(self.seeds)

    def mean(self, name: str) -> float:
        values = [getattr(seed, name) for seed in self.seeds]
        return float(np.nanmean(values)) if values else math.nan

    def mean_on(self, key: str) -> float:
        return float(np.mean([_layer_mean(seed.on, key) for seed in self.seeds]))

    def mean_loss(self, arm: str) -> float:
        return float(np.mean([getattr(seed, arm)["heldout"]["loss"] for seed in self.seeds]))


def summarize(run: Run) -> list[SettingSummary]:
    """Pair every finished on arm with its finished off arm and summarise each setting."""
    groups: dict[Setting, list[PairedSeed]] = defaultdict(list)
    for record in run.records.values():
        if record["arm"] != "on":
            continue
        off = run.records.get(record["paired_off_cell"])
        if off is None:
            continue  # the off arm of this seed is not finished yet
        groups[setting_of(record)].append(pair_seed(run, record, off))
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
            loss_ci=stats.paired_bootstrap_ci(delta_loss[finite]),
            wilcoxon=stats.signed_rank_p(delta_loss[finite]),
            excess_ci=stats.paired_bootstrap_ci(delta_excess),
            diverged=int((~finite).sum()),
        ))
    summaries.sort(key=_sort_key)
    adjusted = stats.holm_correction([summary.wilcoxon.p_value for summary in summaries])
    for summary, p_value in zip(summaries, adjusted, strict=True):
        summary.holm_p = float(p_value)
    return summaries


def mismatched_numerics(summaries: list[SettingSummary]) -> int:
    """Number of (on, off) pairs whose arms ran under different device / thread settings."""
    return sum(seed.on.get("numerics") != seed.off.get("numerics") for summary in summaries for seed in summary.seeds)


def _sort_key(summary: SettingSummary) -> tuple:
    setting = summary.setting
    rest = tuple((key, str(value)) for key, value in setting.controller if key not in _AXIS_FIELDS + ("dynamics",))
    return (setting.protocol, setting.model, rest, VARIANT_ORDER.index(setting.variant), setting.eta,
            setting.pressure_scale)


def varying_fields(summaries: list[SettingSummary]) -> list[str]:
    """Controller fields (besides η and P) whose value differs between settings of the run."""
    values: dict[str, set] = defaultdict(set)
    for summary in summaries:
        for key, value in summary.setting.controller:
            values[key].add(json.dumps(value))
    return [key for key, seen in values.items() if len(seen) > 1 and key not in _AXIS_FIELDS and key != "dynamics"]


# ------------------------------------------------------------------------------ formatting
def _num(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"


def _pct(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:+.2f}"


def _ci(ci: stats.BootstrapCI, fmt) -> str:
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


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(summaries: list[SettingSummary]) -> str:
    """The per-setting table: robustness, Δloss CI, p-values, Δexcess, T̄ variance, preservation."""
    extra = varying_fields(summaries)
    header = (["protocol", "model", "arm", "η", "P"] + extra +
              ["n", "robust k/n [Wilson 95%]", "Δloss % [95% CI]", "Wilcoxon p", "Holm p",
               "Δexcess-sep [95% CI]", "Δsep (raw)", "ΔNMI", "T̄ var", "preserved"])
    rows = []
    for s in summaries:
        fields = s.setting.fields
        diverged = f" ({s.diverged} diverged)" if s.diverged else ""
        rows.append([s.setting.protocol, s.setting.model, _arm_name(s.setting), _axis(s.setting, "eta"),
                     _axis(s.setting, "pressure_scale")] + [str(fields.get(key)) for key in extra] + [
            str(s.n), _robust(s), _ci(s.loss_ci, _pct) + diverged, _num(s.wilcoxon.p_value), _num(s.holm_p),
            _ci(s.excess_ci, _sci), _sci(s.mean("delta_separation")), _sci(s.mean("delta_nmi")),
            _T_bar_variance(s), f"{s.mean('preservation'):.3f}"])
    return _table(header, rows)


def _arm_name(setting: Setting) -> str:
    label = setting.reference_label
    return f"{setting.variant} · {label}" if label else setting.variant


def ablation_tables(run: Run, summaries: list[SettingSummary]) -> list[tuple[str, str]]:
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
                  "Δexcess-sep", "NMI", "MaxVio", "preserved", "T̄ var"]
        offs = {seed.off["cell_id"]: seed.off for member in members for seed in member.seeds}
        off_records = list(offs.values())
        rows = [["off (baseline)", "–", "–", str(len(off_records)),
                 _num(float(np.mean([r["heldout"]["loss"] for r in off_records])), 4), "–", "–",
                 _sci(float(np.mean([_layer_mean(r, "excess_separation") for r in off_records]))), "–",
                 _num(float(np.mean([_layer_mean(r, "nmi") for r in off_records]))),
                 _num(float(np.mean([_layer_mean(r, "max_vio") for r in off_records]))), "1.000", "–"]]
        for s in members:
            rows.append([_arm_name(s.setting), _axis(s.setting, "eta"), _axis(s.setting, "pressure_scale"), str(s.n),
                         _num(s.mean_loss("on"), 4), _ci(s.loss_ci, _pct), _robust(s),
                         _sci(s.mean_on("excess_separation")), _sci(s.mean("delta_excess")), _num(s.mean_on("nmi")),
                         _num(s.mean_on("max_vio")), f"{s.mean('preservation'):.3f}", _T_bar_variance(s)])
        suffix = ", ".join(f"{key}={json.loads(value)}" for key, value in rest)
        tables.append((f"{protocol}, {model}" + (f", {suffix}" if suffix else ""), _table(header, rows)))
    return tables


def floor_table(run: Run) -> str:
    """Per (protocol, model): the off arm's held-out loss against the data's loss floors."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in run.records.values():
        if record["arm"] == "off":
            groups[(record["spec"]["protocol"], record["spec"]["model"])].append(record)
    rows = []
    for (protocol, model), records in sorted(groups.items()):
        floors = [r["loss_floor"] for r in records if r.get("loss_floor")]
        train = [r["train"]["final_loss"] for r in records if r.get("train")]
        floor = {key: float(np.mean([f[key] for f in floors])) if floors else math.nan
                 for key in ("bayes", "oracle", "uniform")}
        rows.append([protocol, model, str(len(records)), _num(float(np.mean([r["heldout"]["loss"] for r in records])), 4),
                     _num(floor["bayes"], 4), _num(floor["oracle"], 4), _num(floor["uniform"], 4),
                     _num(float(np.mean(train)), 4) if train else "–"])
    return _table(["protocol", "model", "seeds", "off-arm held-out loss", "Bayes floor (causal)", "oracle floor",
                   "uniform ln V", "off-arm training loss (in-sample)"], rows)


# ------------------------------------------------------------------------------------ plots
def _group_key(summary: SettingSummary, extra: list[str]) -> tuple:
    fields = summary.setting.fields
    return (summary.setting.protocol, summary.setting.model, summary.setting.variant,
            tuple((key, fields.get(key)) for key in extra))


def _slug(parts: tuple) -> str:
    protocol, model, variant, rest = parts
    text = "_".join([protocol, Path(model).name, variant] + [f"{key}-{value}" for key, value in rest])
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in text)


def plot_heatmaps(summaries: list[SettingSummary], plots_dir: Path) -> list[Path]:
    """One PNG per (protocol, model, arm, other fields) with ≥ 2 η × P cells: robustness, Δloss, Δexcess."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    extra = varying_fields(summaries)
    groups: dict[tuple, list[SettingSummary]] = defaultdict(list)
    for summary in summaries:
        groups[_group_key(summary, extra)].append(summary)
    paths = []
    for key, members in groups.items():
        etas = sorted({m.setting.eta for m in members})
        scales = sorted({m.setting.pressure_scale for m in members})
        if len(etas) * len(scales) < 2:
            continue
        panels = [("robustness (fraction of seeds)", lambda m: m.robustness.fraction, "viridis", (0.0, 1.0)),
                  ("Δ held-out loss % (mean; blue = lower)", lambda m: m.loss_ci.mean, "RdBu_r", None),
                  ("Δ excess separation (mean; blue = higher)", lambda m: m.mean("delta_excess"), "RdBu", None)]
        figure, axes = plt.subplots(1, 3, figsize=(4.2 * 3, 0.6 * len(etas) + 2.6), squeeze=False)
        for axis, (title, value, cmap, limits) in zip(axes[0], panels, strict=True):
            grid = np.full((len(etas), len(scales)), np.nan)
            for m in members:
                grid[etas.index(m.setting.eta), scales.index(m.setting.pressure_scale)] = value(m)
            finite = grid[np.isfinite(grid)]
            if limits is not None:
                norm = None
                vmin, vmax = limits
            else:
                bound = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
                norm, vmin, vmax = TwoSlopeNorm(0.0, -bound, bound), None, None
            image = axis.imshow(grid, cmap=cmap, norm=norm, vmin=vmin, vmax=vmax, aspect="auto", origin="lower")
            for (i, j), cell in np.ndenumerate(grid):
                if np.isfinite(cell):
                    axis.text(j, i, f"{cell:.2f}" if abs(cell) >= 0.01 or cell == 0 else f"{cell:.1e}",
                              ha="center", va="center", fontsize=8, color="black",
                              bbox=dict(facecolor="white", alpha=0.6, lw=0, pad=1))
            axis.set_xticks(range(len(scales)), [f"{p:g}" for p in scales])
            axis.set_yticks(range(len(etas)), [f"{e:g}" for e in etas])
            axis.set_xlabel("pressure scale P")
            axis.set_ylabel("η")
            axis.set_title(title, fontsize=10)
            figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
        n = max(m.n for m in members)
        paths.append(_save_figure(figure, plots_dir, "heatmap", key, f"paired vs off, n≤{n} seeds"))
    return paths


def _save_figure(figure, plots_dir: Path, kind: str, key: tuple, subtitle: str) -> Path:
    """Title a group's figure (protocol · model · arm · varying fields · subtitle), save it as
    ``plots_dir/<kind>_<group>.png`` and close it."""
    import matplotlib.pyplot as plt

    figure.suptitle(f"{key[0]} · {Path(key[1]).name} · {key[2]}" + "".join(f" · {k}={v}" for k, v in key[3])
                    + f" · {subtitle}", fontsize=10)
    figure.tight_layout()
    path = plots_dir / f"{kind}_{_slug(key)}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_trajectories(summaries: list[SettingSummary], plots_dir: Path) -> list[Path]:
    """One PNG per group: T̄_global mean, T̄_global variance across experts and pressure mean |b|
    against the tick, one line per η × P (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = varying_fields(summaries)
    groups: dict[tuple, list[SettingSummary]] = defaultdict(list)
    for summary in summaries:
        groups[_group_key(summary, extra)].append(summary)
    panels = [("T_bar_global_mean", "T̄_global (mean over experts)"),
              ("T_bar_global_var", "T̄_global variance across experts"),
              ("pressure_mean_abs", "pressure mean |b|")]
    paths = []
    for key, members in groups.items():
        curves = []
        for m in members:
            trajectories = [seed.on["fields"]["trajectory"] for seed in m.seeds if seed.on.get("fields")]
            if not trajectories or not trajectories[0]["tick"]:
                continue
            length = min(len(t["tick"]) for t in trajectories)
            ticks = trajectories[0]["tick"][:length]
            curves.append((m, ticks, {name: np.mean([t[name][:length] for t in trajectories], axis=0)
                                      for name, _ in panels}))
        if not curves:
            continue
        figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4), squeeze=False)
        setting = members[0].setting
        for axis, (name, title) in zip(axes[0], panels, strict=True):
            if not setting.acts("pressure_scale" if name.startswith("pressure") else "eta"):
                title += "\n(computed, not delivered in this arm)"
            for m, ticks, values in curves:
                axis.plot(ticks, values[name], lw=1.2, label=f"η={m.setting.eta:g}, P={m.setting.pressure_scale:g}")
            axis.set_xlabel("tick")
            axis.set_title(title, fontsize=10)
        axes[0][0].legend(fontsize=7, ncol=1 + len(curves) // 8)
        paths.append(_save_figure(figure, plots_dir, "trajectory", key, "controller-on arms, mean over seeds"))
    return paths


# ----------------------------------------------------------------------------------- report
@dataclass
class Report:
    """Where the report went and its main table (markdown)."""

    summary_path: Path
    plots: list[Path] = field(default_factory=list)
    table: str = ""


def render(run: Run, summaries: list[SettingSummary], plots: list[Path]) -> str:
    manifest = run.manifest
    config = manifest["config"]
    git = manifest.get("git") or {}
    commit = git.get("commit", "unknown")[:12] + (" (dirty tree)" if git.get("dirty") else "") if git else "unknown"
    lines = [
        f"# Sweep report: {manifest['name']}",
        "",
        f"- protocol **{config['protocol']}**; models {', '.join(config['models'])}; seeds {config['seeds']}",
        f"- cells finished: {len(run.records)}/{len(manifest['cells'])}"
        + (f" (**incomplete**: {len(run.missing)} missing; seeds without both arms are left out)" if run.missing else ""),
        f"- config hash `{manifest['config_hash'][:12]}`; code commit `{commit}`; "
        f"torch {manifest['versions'].get('torch')}, transformers {manifest['versions'].get('transformers')}",
        "",
        "Every number compares the controller-on arm with the controller-off arm of the **same seed** (same init, "
        "data and order) on **held-out** conversations, "
        + ("evaluated turn by turn through the KV cache with the controller ticking after every turn (streaming). "
           if config["eval"].get("streaming") else "with the fields frozen (no ticks) during evaluation. ") +
        "Δloss % = 100·(on − off)/off of the mean next-token cross-entropy over real tokens. Excess separation = "
        "the reference's separation Σ_k Var_turns(M[:,k]) minus its within-conversation turn-label permutation "
        "null, mean over the analysed MoE layers. **Robust** = Δloss < 0 and Δexcess-sep > 0 (k/n seeds, Wilson "
        "95% interval). Δloss CIs: paired bootstrap 95% over seeds; Wilcoxon signed-rank p (two-sided), Holm-"
        "corrected across all settings of this run. T̄ var = variance of T̄_global across experts at the end (the "
        "reference's figure). Preserved = share of top-k choices on held-out tokens equal to the off arm's"
        + (" (for joint the arms are different trained models)." if config["protocol"] == "joint" else "."),
        "",
        "## Loss floor",
        "",
        floor_table(run),
        "",
        "The Bayes floor is the expected loss of the optimal causal predictor of the synthetic generator "
        "(topic and phase inferred from the prefix); no model can be expected to beat it.",
        "",
        "## Controller settings (paired vs the off arm)",
        "",
        main_table(summaries) if summaries else "_No setting has both arms finished for any seed yet._",
        "",
    ]
    mismatched = mismatched_numerics(summaries)
    if mismatched:
        lines += [f"**Warning:** {mismatched} on/off pair(s) ran under different numerics (device or torch thread "
                  "count, e.g. a sweep resumed with another process layout). Training is bit-reproducible only "
                  "under equal numerics, so those differences also contain float-order noise.", ""]
    tables = ablation_tables(run, summaries)
    if tables:
        lines += ["## Ablation", "",
                  "Arms: `pressure` = b only (T_eff ≡ 1), `temperature` = T only (b ≡ 0), `pt` = both, "
                  "`loss_free` = DeepSeek's auxiliary-loss-free sign rule (selection-only bias). The reference's "
                  "\"P-only\" (η = 0) and \"T-only\" (P = 0) runs are `pt` settings and labelled as such; note that "
                  "both keep the fast temperature T_fast.", ""]
        for title, table in tables:
            lines += [f"### {title}", "", table, ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{path.stem}]({PLOTS_DIR}/{path.name})" for path in plots]
        lines.append("")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Report:
    """Summarise a run directory into ``summary.md`` and ``plots/*.png``."""
    run = load_run(run_dir)
    summaries = summarize(run)
    plots_dir = run.run_dir / PLOTS_DIR
    plots_dir.mkdir(exist_ok=True)
    plots = plot_heatmaps(summaries, plots_dir) + plot_trajectories(summaries, plots_dir)
    text = render(run, summaries, plots)
    summary_path = run.run_dir / SUMMARY
    summary_path.write_text(text)
    return Report(summary_path, plots, main_table(summaries) if summaries else "")


def main(args) -> int:
    """The ``chronovisor report`` command."""
    try:
        report = write_report(args.run_dir)
    except FileNotFoundError as error:
        print(f"chronovisor report: {error}", file=sys.stderr)
        return 2
    print(report.table)
    print(f"\nsummary: {report.summary_path}")
    for path in report.plots:
        print(f"plot:    {path}")
    return 0
