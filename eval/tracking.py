"""Experiment tracking through accelerate's trackers (``--log-with tensorboard|trackio``), off by default.

    accelerator = tracking_accelerator("tensorboard", "runs/train", "chronovisor-train", {"lr": 0.05})
    train_controller(model, batches, config, accelerator=accelerator)    # logs every log_every steps
    accelerator.end_training()

TensorBoard writes event files under ``<project_dir>/<project>/``; trackio writes to its local
database (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``; view with ``trackio show``).
Under ``accelerate launch`` only the main process logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chronovisor.eval.record import CellRecord

#: The trackers ``--log-with`` accepts.
TRACKERS = ("tensorboard", "trackio")


def tracking_accelerator(log_with: str | None, project_dir: str | Path, project: str,
                         config: Mapping[str, Any] | None = None, **accelerator_kwargs: Any) -> Any:
    """An ``accelerate.Accelerator`` whose trackers are started (none when ``log_with`` is None).

    Args:
        log_with: one of :data:`TRACKERS`, or None for no tracking.
        project_dir: where file-based trackers (TensorBoard) write.
        project: the run's project name (TensorBoard subdirectory, trackio project).
        config: hyperparameters recorded with the run (only numbers, strings and booleans are kept).
        accelerator_kwargs: passed on to ``Accelerator`` (e.g. ``cpu=True``).
    """
    from accelerate import Accelerator

    if log_with is not None and log_with not in TRACKERS:
        raise ValueError(f"--log-with must be one of {', '.join(TRACKERS)} (got {log_with!r})")
    accelerator = Accelerator(log_with=log_with, project_dir=str(project_dir), **accelerator_kwargs)
    if log_with is not None:
        Path(project_dir).mkdir(parents=True, exist_ok=True)
        hyperparameters = {name: value for name, value in (config or {}).items()
                           if isinstance(value, (bool, int, float, str))}
        accelerator.init_trackers(project, config=hyperparameters)
    return accelerator


def log_cell(accelerator: Any, record: CellRecord, index: int) -> None:
    """Log one finished sweep cell: its held-out loss at step ``index`` (the cell's order in this
    process), and its training curve under the cell's own name.

    Args:
        accelerator: from :func:`tracking_accelerator`.
        record: the cell's :class:`~chronovisor.eval.record.CellRecord`.
        index: how many cells this process finished before this one.
    """
    accelerator.log({"heldout_loss": record.heldout.loss, f"heldout_loss/{record.cell_id}": record.heldout.loss},
                    step=index)
    if record.train is not None:
        for position, loss in enumerate(record.train.curve):
            accelerator.log({f"train_loss/{record.cell_id}": loss}, step=position * record.train.curve_every)
