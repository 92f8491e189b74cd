"""Specification of the arms a study compares: the placebo, arm names, and the contrasts a config declares."""

import pytest
from conftest import TINY_WORLD

from chronovisor.controllers import PTConfig
from chronovisor.eval.config import parse_config
from chronovisor.eval.errors import ConfigError
from chronovisor.eval.specs import (
    PLACEBO,
    PLACEBO_PRESSURE,
    VARIANTS,
    Contrast,
    arm_name,
    variant_config,
    variant_label,
)


def study(**changes):
    config = {
        "name": "study",
        "protocol": "joint",
        "models": ["mixtral-tiny"],
        "seeds": 2,
        "data": dict(TINY_WORLD, num_train=4, num_heldout=3),
        "train": {"steps": 2},
        "grid": [{"mode": ["placebo", "pressure", "pt"]}, {"mode": ["pt"], "dynamics": ["delayed"]}],
    }
    config.update(changes)
    return config


# ----------------------------------------------------------------------------------------- placebo
def test_the_placebo_arm_is_a_pressure_controller_at_rounding_scale():
    config = variant_config(PLACEBO, eta=0.015, pressure_scale=0.5)
    assert (config.mode, config.pressure_scale, config.eta) == ("pressure", PLACEBO_PRESSURE, 0.015)


def test_the_placebo_pressure_is_about_one_float32_rounding_unit_of_a_unit_logit():
    import torch

    assert PLACEBO_PRESSURE == pytest.approx(torch.finfo(torch.float32).eps, rel=0.2)


def test_a_pressure_controller_at_the_placebo_scale_is_labelled_placebo():
    assert variant_label(PTConfig(mode="pressure", pressure_scale=PLACEBO_PRESSURE)) == PLACEBO


def test_a_pressure_controller_at_any_other_scale_is_labelled_pressure():
    assert variant_label(PTConfig(mode="pressure", pressure_scale=2 * PLACEBO_PRESSURE)) == "pressure"


def test_placebo_comes_right_after_off_in_the_report_order():
    assert VARIANTS[:2] == ("off", PLACEBO)


def test_the_placebo_cell_id_names_the_arm():
    cells = parse_config(study()).cells()
    assert any("_placebo_" in cell.cell_id for cell in cells)


# --------------------------------------------------------------------------------------- arm names
def test_the_off_arm_is_named_off():
    assert arm_name(None) == "off"


def test_a_reference_dynamics_arm_is_named_by_its_variant():
    assert arm_name(PTConfig(mode="temperature")) == "temperature"


def test_a_dynamics_preset_is_appended_to_the_arm_name():
    assert arm_name(PTConfig(mode="pt", dynamics="delayed")) == "pt+delayed"


def test_the_loss_free_comparator_is_named_loss_free_without_a_suffix():
    assert arm_name(variant_config("loss_free")) == "loss_free"


def test_every_cell_of_a_study_knows_its_arm_name():
    arms = [cell.arm for cell in parse_config(study()).cells() if cell.seed == 0]
    assert arms == ["off", "placebo", "pressure", "pt", "pt+delayed"]


# ---------------------------------------------------------------------------------------- contrasts
def test_a_contrast_is_parsed_from_arm_minus_arm():
    assert Contrast.parse("pt - off") == Contrast("pt", "off")


def test_a_contrast_prints_as_it_is_written():
    assert Contrast("pt+delayed", "pressure").name == "pt+delayed - pressure"


@pytest.mark.parametrize("text", ["pt-off", "pt - ", "pt - pt", 3, "a - b - c"])
def test_a_malformed_contrast_says_the_expected_form(text):
    with pytest.raises(ValueError, match="expected '<arm> - <other arm>'"):
        Contrast.parse(text)


def test_a_config_declares_its_primary_contrasts():
    config = parse_config(study(primary=["pt - off", "pt - pressure"]))
    assert config.primary == (Contrast("pt", "off"), Contrast("pt", "pressure"))


def test_the_primary_declaration_is_part_of_the_resolved_config_and_its_hash():
    declared = parse_config(study(primary=["pt - off"]))
    undeclared = parse_config(study())
    assert declared.resolved["primary"] == ["pt - off"]
    assert declared.config_hash != undeclared.config_hash


def test_a_config_without_primary_keeps_its_hash_free_of_the_key():
    assert "primary" not in parse_config(study()).resolved


def test_a_primary_contrast_naming_an_arm_outside_the_grid_fails_naming_the_arms():
    with pytest.raises(ConfigError, match=r"primary\[0\]: 'temperature' is not an arm of the grid; arms: off, placebo"):
        parse_config(study(primary=["temperature - off"]))


def test_a_primary_contrast_naming_several_grid_settings_fails():
    grid = {"mode": ["pt"], "eta": [0.01, 0.02]}
    with pytest.raises(ConfigError, match=r"primary\[0\]: 'pt' names 2 settings"):
        parse_config(study(grid=grid, primary=["pt - off"]))


def test_a_primary_contrast_declared_twice_fails():
    with pytest.raises(ConfigError, match="declared twice"):
        parse_config(study(primary=["pt - off", "pt - off"]))


def test_primary_must_be_a_list():
    with pytest.raises(ConfigError, match="primary: expected a list"):
        parse_config(study(primary="pt - off"))


# ------------------------------------------------------------------------------------ data lengths
def test_max_length_bounds_the_synthetic_conversations():
    config = parse_config(study(data=dict(TINY_WORLD, num_train=4, num_heldout=3, max_length=60)))
    assert config.data.generator["max_length"] == 60
    assert config.data.conversation_config.max_length == 60


def test_max_length_truncates_jsonl_conversations(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"turns": ["a"]}\n')
    config = parse_config(study(data={"source": "jsonl", "path": str(path), "max_length": 64}, grid={"mode": ["pt"]}))
    assert config.data.max_length == 64 and "max_length" not in config.data.generator
