"""The report's figures: η × P heatmaps and field trajectories, one PNG per group of settings.

A group is (protocol, model, arm, the other varying controller fields); matplotlib runs headless (Agg).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from chronovisor.eval.pairing import SettingSummary, varying_fields


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
            trajectories = [seed.on.fields.trajectory for seed in m.seeds if seed.on.fields]
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
