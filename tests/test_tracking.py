"""``--log-with tensorboard|trackio`` on ``chronovisor train`` and ``chronovisor sweep`` (accelerate's trackers)."""

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_sweep import tiny_config

from chronovisor.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = ["train", "mixtral-tiny", "--steps", "4", "--conversations", "4", "--max-length", "24", "--batch-size", "2",
         "--log-every", "1"]


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard recorded under ``log_dir``: tag -> [(step, value)]."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_train_logs_each_entry_of_its_log_to_tensorboard(tmp_path):
    out = tmp_path / "controller"
    assert main([*TRAIN, "--out", str(out), "--log-with", "tensorboard"]) == 0
    scalars = _scalars(out / "logs" / "chronovisor-train")
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert {"max_abs_pressure_offset", "log_temperature_offset_std"} <= set(scalars)


def test_train_without_log_with_writes_no_tracker_files(tmp_path):
    out = tmp_path / "controller"
    assert main([*TRAIN, "--out", str(out)]) == 0
    assert not (out / "logs").exists()


def test_train_logs_to_trackio_in_its_local_database(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    assert main([*TRAIN, "--out", str(tmp_path / "controller"), "--log-with", "trackio"]) == 0
    from trackio.sqlite_storage import SQLiteStorage

    (run,) = SQLiteStorage.get_runs("chronovisor-train")
    logs = SQLiteStorage.get_logs("chronovisor-train", run)
    assert [entry["step"] for entry in logs if "loss" in entry] == [1, 2, 3, 4]


def test_sweep_logs_every_finished_cell_and_its_training_curve_to_tensorboard(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(seeds=1, grid={"eta": [0.01], "pressure_scale": [1.0]})))
    run_dir = tmp_path / "run"
    assert main(["sweep", str(config), "--out", str(run_dir), "--no-progress", "--log-with", "tensorboard"]) == 0
    scalars = _scalars(run_dir / "logs" / "chronovisor-sweep-tiny")
    cells = sorted(path.stem for path in (run_dir / "cells").glob("*.json"))
    assert len(scalars["heldout_loss"]) == len(cells) == 2
    assert {f"heldout_loss/{cell}" for cell in cells} | {f"train_loss/{cell}" for cell in cells} <= set(scalars)


def test_an_unknown_tracker_is_rejected_by_the_argument_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*TRAIN, "--out", str(tmp_path / "c"), "--log-with", "wandb"])
    assert "invalid choice: 'wandb'" in capsys.readouterr().err
