"""The report: paired statistics, summary.md, ablation labels, heatmaps, trajectory and routing plots, CSV tables."""

import csv
import json

import numpy as np
import pytest
from conftest import TINY_WORLD

from chronovisor.eval import metrics, stats
from chronovisor.eval.config import parse_config
from chronovisor.eval.pairing import load_run, summarize
from chronovisor.eval.report import write_report
from chronovisor.eval.routing_maps import arm_routing, cell_routing, heldout_turns, run_routing
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


def test_report_writes_the_delta_strip_plot_training_curves_routing_maps_heatmaps_and_trajectories_as_linked_pngs(report):
    written, text = report
    names = sorted(path.name for path in written.plots)
    assert names == ["deltas_joint_mixtral-tiny.png", "heatmap_joint_mixtral-tiny_pt.png",
                     "load_joint_mixtral-tiny.png", "routing_joint_mixtral-tiny.png",
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


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of ``text``: its rows of cells, the separator row left out."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_every_table_of_summary_md_is_written_as_a_linked_csv_with_the_same_cells(report, run_dir):
    written, text = report
    tables = markdown_tables(text)
    assert len(written.tables) == len(tables)
    assert sorted(path.name for path in written.tables) == [
        "ablation_joint_mixtral-tiny.csv", "baselines.csv", "exploratory_contrasts.csv",
        "separation_joint_mixtral-tiny.csv", "settings.csv", "slow_field.csv"]
    for path, rows in zip(written.tables, tables, strict=True):
        assert path.parent == run_dir / "tables"
        assert f"CSV: [tables/{path.name}](tables/{path.name})" in text
        with open(path, newline="", encoding="utf-8") as handle:
            cells = list(csv.reader(handle))
        assert cells == [[cell.replace("**", "").replace("`", "") for cell in row] for row in rows]


def test_rebuilt_held_out_turns_label_the_routing_file_exactly_as_the_sweep_did(run_dir):
    """U(turn | expert) recomputed from the routing file and the rebuilt turns equals the record's own."""
    run = load_run(run_dir)
    for cell_id, record in run.records.items():
        turns = heldout_turns(record)
        for layer in record.heldout.layers:
            experts = run.run_dir.read_routing(cell_id)[layer.layer]
            assert len(experts) == len(turns)
            assert metrics.uncertainty_coefficient(experts, turns, record.model_info.num_experts) == pytest.approx(
                layer.uncertainty_coefficient, abs=1e-12)


def test_routing_maps_are_shares_of_slots_per_turn_and_per_layer_matching_the_records_load(run_dir):
    run = load_run(run_dir)
    cells = run_routing(run)
    for cell_id, record in run.records.items():
        cell = cells[cell_id]
        np.testing.assert_allclose(cell.load, [layer.load for layer in record.heldout.layers], atol=1e-12)
        np.testing.assert_allclose(cell.load.sum(axis=1), 1.0)
        assert cell.by_turn.shape == (7, record.model_info.num_experts) and cell.reason == ""
        np.testing.assert_allclose(cell.by_turn.sum(axis=1), 1.0)
    groups = arm_routing(summarize(run), cells)
    arms = groups[("joint", "mixtral-tiny")]
    assert [arm.label for arm in arms] == ["off", "pressure", "pt η=0", "pt η=0.01", "pt η=0.03"]
    assert all(arm.expert_load.shape == (2, 8) and arm.by_turn.shape == (7, 8) for arm in arms)
    offs = sorted((r for r in run.records.values() if not r.is_on), key=lambda r: r.seed)
    # Each seed's experts ranked by its off-arm load, largest first: the off arm's rows are its loads sorted.
    np.testing.assert_allclose(arms[0].expert_load, [-np.sort(-cells[r.cell_id].load.mean(axis=0)) for r in offs])
    np.testing.assert_allclose(np.sort(arms[1].expert_load, axis=1),  # arms[1] is the first setting
                               [np.sort(cells[s.on.cell_id].load.mean(axis=0)) for s in summarize(run)[0].seeds])
    assert arms[0].turns[0] == "Inquiry"


def test_an_arm_whose_turns_do_not_match_its_routing_file_has_no_turn_map_and_says_why(run_dir):
    run = load_run(run_dir)
    cell_id, record = next(iter(run.records.items()))
    turns = heldout_turns(record)
    cell = cell_routing(run.run_dir.read_routing(cell_id), turns[:-1], record.model_info.num_experts)
    assert cell.by_turn is None
    assert cell.reason == f"the rebuilt held-out data has {len(turns) - 1} tokens, the routing file {len(turns)}"
