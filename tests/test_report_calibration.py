"""The calibrated report (docs/calibration.md): noise floor, pre-registered contrasts and Holm, exploratory
labels, baselines, separation on fixed-order data, the dirty mark, the slow field and the new plots.

Each run directory is built from hand-made CellRecords with chosen per-seed Δloss %, so every number the
report shows can be checked against an independent computation.
"""

import math

import numpy as np
import pytest
import torch
from conftest import TINY_WORLD
from scipy import stats as scipy_stats

from chronovisor.eval import contrasts, stats
from chronovisor.eval.baselines import LossFloor, NgramBaselines
from chronovisor.eval.config import parse_config
from chronovisor.eval.pairing import load_run, summarize
from chronovisor.eval.record import (
    ArmResult,
    CellRecord,
    FieldSummary,
    HeldoutMetrics,
    LayerMeans,
    LayerMetrics,
    ModelSummary,
    Pairing,
    TrainSummary,
)
from chronovisor.eval.report import write_report
from chronovisor.eval.rundir import RunDir, write_json
from chronovisor.eval.sections import FIXED_ORDER, NO_PLACEBO
from chronovisor.eval.specs import Contrast

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NOISE = [0.10, -0.12, 0.05, -0.03, -0.01]  # placebo deltas with t-test p far above 0.05
BIASED = [0.10, 0.11, 0.12, 0.10, 0.11]  # placebo deltas with t-test p far below 0.05
DELTAS = {"placebo": NOISE, "pressure": [0.3, -0.2, 0.1, 0.4, 0.0], "temperature": [-0.2, -0.1, 0.1, -0.3, -0.2],
          "pt": [-0.5, -0.3, -0.6, -0.1, -0.4]}


def off_loss(seed: int) -> float:
    return 3.0 + 0.01 * seed


def make_record(cell, loss: float, *, bigram: float, fixed_order: bool, ticks: int, separation_p: float) -> CellRecord:
    means = dict(separation=0.01, null_mean=0.005, excess_separation=0.005, uncertainty_coefficient=0.1,
                 max_vio=1.0, load_cv=0.1, load_entropy=2.0, dead_fraction=0.0)
    layer = LayerMetrics(layer="layer0", null_std=0.001, excess_z=5.0, separation_p=separation_p,
                         load=[0.25] * 4, **means)
    heldout = HeldoutMetrics(loss=loss, tokens=100, per_conversation_loss=[loss], streaming=False,
                             routing_layers=["layer0"], phase_order_fixed=fixed_order, layers=[layer],
                             mean_over_layers=LayerMeans(**means))
    fields = None if cell.is_off else FieldSummary(0.0, 0.0, 0.1, ticks, {"tick": []})
    return CellRecord.build(
        cell, pairing=Pairing("init", "data"), model_info=ModelSummary("mixtral", 1, 4, 2), heldout=heldout,
        loss_floor=LossFloor(oracle=1.5, bayes=2.0, oracle_nll=1.5, bayes_nll=2.0, uniform=math.log(64),
                             num_tokens=100),
        baselines=NgramBaselines(unigram=4.0, bigram=bigram, train_tokens=1000),
        train=TrainSummary(note="in-sample", steps=4, final_loss=loss, curve_every=2, curve=[4.2, 3.6, 3.3, loss]),
        fields=fields, base_params_changed=None, device=torch.device("cpu"), wall_time_s=1.0)


def make_run(path, deltas=None, *, primary=("pt - off",), bigram=2.5, bigram_by_seed=None, fixed_order=False,
             dirty=False, ticks=300, drop=(), separation_p=None):
    """A finished joint run of 5 seeds whose on arms have exactly the given per-seed Δloss % (arm -> list);
    ``drop``: (arm, seed) cells left out; ``separation_p``: arm -> the p of its separation test."""
    deltas = DELTAS if deltas is None else deltas
    config = parse_config({"name": "calibration", "protocol": "joint", "models": "mixtral-tiny", "seeds": 5,
                           "primary": list(primary), "data": dict(TINY_WORLD, num_train=4, num_heldout=3),
                           "train": {"steps": 4}, "grid": [{"mode": list(deltas)}]})
    cells = config.cells()
    run_dir = RunDir(path)
    run_dir.start(name=config.name, resolved=config.resolved, config_hash=config.config_hash,
                  cell_ids=[cell.cell_id for cell in cells], command=["test"], num_processes=1, stack_size=1)
    for cell in cells:
        if (cell.arm, cell.seed) in drop:
            continue
        base = off_loss(cell.seed)
        loss = base if cell.is_off else base * (1 + deltas[cell.arm][cell.seed] / 100)
        record = make_record(cell, loss, bigram=(bigram_by_seed or {}).get(cell.seed, bigram),
                             fixed_order=fixed_order, ticks=ticks,
                             separation_p=(separation_p or {}).get(cell.arm, 0.5))
        run_dir.save_cell(ArmResult(record, {"layer0": np.zeros((8, 2), dtype=np.int64)}))
    manifest = run_dir.read_manifest()
    manifest["git"] = {"commit": "0123456789abcdef" * 2 + "01234567", "dirty": dirty}
    write_json(run_dir.manifest_path, manifest)
    return path


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default run (placebo noise, pt - off declared, clean tree, 300 ticks) and its written report."""
    path = make_run(tmp_path_factory.mktemp("default"))
    written = write_report(path)
    return path, written, written.summary_path.read_text()


def report_text(path, **kwargs) -> str:
    return write_report(make_run(path, **kwargs)).summary_path.read_text()


def section(text: str, heading: str) -> str:
    """The body of one ``## heading`` section of summary.md."""
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def summaries_of(path):
    return summarize(load_run(path))


# ------------------------------------------------------------------------------- noise floor
def test_noise_floor_sd_is_the_sample_sd_of_the_placebo_arms_per_seed_delta_loss(default_run):
    floor = contrasts.noise_floors(summaries_of(default_run[0]))[("joint", "mixtral-tiny")]
    assert floor.n == 5
    assert floor.sd == pytest.approx(np.std(NOISE, ddof=1), rel=1e-6)


def test_minimum_detectable_effect_solves_the_noncentral_t_power_at_80_percent_for_the_runs_n(default_run):
    floor = contrasts.noise_floors(summaries_of(default_run[0]))[("joint", "mixtral-tiny")]
    sd, n = np.std(NOISE, ddof=1), 5
    critical = scipy_stats.t.ppf(0.975, n - 1)

    def power(effect):
        shift = effect * math.sqrt(n) / sd
        return scipy_stats.nct.sf(critical, n - 1, shift) + scipy_stats.nct.cdf(-critical, n - 1, shift)

    assert power(floor.mde) == pytest.approx(0.8, abs=1e-6)
    assert power(0.99 * floor.mde) < 0.8 < power(1.01 * floor.mde)


def test_summary_shows_the_noise_floor_sd_and_mde_of_the_placebo_arm(default_run):
    text = default_run[2]
    sd = np.std(NOISE, ddof=1)
    mde = stats.minimum_detectable_effect(sd, 5)
    assert f"| joint | mixtral-tiny | 5 | {sd:.3f} | {mde:.3f} |" in section(text, "Noise floor")


def test_miscalibrated_flag_appears_when_the_placebo_deltas_are_significant(tmp_path):
    text = report_text(tmp_path, deltas={**DELTAS, "placebo": BIASED})
    assert scipy_stats.ttest_1samp(BIASED, 0.0).pvalue < 0.05
    header = text[:text.index("## ")]
    assert "> **MISCALIBRATED** (joint, mixtral-tiny)" in header
    assert "**MISCALIBRATED** |" in section(text, "Noise floor")


def test_no_miscalibrated_flag_when_the_placebo_deltas_are_not_significant(default_run):
    text = default_run[2]
    assert scipy_stats.ttest_1samp(NOISE, 0.0).pvalue > 0.05
    assert "> **MISCALIBRATED**" not in text
    assert "| ok |" in section(text, "Noise floor")


def test_a_run_without_a_placebo_arm_says_its_noise_floor_is_unknown(tmp_path):
    text = report_text(tmp_path, deltas={arm: DELTAS[arm] for arm in ("pressure", "pt")})
    assert NO_PLACEBO == "no placebo arm: noise floor unknown"
    assert f"joint, mixtral-tiny: **{NO_PLACEBO}**" in section(text, "Noise floor")
    assert "> **MISCALIBRATED**" not in text


# ------------------------------------------------------------------------------- contrasts
def test_the_primary_section_comes_before_every_other_section(default_run):
    text = default_run[2]
    assert text.index("## ") == text.index("## Primary (pre-registered)")


def test_holm_is_applied_across_exactly_the_declared_family_on_the_t_test_p_values(tmp_path):
    path = make_run(tmp_path, primary=("pt - off", "pt - pressure"))
    results = contrasts.primary_contrasts(contrasts.declared_contrasts(load_run(path)), summaries_of(path))
    assert [result.contrast.name for result in results] == ["pt - off", "pt - pressure"]
    p_off = scipy_stats.ttest_1samp(DELTAS["pt"], 0.0).pvalue
    p_pressure = scipy_stats.ttest_rel(DELTAS["pt"], DELTAS["pressure"]).pvalue
    assert [result.p_value for result in results] == pytest.approx([p_off, p_pressure], rel=1e-5)
    smaller, larger = sorted([p_off, p_pressure])
    expected = {min(p_off, p_pressure): 2 * smaller, max(p_off, p_pressure): max(2 * smaller, larger)}
    assert [result.holm_p for result in results] == pytest.approx([expected[p_off], expected[p_pressure]], rel=1e-5)


def test_a_single_declared_contrast_is_not_corrected_for_the_exploratory_ones(default_run):
    path = default_run[0]
    [result] = contrasts.primary_contrasts(contrasts.declared_contrasts(load_run(path)), summaries_of(path))
    assert result.holm_p == pytest.approx(result.p_value)
    text = default_run[2]
    assert "family (1 test(s)" in section(text, "Primary (pre-registered)")
    assert "adjusts the **paired t-test's** p" in text


def test_a_minus_b_contrast_uses_only_the_seeds_where_both_arms_exist(tmp_path):
    path = make_run(tmp_path, primary=("pt - pressure",), drop={("pressure", 3)})
    [result] = contrasts.primary_contrasts(contrasts.declared_contrasts(load_run(path)), summaries_of(path))
    assert list(result.values) == [0, 1, 2, 4]
    expected = [DELTAS["pt"][seed] - DELTAS["pressure"][seed] for seed in (0, 1, 2, 4)]
    assert list(result.values.values()) == pytest.approx(expected, abs=1e-9)
    assert result.result.interval.mean == pytest.approx(np.mean(expected), abs=1e-9)


def test_an_off_minus_arm_contrast_is_the_negated_delta_loss(default_run):
    path = default_run[0]
    [result] = contrasts.primary_contrasts((Contrast("off", "pt"),), summaries_of(path))
    assert list(result.values.values()) == pytest.approx([-d for d in DELTAS["pt"]], abs=1e-9)


def test_undeclared_direct_contrasts_are_listed_as_exploratory_with_uncorrected_p(default_run):
    text = default_run[2]
    exploratory = section(text, "Exploratory: direct contrasts")
    assert "**Exploratory**" in exploratory and "uncorrected" in exploratory
    for name in ("pt - pressure", "pt - temperature", "pt - placebo"):
        assert f"| `{name}` |" in exploratory
        assert f"`{name}`" not in section(text, "Primary (pre-registered)")
    assert "Holm" not in exploratory


def test_a_declared_direct_contrast_is_not_repeated_as_exploratory(tmp_path):
    text = report_text(tmp_path, primary=("pt - off", "pt - pressure"))
    assert "| `pt - pressure` |" in section(text, "Primary (pre-registered)")
    assert "`pt - pressure`" not in section(text, "Exploratory: direct contrasts")


def test_the_per_arm_table_is_labelled_exploratory(default_run):
    text = default_run[2]
    table = section(text, "Exploratory: controller settings (paired vs the off arm)")
    assert "**Exploratory** (uncorrected p-values" in table
    assert "Holm" not in table


def test_a_run_without_primary_contrasts_says_every_comparison_is_exploratory(tmp_path):
    text = report_text(tmp_path, primary=())
    assert "No primary contrast was declared" in section(text, "Primary (pre-registered)")


# ------------------------------------------------------------------------------- baselines
def test_bigram_flag_counts_the_seeds_where_the_off_arm_does_not_beat_the_count_bigram(tmp_path):
    text = report_text(tmp_path, bigram=3.5, bigram_by_seed={0: 2.9, 1: 2.9})
    assert "off arm does not beat the count bigram (2/5 seeds)" in section(text, "Baselines and loss floor")


def test_no_bigram_flag_when_the_off_arm_beats_the_count_bigram_on_every_seed(tmp_path):
    text = report_text(tmp_path, bigram=3.5)
    assert "does not beat the count bigram" not in text
    assert "| joint | mixtral-tiny | 5 | 3.0200 | 3.5000 | 4.0000 | 2.0000 | 4.1589 |" in text


# ------------------------------------------------------------------------------- separation
def test_fixed_phase_order_data_states_that_separation_cannot_be_told_from_position(tmp_path):
    text = report_text(tmp_path, fixed_order=True)
    assert FIXED_ORDER == "phase order is fixed in this data: separation cannot be told apart from position"
    assert FIXED_ORDER[1:] in section(text, "Separation")


def test_random_phase_order_data_has_no_fixed_order_sentence(default_run):
    assert FIXED_ORDER[1:] not in default_run[2]


def test_separation_table_shows_each_arms_mean_permutation_p(tmp_path):
    text = report_text(tmp_path, separation_p={"pt": 0.01, "off": 0.7})
    table = section(text, "Separation")
    assert "| pt | 5 | +5.00e-03 | 0.010 | 1.000 |" in table
    assert "| off | 5 | +5.00e-03 | 0.700 | 0 |" in table


# ------------------------------------------------------------------------------- provenance
def test_a_dirty_tree_is_marked_at_the_top_of_the_report(tmp_path):
    text = report_text(tmp_path, dirty=True)
    assert text.split("\n")[2].startswith("> **DIRTY TREE**")
    assert "`0123456789ab` **(DIRTY TREE)**" in text


def test_a_clean_tree_has_no_dirty_mark(default_run):
    assert "DIRTY" not in default_run[2]


# ------------------------------------------------------------------------------- slow field
def test_slow_field_fraction_is_one_minus_exp_of_ticks_over_tau(default_run):
    text = default_run[2]
    local, global_ = 1 - math.exp(-300 / (5 / 0.015)), 1 - math.exp(-300 / (2 * 5 / 0.015))
    assert (local, global_) == pytest.approx((0.593, 0.362), abs=1e-3)
    table = section(text, "Slow field")
    assert f"| joint | mixtral-tiny | pt | 0.015 | 5 | 300 | 333.333 | {local:.3f} | 666.667 | {global_:.3f} |" in table


def test_slow_field_lists_only_arms_that_deliver_temperature(default_run):
    table = section(default_run[2], "Slow field")
    assert "| temperature |" in table and "| pt |" in table
    assert "| pressure |" not in table and "| placebo |" not in table


# ------------------------------------------------------------------------------- plots
def test_report_writes_the_delta_strip_plot_routing_maps_and_one_training_curve_per_arm(default_run):
    _, written, text = default_run
    names = sorted(path.name for path in written.plots)
    assert names == ["deltas_joint_mixtral-tiny.png", "load_joint_mixtral-tiny.png", "routing_joint_mixtral-tiny.png"] + [
        f"training_joint_mixtral-tiny_{arm}.png" for arm in ("placebo", "pressure", "pt", "temperature")]
    for path in written.plots:
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert f"](plots/{path.name})" in text
