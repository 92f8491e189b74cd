"""The controller's fields as a cell reports them: a trajectory every few ticks and the final summary.

Both read a *field view*: a single :class:`~chronovisor.controllers.PTController`, or one group of a
stacked controller through :class:`GroupFields` (fields ``[L, E]`` either way).
"""

from __future__ import annotations

import numpy as np
import torch

from chronovisor.eval import metrics
from chronovisor.eval.record import FieldSummary


class GroupFields:
    """One group's fields of a stacked controller (fields ``[C, L, E]``), read like a single one.

    Args:
        controller: the stacked :class:`~chronovisor.controllers.PTController`.
        group: the group index c.
    """

    def __init__(self, controller, group: int):
        self._controller, self._group = controller, group

    @property
    def ticks(self) -> int:
        return self._controller.ticks

    @property
    def T_bar_global(self) -> torch.Tensor:
        return self._controller.T_bar_global[self._group]

    @property
    def T_bar_local(self) -> torch.Tensor:
        return self._controller.T_bar_local[self._group]

    @property
    def pressure(self) -> torch.Tensor:
        return self._controller.pressure[self._group]

    @property
    def temperature(self) -> torch.Tensor:
        return self._controller.temperature[self._group]


def field_views(controller, groups: int) -> list:
    """One field view per group: the controller itself for one group, else :class:`GroupFields`."""
    return [GroupFields(controller, g) for g in range(groups)] if groups > 1 else [controller]


class FieldTrajectory:
    """Small summaries of the controller's fields every ``every`` ticks (column -> values)."""

    def __init__(self, every: int):
        self.every = every
        self.rows: dict[str, list[float]] = {key: [] for key in (
            "tick", "T_bar_global_mean", "T_bar_global_var", "T_bar_local_var", "pressure_mean_abs", "T_eff_mean")}

    def maybe_record(self, view) -> None:
        """Add a row if the view's tick count is a multiple of ``every``."""
        if view.ticks % self.every:
            return
        T_global, T_local = view.T_bar_global, view.T_bar_local
        values = {
            "tick": view.ticks,
            "T_bar_global_mean": float(T_global.mean()),
            "T_bar_global_var": float(metrics.expert_variance(T_global)),
            "T_bar_local_var": float(np.mean(metrics.expert_variance(T_local))),
            "pressure_mean_abs": float(view.pressure.abs().mean()),
            "T_eff_mean": float(view.temperature.mean()),
        }
        for key, value in values.items():
            self.rows[key].append(value)


def summarize_fields(view, trajectory: FieldTrajectory, offsets: dict[str, float] | None = None) -> FieldSummary:
    """The final fields of an on arm.

    Args:
        view: the controller, or one group's :class:`GroupFields`.
        trajectory: the arm's trajectory.
        offsets: ``controller_only``: mean |offset| per learnable parameter.
    """
    return FieldSummary(
        T_bar_variance=metrics.expert_variance(view.T_bar_global),
        T_bar_local_variance=float(np.mean(metrics.expert_variance(view.T_bar_local))),
        pressure_mean_abs=float(view.pressure.abs().mean()),
        ticks=view.ticks,
        trajectory=trajectory.rows,
        offsets=offsets,
    )
