"""The report's figures: η × P heatmaps and field trajectories, one PNG per group of settings; per-seed
Δloss % strip plots with the placebo band, one per (protocol, model); training curves on vs off, one per arm;
routing maps (expert × turn, its change against the off arm, expert × layer) and per-expert load, one
per (protocol, model).

A group is (protocol, model, arm, the other varying controller fields); matplotlib runs headless (Agg).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from chronovisor.eval.contrasts import arm_labels, by_group, noise_floors, seed_deltas
from chronovisor.eval.pairing import SettingSummary, varying_fields
from chronovisor.eval.routing_maps import ArmRouting
from chronovisor.eval.rundir import file_slug


def _group_key(summary: SettingSummary, extra: list[str]) -> tuple:
    fields = summary.setting.fields
    return (summary.setting.protocol, summary.setting.model, summary.setting.variant,
            tuple((key, fields.get(key)) for key in extra))


def _slug(parts: tuple) -> str:
    protocol, model, variant, rest = parts
    return file_slug("_".join([protocol, Path(model).name, variant] + [f"{key}-{value}" for key, value in rest]))


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

    figure.suptitle(f"{key[0]} · {Path(key[1]).name} · {key[2]}" + "".join(f" · {k}={v}" for k, v in key[3])
                    + f" · {subtitle}", fontsize=10)
    return _write(figure, plots_dir / f"{kind}_{_slug(key)}.png")


def _write(figure, path: Path) -> Path:
    """Lay out, save (PNG, 110 dpi) and close ``figure``."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _group_slug(protocol: str, model: str) -> str:
    """The file-name part of a (protocol, model) group's figures."""
    return file_slug(f"{protocol}_{Path(model).name}")


def plot_deltas(summaries: list[SettingSummary], plots_dir: Path) -> list[Path]:
    """One PNG per (protocol, model): the per-seed Δloss % of every arm (one point per seed, arms on the
    x-axis), the mean ± 2 SD band of the placebo arm shaded when there is one."""
    plt = _pyplot()
    labels, floors = arm_labels(summaries), noise_floors(summaries)
    paths = []
    for (protocol, model), members in by_group(summaries).items():
        figure, axis = plt.subplots(figsize=(1.1 * len(members) + 2.6, 3.6))
        floor = floors[(protocol, model)]
        if floor is not None and np.isfinite(floor.sd):
            low, high = floor.interval.mean - 2 * floor.sd, floor.interval.mean + 2 * floor.sd
            axis.axhspan(low, high, color="0.85", zorder=0, label="placebo mean ± 2 SD")
        axis.axhline(0.0, color="0.4", lw=0.8)
        for index, member in enumerate(members):
            values = list(seed_deltas(member).values())
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(len(values))
            axis.scatter(index + jitter, values, s=22, zorder=3)
            if values:
                axis.plot([index - 0.25, index + 0.25], [np.mean(values)] * 2, color="black", lw=1.5, zorder=4)
        axis.set_xticks(range(len(members)), [labels[m.setting] for m in members], rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("Δ held-out loss % vs paired off arm")
        axis.set_title(f"{protocol} · {Path(model).name} · per-seed Δloss % (bar = mean)", fontsize=10)
        if floor is not None:
            axis.legend(fontsize=7, loc="best")
        paths.append(_write(figure, plots_dir / f"deltas_{_group_slug(protocol, model)}.png"))
    return paths


def plot_training(summaries: list[SettingSummary], plots_dir: Path) -> list[Path]:
    """One PNG per arm of a protocol that trains: the in-sample training loss of the on and the off arm
    against the step (mean over seeds, min–max spread shaded)."""
    plt = _pyplot()
    labels = arm_labels(summaries)
    paths = []
    for summary in summaries:
        pairs = [(seed.on.train, seed.off.train) for seed in summary.seeds]
        if not pairs or not all(on and off and on.curve and off.curve for on, off in pairs):
            continue
        figure, axis = plt.subplots(figsize=(5.6, 3.6))
        for index, (arm, color, style) in enumerate((("on", "tab:red", "-"), ("off", "tab:blue", "--"))):
            curves = [pair[index].curve for pair in pairs]
            length = min(len(curve) for curve in curves)
            values = np.array([curve[:length] for curve in curves], dtype=float)
            steps = np.arange(length) * pairs[0][index].curve_every
            axis.plot(steps, values.mean(axis=0), color=color, ls=style, lw=1.3, label=f"{arm} (mean of {len(curves)} seeds)")
            axis.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2, lw=0)
        label = labels[summary.setting]
        axis.set_xlabel("training step")
        axis.set_ylabel("training loss (in-sample)")
        axis.set_title(f"{summary.setting.protocol} · {Path(summary.setting.model).name} · {label} vs off "
                       "(band = min–max over seeds)", fontsize=9)
        axis.legend(fontsize=7)
        slug = file_slug(f"{summary.setting.protocol}_{Path(summary.setting.model).name}_{label}")
        paths.append(_write(figure, plots_dir / f"training_{slug}.png"))
    return paths


def plot_routing(groups: dict[tuple[str, str], list[ArmRouting]], plots_dir: Path) -> list[Path]:
    """One PNG per (protocol, model), one row per arm (off first): the share of each turn's top-k slots
    per expert (mean over layers and seeds), that share minus the off arm's, and the share of each
    layer's slots per expert (mean over seeds); experts ranked by their seed's off-arm load."""
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm

    paths = []
    for (protocol, model), arms in groups.items():
        off = arms[0]
        turn_maps = [arm.by_turn for arm in arms if arm.by_turn is not None]
        high = max([float(np.nanmax(m)) for m in turn_maps] + [float(arm.load.max()) for arm in arms])
        changes = [arm.by_turn - off.by_turn for arm in arms[1:] if arm.by_turn is not None and off.by_turn is not None]
        bound = max([float(np.nanmax(np.abs(c))) for c in changes] + [1e-12])
        experts = off.load.shape[1]
        figure, axes = plt.subplots(len(arms), 3, figsize=(3.2 * 3 + 1.6, 1.9 * len(arms) + 0.8), squeeze=False)
        for row, arm in zip(axes, arms, strict=True):
            if arm.by_turn is None:
                for axis in row[:2]:
                    axis.text(0.5, 0.5, f"turns unknown:\n{arm.reason}", ha="center", va="center", fontsize=6, wrap=True)
                    axis.set_axis_off()
            else:
                image = row[0].imshow(arm.by_turn, cmap="viridis", vmin=0.0, vmax=high, aspect="auto")
                row[0].set_yticks(range(len(arm.turns)), arm.turns, fontsize=6)
                figure.colorbar(image, ax=row[0], fraction=0.046, pad=0.04)
                if arm is off or off.by_turn is None:
                    row[1].text(0.5, 0.5, "(the reference row)" if arm is off else "", ha="center", va="center",
                                fontsize=8)
                    row[1].set_axis_off()
                else:
                    image = row[1].imshow(arm.by_turn - off.by_turn, cmap="RdBu_r", aspect="auto",
                                          norm=TwoSlopeNorm(0.0, -bound, bound))
                    row[1].set_yticks(range(len(arm.turns)), arm.turns, fontsize=6)
                    figure.colorbar(image, ax=row[1], fraction=0.046, pad=0.04)
            image = row[2].imshow(arm.load, cmap="viridis", vmin=0.0, vmax=high, aspect="auto")
            row[2].set_yticks(range(len(arm.layers)), [f"layer {i}" for i in range(len(arm.layers))], fontsize=6)
            figure.colorbar(image, ax=row[2], fraction=0.046, pad=0.04)
            row[0].set_ylabel(arm.label, fontsize=9)
            for axis in row:
                if axis.axison:
                    axis.set_xticks(range(experts), [str(e) for e in range(experts)], fontsize=6)
        for axis, title in zip(axes[0], ("share of each turn's slots per expert", "minus the off arm's",
                                         "share of each layer's slots per expert"), strict=True):
            axis.set_title(title, fontsize=9)
        for axis in axes[-1]:
            axis.set_xlabel("expert, ranked by its seed's off-arm load", fontsize=8)
        figure.suptitle(f"{protocol} · {Path(model).name} · held-out routing, mean over seeds "
                        f"(uniform = 1/{experts} = {1 / experts:.3f})", fontsize=10)
        paths.append(_write(figure, plots_dir / f"routing_{_group_slug(protocol, model)}.png"))
    return paths


def plot_load(groups: dict[tuple[str, str], list[ArmRouting]], plots_dir: Path) -> list[Path]:
    """One PNG per (protocol, model): each expert's share of the held-out top-k slots (mean over layers),
    one bar per arm (mean over seeds, min–max over seeds as the error bar), uniform load dashed; experts
    ranked by their seed's off-arm load."""
    plt = _pyplot()
    paths = []
    for (protocol, model), arms in groups.items():
        experts = arms[0].load.shape[1]
        width = 0.8 / len(arms)
        figure, axis = plt.subplots(figsize=(max(5.6, 0.9 * experts + 2.0), 3.6))
        for index, arm in enumerate(arms):
            mean = arm.expert_load.mean(axis=0)
            spread = np.stack([mean - arm.expert_load.min(axis=0), arm.expert_load.max(axis=0) - mean])
            axis.bar(np.arange(experts) - 0.4 + width * (index + 0.5), mean, width, yerr=spread, capsize=1.5,
                     label=arm.label, error_kw=dict(lw=0.6))
        axis.axhline(1 / experts, color="0.3", ls="--", lw=0.8, label="uniform")
        axis.set_xticks(range(experts), [str(e) for e in range(experts)])
        axis.set_xlabel("expert, ranked by its seed's off-arm load (0 = most loaded)")
        axis.set_ylabel("share of held-out top-k slots")
        axis.set_title(f"{protocol} · {Path(model).name} · load per expert (mean over layers and seeds; "
                       "bar = min–max over seeds)", fontsize=9)
        axis.legend(fontsize=7, ncol=min(len(arms) + 1, 4))
        paths.append(_write(figure, plots_dir / f"load_{_group_slug(protocol, model)}.png"))
    return paths
