"""Switch Transformers in the eval protocols (decoder routers only) and the aux_loss baseline arm."""

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import TINY_WORLD

import chronovisor
from chronovisor.controllers import PTConfig
from chronovisor.eval import synthetic
from chronovisor.eval.config import load_config, parse_config
from chronovisor.eval.errors import ConfigError
from chronovisor.eval.inputs import model_inputs
from chronovisor.eval.protocols import run_cell
from chronovisor.eval.router_losses import aux_loss_objective, switch_decoder_losses
from chronovisor.eval.specs import (
    AUX_LOSS,
    VARIANTS,
    CellSpec,
    Contrast,
    DataSpec,
    EvalSpec,
    TrainSpec,
    arm_name,
    variant_arm,
    variant_config,
)
from chronovisor.eval.stacked import run_cells_stacked
from chronovisor.eval.train_loop import ce_objective
from chronovisor.wrappers import build_toy

DATA = DataSpec(num_train=4, num_heldout=3, generator=TINY_WORLD)
TRAIN = TrainSpec(steps=3, lr=1e-2)
EVAL = EvalSpec(null_permutations=10, trajectory_every=1)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def joint(model="switch-tiny", mode="pt", seed=0):
    config, objective = variant_arm(mode, seed=seed, learnable=False)
    return CellSpec("joint", model, seed, config, DATA, TRAIN, EVAL, objective=objective)


def spied_run(cell, run_dir):
    """Run ``cell`` and return (its ArmResult, the ChronovisorModel the protocol wrapped)."""
    wrapped = []
    original = chronovisor.wrap

    def spy(*args, **kwargs):
        wrapped.append(original(*args, **kwargs))
        return wrapped[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chronovisor, "wrap", spy)
        result = run_cell(cell, run_dir)
    return result, wrapped[0]


@pytest.fixture(scope="module")
def switch_pt(tmp_path_factory, one_torch_thread):
    """A Switch joint pt cell: (its ArmResult, the wrapped model the protocol used)."""
    return spied_run(joint(), tmp_path_factory.mktemp("switch"))


@pytest.fixture(scope="module")
def aux_and_off(tmp_path_factory, one_torch_thread):
    """The aux_loss arm and the off arm of one Switch seed (records), sharing a run directory."""
    run_dir = tmp_path_factory.mktemp("aux")
    return run_cell(joint(mode=AUX_LOSS), run_dir).record, run_cell(joint(mode="off"), run_dir).record


def one_conversation(model):
    """Model inputs of one synthetic conversation (no padding)."""
    batch = synthetic.ConversationGenerator(synthetic.ConversationConfig(**TINY_WORLD), seed=3).sample(1)
    return model_inputs(model, batch, torch.device("cpu"))


# ------------------------------------------------------------------ decoder routers only
def test_a_switch_joint_cell_has_a_controller_with_only_decoder_layers(switch_pt):
    _, wrapped = switch_pt
    assert set(wrapped.info.router_stacks) == {"decoder"}
    assert wrapped.controller.num_layers == 2  # switch-tiny: 2 sparse decoder blocks (and 2 encoder ones)


def test_the_encoder_routers_of_a_switch_wrapped_by_the_protocol_carry_no_hook(switch_pt):
    _, wrapped = switch_pt
    routers = {name: module for name, module in wrapped.model.named_modules()
               if type(module).__name__ == "SwitchTransformersTop1Router"}
    encoder = [module for name, module in routers.items() if name.startswith("encoder.")]
    decoder = [module for name, module in routers.items() if name.startswith("decoder.")]
    assert len(encoder) == 2 and len(decoder) == 2
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in encoder)
    assert all(module._forward_hooks for module in decoder)


def test_a_stacked_frozen_switch_run_hooks_only_the_decoder_routers(tmp_path):
    frozen_data = dataclasses.replace(DATA, num_warmup=2)
    frozen_train = dataclasses.replace(TRAIN, pretrain_steps=2)
    cells = [CellSpec("frozen", "switch-tiny", 0, config, frozen_data, frozen_train, EVAL)
             for config in (None, variant_config("pt", seed=0), variant_config("pressure", seed=0))]
    wrapped = []
    original = chronovisor.wrap
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chronovisor, "wrap", lambda *a, **k: wrapped.append(original(*a, **k)) or wrapped[-1])
        records = [result.record for result in run_cells_stacked(cells, tmp_path)]
    assert [set(model.info.router_stacks) for model in wrapped] == [{"decoder"}]
    assert all(record.model_info.stacks == ["decoder"] for record in records)


def test_a_switch_cell_records_that_its_controller_hooks_the_decoder_stack(switch_pt):
    record = switch_pt[0].record
    assert record.model_info.stacks == ["decoder"] and record.model_info.num_layers == 2
    assert record.to_dict()["model_info"]["stacks"] == ["decoder"]


def test_a_decoder_only_cell_hooks_every_router_and_records_no_stacks(tmp_path):
    result, wrapped = spied_run(joint(model="mixtral-tiny"), tmp_path)
    assert wrapped.controller.num_layers == 2
    assert result.record.model_info.stacks is None
    assert "stacks" not in result.record.to_dict()["model_info"]


# --------------------------------------------------------------------- the aux_loss objective
def test_the_switch_aux_loss_objective_adds_exactly_the_weighted_decoder_router_losses_to_the_ce():
    model = build_toy("switch-tiny", seed=0)  # eval mode: no jitter, no dropout
    inputs = one_conversation(model)
    config = model.config
    assert config.router_aux_loss_coef > 0 and config.router_z_loss_coef > 0
    with torch.no_grad():
        aux_arm, _ = aux_loss_objective(model, inputs)
        off_arm, _ = ce_objective(model, inputs)
        # Independently: HF's own decoder router losses of the same forward (sparse step 2 > 1, no padding).
        output = model(**inputs.kwargs, use_cache=False, output_router_logits=True)
    expected = config.router_aux_loss_coef * output.decoder_aux_loss + config.router_z_loss_coef * output.decoder_z_loss
    assert float(output.decoder_aux_loss) > 0 and float(output.decoder_z_loss) > 0
    assert float(aux_arm - off_arm) == pytest.approx(float(expected), rel=1e-4, abs=1e-7)


def test_the_mixtral_aux_loss_objective_adds_exactly_the_weighted_load_balancing_loss_to_the_ce():
    model = build_toy("mixtral-tiny", seed=0)
    inputs = one_conversation(model)
    with torch.no_grad():
        aux_arm, _ = aux_loss_objective(model, inputs)
        off_arm, _ = ce_objective(model, inputs)
        output = model(**inputs.kwargs, use_cache=False, output_router_logits=True)
    expected = model.config.router_aux_loss_coef * output.aux_loss
    assert float(aux_arm - off_arm) == pytest.approx(float(expected), rel=1e-4, abs=1e-7)


def test_switch_router_losses_leave_padding_out_of_a_padded_batch():
    model = build_toy("switch-tiny", seed=0)
    batch = synthetic.ConversationGenerator(synthetic.ConversationConfig(**TINY_WORLD), seed=3).sample(2)
    inputs = model_inputs(model, batch, torch.device("cpu"))
    mask = inputs.kwargs["decoder_attention_mask"]
    assert not bool(mask.all())  # the two conversations differ in length
    singles = [model_inputs(model, batch.select([b]), torch.device("cpu")) for b in range(2)]
    with torch.no_grad():
        output = model(**inputs.kwargs, use_cache=False, output_router_logits=True)
        aux, z = switch_decoder_losses(tuple(output.decoder_router_logits), mask)
        alone = [model(**single.kwargs, use_cache=False, output_router_logits=True) for single in singles]
    lengths = mask.sum(dim=1).float()
    expected_z = sum(out.decoder_z_loss * n for out, n in zip(alone, lengths, strict=True)) / lengths.sum()
    expected_aux = sum(out.decoder_aux_loss for out in alone) / 2
    assert float(z) == pytest.approx(float(expected_z), rel=1e-4)
    assert float(aux) == pytest.approx(float(expected_aux), rel=1e-4)


def test_the_aux_loss_objective_reports_the_plain_ce_beside_the_loss_it_minimises():
    model = build_toy("switch-tiny", seed=0)
    inputs = one_conversation(model)
    with torch.no_grad():
        _, ce = aux_loss_objective(model, inputs)
        off_arm, _ = ce_objective(model, inputs)
    assert float(ce) == pytest.approx(float(off_arm), rel=1e-6)


def test_the_aux_loss_arm_starts_from_the_off_arms_weights_and_trains_on_its_data(aux_and_off):
    aux, off = aux_and_off
    assert aux.pairing == off.pairing
    assert aux.paired_off_cell == off.cell_id


def test_the_aux_loss_arm_is_reported_as_an_on_arm_with_observed_fields(aux_and_off):
    aux, _ = aux_and_off
    assert aux.arm == "on" and aux.variant == AUX_LOSS
    assert aux.spec["objective"] == AUX_LOSS and aux.spec["controller"]["mode"] == "off"
    assert aux.fields.ticks == TRAIN.steps  # one tick per training step, as every joint arm


def test_the_aux_loss_arm_trains_a_different_model_than_the_off_arm(aux_and_off):
    aux, off = aux_and_off
    assert aux.train.curve[0] == off.train.curve[0]  # the same first forward: the objectives differ after it
    assert aux.heldout.loss != off.heldout.loss


# --------------------------------------------------------------------------- arm identity
#: Cell ids of configs/headline_joint.yaml's seed 0 before the aux_loss arm existed.
HEADLINE_JOINT_SEED_0 = [
    "joint_mixtral-2l8e_s0_off_61f36ab7",
    "joint_mixtral-2l8e_s0_placebo_eta0.015_P1e-07_07671bd6",
    "joint_mixtral-2l8e_s0_pressure_eta0.015_P0.5_3c402da5",
    "joint_mixtral-2l8e_s0_temperature_eta0.015_P0.5_59b350a6",
    "joint_mixtral-2l8e_s0_pt_eta0.015_P0.5_a9ba4bb8",
    "joint_mixtral-2l8e_s0_loss_free_eta0.015_P0.5_67525aaf",
    "joint_mixtral-2l8e_s0_pt_eta0.015_P0.5_delayed_4a742fd1",
]


def test_the_cell_ids_of_existing_arms_are_those_they_had_before_the_aux_loss_arm():
    cells = load_config(CONFIGS / "headline_joint.yaml").cells()
    assert [cell.cell_id for cell in cells if cell.seed == 0] == HEADLINE_JOINT_SEED_0


def test_an_off_arm_records_no_objective_key():
    assert "objective" not in joint(mode="off").relevant_settings()


def test_the_aux_loss_arm_has_its_own_cell_id_and_pairs_with_the_off_arm():
    aux = joint(mode=AUX_LOSS)
    assert aux.cell_id.startswith("joint_switch-tiny_s0_aux_loss_")
    assert aux.cell_id != aux.paired_off().cell_id == joint(mode="off").cell_id


@pytest.mark.parametrize("label", VARIANTS)
def test_every_arm_label_round_trips_through_variant_arm_and_arm_name(label):
    assert arm_name(*variant_arm(label, seed=0)) == label


def test_variant_config_refuses_aux_loss_and_points_to_variant_arm():
    with pytest.raises(ValueError, match="variant_arm"):
        variant_config(AUX_LOSS, seed=0)


def test_an_aux_loss_cell_outside_the_joint_protocol_is_refused():
    with pytest.raises(ValueError, match="needs protocol joint"):
        CellSpec("frozen", "switch-tiny", 0, None, DATA, TRAIN, EVAL, objective=AUX_LOSS)


def test_an_aux_loss_cell_with_a_controller_is_refused():
    with pytest.raises(ValueError, match="controller off"):
        CellSpec("joint", "switch-tiny", 0, PTConfig(seed=0), DATA, TRAIN, EVAL, objective=AUX_LOSS)


# ---------------------------------------------------------------------------- configs
def config(**changes):
    raw = {"protocol": "joint", "models": ["switch-tiny"], "seeds": 2,
           "data": {"num_train": 4, "num_heldout": 3, **TINY_WORLD}, "train": {"steps": 3},
           "grid": {"mode": ["pt", AUX_LOSS]}}
    raw.update(changes)
    return raw


def test_a_grid_with_aux_loss_gives_one_aux_loss_cell_per_seed_whatever_the_other_axes():
    sweep = parse_config(config(grid={"mode": ["pt", AUX_LOSS], "eta": [0.01, 0.02]}))
    assert [cell.seed for cell in sweep.cells() if cell.variant == AUX_LOSS] == [0, 1]


def test_aux_loss_can_be_named_in_a_primary_contrast():
    sweep = parse_config(config(primary=["pt - off", "aux_loss - off", "pt - aux_loss"]))
    assert Contrast("aux_loss", "off") in sweep.primary


def test_a_config_with_aux_loss_outside_the_joint_protocol_names_grid_mode():
    raw = config(protocol="frozen", data={"num_train": 4, "num_heldout": 3, "num_warmup": 2, **TINY_WORLD})
    with pytest.raises(ConfigError, match=r"^grid\.mode: aux_loss needs protocol joint"):
        parse_config(raw)


def test_a_misspelt_mode_names_the_grid_key():
    with pytest.raises(ConfigError, match=r"^grid\.mode\[1\]: must be one of .*aux_loss"):
        parse_config(config(grid={"mode": ["pt", "aux-loss"]}))


def test_a_primary_contrast_naming_aux_loss_needs_it_in_the_grid():
    with pytest.raises(ConfigError, match=r"^primary\[0\]: 'aux_loss' is not an arm of the grid"):
        parse_config(config(grid={"mode": ["pt"]}, primary=["aux_loss - off"]))


def test_the_switch_study_config_has_the_aux_loss_arm():
    sweep = load_config(CONFIGS / "switch_2l8e.yaml")
    assert AUX_LOSS in {cell.arm for cell in sweep.cells()}


def test_cells_differing_only_in_objective_differ_in_id():
    off = joint(mode="off")
    assert dataclasses.replace(off, objective=AUX_LOSS).cell_id != off.cell_id
