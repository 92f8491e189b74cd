"""The report: paired statistics, summary.md, ablation labels, heatmaps and trajectory plots."""

import json

import numpy as np
import pytest
from conftest import TINY_WORLD

from chronovisor.eval import metrics, stats
from chronovisor.eval.config import parse_config
from chronovisor.eval.pairing import load_run, summarize
from chronovisor.eval.report import write_report
from chronovisor.eval.rundir import RunDir
from chronovisor.eval.sweep import run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """2 seeds × (off, pt at two η, the reference's "P-only" η=0, pressure-only)."""
    config = parse_config({
        "name": "report-test",
        "protocol": "joint",
        "models": "mixtral-tiny",
        "seeds": 2,
        "data": dict(TINY_WORLD, num_train=4, num_heldout=3),
        "train": {"steps": 6, "lr": 0.01},
        "eval": {"null_permutations": 10, "trajectory_every": 1},
        "grid": [{"eta": [0.0, 0.01, 0.03], "mode": ["pt"]}, {"mode": ["pressure"]}],
    })
    out = tmp_path_factory.mktemp("run")
    outcome = run_sweep(config, out, progress=False)
    assert outcome.complete and len(outcome.ran) == 10
    return out


@pytest.fixture(scope="module")
def report(run_dir):
    """The report of the run and the text of its summary.md."""
    written = write_report(run_dir)
    return written, written.summary_path.read_text()


def test_report_writes_summary_md_into_the_run_directory_with_every_section(report, run_dir):
    written, text = report
    assert written.summary_path == run_dir / "summary.md"
    for heading in ("## Primary (pre-registered)", "## Noise floor", "## Baselines and loss floor",
                    "## Exploratory: controller settings (paired vs the off arm)", "## Separation", "## Slow field",
                    "## Ablation", "## Plots"):
        assert heading in text


def test_report_labels_the_reference_p_only_setting_and_the_off_baseline(report):
    _, text = report
    assert 'pt · reference "P-only": η=0' in text
    assert "off (baseline)" in text


def test_report_shows_no_eta_for_a_pressure_arm_where_eta_does_not_act(report):
    _, text = report
    assert "| pressure | – | 0.5 |" in text


def test_report_writes_the_delta_strip_plot_training_curves_heatmaps_and_trajectories_as_linked_pngs(report):
    written, text = report
    names = sorted(path.name for path in written.plots)
    assert names == ["deltas_joint_mixtral-tiny.png", "heatmap_joint_mixtral-tiny_pt.png",
                     "training_joint_mixtral-tiny_pressure.png", "training_joint_mixtral-tiny_pt-eta-0.01.png",
                     "training_joint_mixtral-tiny_pt-eta-0.03.png", "training_joint_mixtral-tiny_pt-eta-0.png",
                     "trajectory_joint_mixtral-tiny_pressure.png", "trajectory_joint_mixtral-tiny_pt.png"]
    for path in written.plots:
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert f"](plots/{path.name})" in text


def test_summary_md_holds_nothing_machine_specific(report, run_dir):
    _, text = report
    assert str(run_dir) not in text  # resumed and fresh runs report alike


def test_statistics_are_paired_per_seed(run_dir):
    run = load_run(run_dir)
    summaries = summarize(run)
    assert len(summaries) == 4 and all(summary.n == 2 for summary in summaries)
    for summary in summaries:
        delta_loss, delta_excess = [], []
        for seed in summary.seeds:
            assert seed.on.paired_off_cell == seed.off.cell_id
            assert seed.on.spec["seed"] == seed.off.spec["seed"] == seed.seed
            delta_loss.append(metrics.delta_loss_pct(seed.on.heldout.loss, seed.off.heldout.loss))
            delta_excess.append(seed.on.heldout.mean_over_layers.excess_separation
                                - seed.off.heldout.mean_over_layers.excess_separation)
            assert 0.0 <= seed.preservation <= 1.0
        expected = stats.robustness(delta_loss, delta_excess)
        assert (summary.robustness.successes, summary.robustness.n) == (expected.successes, expected.n)
        assert summary.loss_ci.mean == pytest.approx(np.mean(delta_loss))
    holm = stats.holm_correction([summary.wilcoxon.p_value for summary in summaries])
    np.testing.assert_allclose([summary.holm_p for summary in summaries], holm)


def test_report_of_an_incomplete_run_says_so(run_dir, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    manifest = json.loads(RunDir(partial).manifest_path.read_text())
    off = next(cell_id for cell_id in manifest["cells"] if "_s1_off_" in cell_id)
    RunDir(partial).cell_path(off).unlink()
    text = write_report(partial).summary_path.read_text()
    assert "**incomplete**: 1 missing" in text
    assert all(summary.n == 1 for summary in summarize(load_run(partial)))


def test_report_on_a_directory_without_a_run_exits_with_one_line_naming_the_missing_manifest(capsys, tmp_path):
    from chronovisor import cli

    assert cli.main(["report", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert message.startswith("chronovisor report: error: ") and message.count("\n") == 1
    assert "manifest.json is missing" in message


def test_pairs_run_under_different_numerics_are_flagged(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    path = next(path for path in RunDir(copy).cells_dir.glob("*_s0_off_*.json"))
    record = json.loads(path.read_text())
    assert record["numerics"]["device"] == "cpu"
    record["numerics"]["torch_threads"] += 1
    path.write_text(json.dumps(record))
    text = write_report(copy).summary_path.read_text()
    assert "4 on/off pair(s) ran under different numerics" in text
    assert "different numerics" not in write_report(run_dir).summary_path.read_text()
