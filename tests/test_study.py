"""The frozen real-text study on the tiny checkpoint: one cell of each arm, pairing, resume and the report."""

import dataclasses
import math

import pytest

from chronovisor.eval.errors import ConfigError, RunDirError
from chronovisor.eval.study import read_cells, run_study
from chronovisor.eval.study_config import STUDY_ARMS, StudyConfig, load_study_config
from chronovisor.eval.study_report import render_report


@pytest.fixture(scope="module")
def tiny_study(tiny_realtext_run, tmp_path_factory):
    """Two seeds of every arm adapting on the prose stream for 2 steps of 2 blocks: (config, out, cells)."""
    run_dir, _ = tiny_realtext_run
    config = StudyConfig(base=str(run_dir), seeds=[0, 1], threads=1, adapt=["prose"], steps=2, batch_size=2,
                         eval_blocks=3, eval_batch_size=3)
    out = tmp_path_factory.mktemp("study")
    return config, out, run_study(config, out, progress=False)


def test_one_cell_of_each_arm_runs_on_the_tiny_checkpoint_with_its_trainable_parameter_count(tiny_study):
    _, _, cells = tiny_study
    by_arm = {cell.arm: cell for cell in cells if cell.seed == 0}
    assert set(by_arm) == set(STUDY_ARMS)
    layers, experts, hidden, rank = 2, 4, 32, 4
    assert by_arm["off"].trainable_parameters == by_arm["placebo"].trainable_parameters == 0
    assert by_arm["pt"].trainable_parameters == 0
    assert by_arm["controller_only"].trainable_parameters == 2 * layers * experts  # δb and δlogT
    assert by_arm["router_only"].trainable_parameters == layers * experts * hidden
    assert by_arm["lora"].trainable_parameters == layers * 4 * rank * (hidden + hidden)
    for cell in cells:
        assert set(cell.heldout_loss) == {"prose", "code"}
        assert all(math.isfinite(loss) for loss in cell.heldout_loss.values())
        assert len(cell.mutual_information) == layers
        assert all(0 <= value <= 1 for value in cell.mutual_information)


def test_frozen_base_arms_leave_every_base_tensor_unchanged_and_trained_arms_change_theirs(tiny_study):
    _, _, cells = tiny_study
    for cell in cells:
        if cell.arm in ("off", "placebo", "pt", "controller_only"):
            assert cell.base_params_changed == 0
    assert all(cell.base_params_changed > 0 for cell in cells if cell.arm in ("router_only", "lora"))


def test_every_arm_of_a_seed_is_paired_with_the_off_arm_on_the_same_held_out_blocks(tiny_study):
    _, _, cells = tiny_study
    off = {cell.seed: cell for cell in cells if cell.arm == "off"}
    for cell in cells:
        if cell.arm == "placebo":
            # the placebo controller barely moves the routing: its loss sits next to off's, blocks unchanged
            assert cell.heldout_loss["prose"] == pytest.approx(off[cell.seed].heldout_loss["prose"], rel=0.05)


def test_rerunning_the_study_skips_finished_cells_and_returns_the_same_records(tiny_study):
    config, out, cells = tiny_study
    stamps = {path: path.stat().st_mtime_ns for path in (out / "cells").glob("*.json")}
    again = run_study(config, out, progress=False)
    assert again == cells
    assert {path: path.stat().st_mtime_ns for path in (out / "cells").glob("*.json")} == stamps
    assert len(read_cells(out)) == len(cells)


def test_the_report_lists_every_arm_with_a_paired_interval_and_the_placebo_noise_floor(tiny_study):
    _, out, _ = tiny_study
    text = render_report(out)
    assert "Noise floor (placebo)" in text
    for arm in STUDY_ARMS:
        assert f"| shift | prose → prose | {arm} |" in text
        assert f"| other domain | prose → code | {arm} |" in text
    assert "| lora | 2,048 | " in text  # the summary table: one line per arm with its trainable parameters
    assert "Expert ↔ domain mutual information" in text
    assert (out / "report.md").read_text() == text


def test_a_study_config_with_an_unknown_arm_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text('base: runs/x\narms: ["off", adapters]\n')
    with pytest.raises(ConfigError, match=r"study\.yaml: study: arms must include off"):
        load_study_config(path)


def test_a_bare_off_arm_is_read_as_the_off_arm_not_as_false(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("base: runs/x\narms: [off, pt]\n")
    assert load_study_config(path).arms == ["off", "pt"]


def test_rerunning_a_study_directory_with_another_budget_is_refused_with_the_fix(tiny_study):
    config, out, _ = tiny_study
    with pytest.raises(RunDirError, match="use another --out"):
        run_study(dataclasses.replace(config, steps=config.steps + 1), out, progress=False)
