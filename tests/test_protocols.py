"""The paired protocols: pairing, causality, frozen bases, controller-only training, model directories."""

import dataclasses
import json
import warnings

import pytest
import torch
from conftest import TINY_WORLD

from chronovisor.controllers import PTConfig
from chronovisor.eval import data as data_lib
from chronovisor.eval import synthetic
from chronovisor.eval.config import parse_config
from chronovisor.eval.errors import ConfigError
from chronovisor.eval.inputs import model_inputs, state_hash, training_schedule
from chronovisor.eval.protocols import run_cell
from chronovisor.eval.rundir import BASES_DIR
from chronovisor.eval.specs import CellSpec, DataSpec, EvalSpec, TrainSpec, variant_config
from chronovisor.eval.train_loop import lr_warmup_schedule
from chronovisor.wrappers import build_toy

DATA = DataSpec(num_train=4, num_heldout=3, num_warmup=6, generator=TINY_WORLD)
TRAIN = TrainSpec(steps=6, lr=1e-2, pretrain_steps=6)
EVAL = EvalSpec(null_permutations=10, trajectory_every=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cell(protocol, model="mixtral-tiny", seed=0, mode="pt", **controller):
    config = None
    if mode != "off":
        config = variant_config(mode, seed=seed, learnable=protocol == "controller_only", **controller)
    return CellSpec(protocol, model, seed, config, DATA, TRAIN, EVAL)


# ------------------------------------------------------------------------------ identity
def test_off_arm_is_shared_by_every_controller_setting_of_a_seed():
    a = cell("joint", eta=0.01, pressure_scale=0.5)
    b = cell("joint", eta=0.03, pressure_scale=1.0, usage="ema")
    assert a.cell_id != b.cell_id
    assert a.paired_off() == b.paired_off()
    assert a.paired_off().cell_id == cell("joint", mode="off").cell_id
    assert cell("joint", seed=1, mode="off").cell_id != a.paired_off().cell_id


def test_cell_id_ignores_settings_the_protocol_never_reads():
    base = cell("joint")
    unused = dataclasses.replace(base, train=dataclasses.replace(TRAIN, pretrain_steps=99, controller_lr=0.5))
    assert unused.cell_id == base.cell_id
    used = dataclasses.replace(base, train=dataclasses.replace(TRAIN, steps=7))
    assert used.cell_id != base.cell_id


def test_a_learning_rate_warm_up_changes_the_cell_id_and_none_keeps_the_ids_written_before_it_existed():
    base = cell("joint")
    assert "lr_warmup_steps" not in base.relevant_settings()["train"]
    warm = dataclasses.replace(base, train=dataclasses.replace(TRAIN, lr_warmup_steps=3))
    assert warm.relevant_settings()["train"]["lr_warmup_steps"] == 3 and warm.cell_id != base.cell_id


def test_the_learning_rate_warms_up_linearly_and_then_stays_at_the_configured_rate():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=0.4)
    schedule = lr_warmup_schedule(optimizer, 4)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


def test_a_joint_cell_with_a_warm_up_trains_differently_from_one_without(tmp_path):
    base = cell("joint", mode="off")
    warm = dataclasses.replace(base, train=dataclasses.replace(TRAIN, lr_warmup_steps=6))
    assert run_cell(warm, tmp_path).record.heldout.loss != run_cell(base, tmp_path).record.heldout.loss


def test_a_controller_only_cell_needs_a_learnable_pt_config():
    with pytest.raises(ValueError, match="learnable=True"):
        CellSpec("controller_only", "mixtral-tiny", 0, PTConfig(seed=0), DATA, TRAIN, EVAL)


def test_the_controller_seed_must_equal_the_cell_seed():
    with pytest.raises(ValueError, match="seed"):
        CellSpec("joint", "mixtral-tiny", 0, PTConfig(seed=3), DATA, TRAIN, EVAL)


def test_an_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="protocol"):
        CellSpec("streaming", "mixtral-tiny", 0, None, DATA, TRAIN, EVAL)


def test_loss_free_label_maps_to_the_deepseek_dynamics():
    config = variant_config("loss_free", seed=0)
    assert (config.dynamics, config.mode) == ("loss_free", "pressure")
    assert CellSpec("joint", "mixtral-tiny", 0, config, DATA, TRAIN, EVAL).variant == "loss_free"


def test_training_schedule_is_deterministic_and_covers_each_epoch():
    schedule = training_schedule(5, 2, 10, seed=3)
    assert schedule == training_schedule(5, 2, 10, seed=3)
    assert schedule != training_schedule(5, 2, 10, seed=4)
    flat = [i for batch in schedule for i in batch]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert all(len(batch) == 2 for batch in schedule)


# ----------------------------------------------------------------------------- causality
@pytest.mark.parametrize("model_name", ["mixtral-tiny", "switch-tiny"])
def test_no_position_sees_a_future_token(model_name):
    """Changing the tail of a conversation leaves the loss of every earlier target unchanged."""
    model = build_toy(model_name, seed=0)
    batch = synthetic.ConversationGenerator(synthetic.ConversationConfig(**TINY_WORLD), seed=0).sample(1)
    altered = dataclasses.replace(batch, input_ids=batch.input_ids.clone())
    cut = batch.input_ids.shape[1] // 2
    altered.input_ids[:, cut:] = (altered.input_ids[:, cut:] + 7) % 60 + 1
    losses = []
    for b in (batch, altered):
        inputs = model_inputs(model, b, torch.device("cpu"))
        with torch.no_grad():
            logits = model(**inputs.kwargs, use_cache=False).logits
        targets = inputs.targets.clamp_min(0)
        losses.append(torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none"))
    # Mixtral: logits[t] predicts x_{t+1} and reads x_0..x_t; Switch: logits[t] predicts x_t, reads x_0..x_{t-1}.
    # (Expert kernels group tokens by expert, so other tokens can move the last float bits.)
    visible = cut - 1 if model_name == "mixtral-tiny" else cut
    torch.testing.assert_close(losses[0][:visible], losses[1][:visible], rtol=0, atol=1e-5)
    assert (losses[0][visible:] - losses[1][visible:]).abs().max() > 1e-2


def test_switch_encoder_sees_a_single_pad_token():
    model = build_toy("switch-tiny", seed=0)
    batch = synthetic.ConversationGenerator(synthetic.ConversationConfig(**TINY_WORLD), seed=0).sample(2)
    inputs = model_inputs(model, batch, torch.device("cpu"))
    assert inputs.kwargs["input_ids"].shape == (2, 1)
    assert torch.equal(inputs.kwargs["decoder_input_ids"][:, 1:], batch.input_ids[:, :-1])
    assert (inputs.targets[:, 0] == data_lib.IGNORE_INDEX).all()


# ------------------------------------------------------------------------------- pairing
@pytest.fixture(scope="module", params=["joint", "frozen", "controller_only"])
def arms(request, tmp_path_factory, one_torch_thread):
    """(on, off, off arm of another seed) records of one protocol, sharing a run directory."""
    protocol, run_dir = request.param, tmp_path_factory.mktemp(request.param)
    on = run_cell(cell(protocol, eta=0.03, pressure_scale=1.0), run_dir).record
    off = run_cell(cell(protocol, mode="off"), run_dir).record
    other_seed = run_cell(cell(protocol, seed=1, mode="off"), run_dir).record
    return on, off, other_seed


def test_the_on_arm_names_its_paired_off_arm(arms):
    on, off, _ = arms
    assert on.paired_off_cell == off.cell_id


def test_arms_of_a_seed_start_from_the_same_weights_and_see_the_same_data(arms):
    on, off, _ = arms
    assert on.pairing == off.pairing
    assert on.pairing.data_hash is not None


def test_arms_of_different_seeds_start_from_different_weights(arms):
    _, off, other_seed = arms
    assert other_seed.pairing.init_hash != off.pairing.init_hash


def test_arms_of_a_seed_are_scored_on_the_same_held_out_tokens_against_the_same_floor(arms):
    on, off, _ = arms
    # Identical held-out tokens, hence token-by-token comparable routing.
    assert on.heldout.tokens == off.heldout.tokens
    assert on.loss_floor == off.loss_floor
    assert on.loss_floor.bayes < on.loss_floor.uniform


def test_only_the_on_arm_ticks_and_reports_fields(arms):
    on, off, _ = arms
    assert on.fields.ticks > 0 and off.fields is None


def test_joint_trains_and_evaluates_on_held_out_data(tmp_path):
    result = run_cell(cell("joint"), tmp_path)
    record = result.record
    assert record.train.steps == TRAIN.steps and "in-sample" in record.train.note
    assert record.fields.ticks == TRAIN.steps
    assert len(record.fields.trajectory["tick"]) == TRAIN.steps  # trajectory_every=1
    layers = record.heldout.layers
    assert [layer.layer for layer in layers] == list(result.routing)
    assert all(ids.shape == (record.heldout.tokens + DATA.num_heldout, 2) for ids in result.routing.values())
    for layer in layers:
        assert layer.excess_separation == pytest.approx(layer.separation - layer.null_mean)


def test_frozen_base_is_pretrained_once_and_reused(tmp_path):
    first = run_cell(cell("frozen", eta=0.01), tmp_path).record
    second = run_cell(cell("frozen", eta=0.03), tmp_path).record
    bases = list((tmp_path / BASES_DIR).iterdir())
    assert len(bases) == 1
    saved = json.loads((bases[0] / "base.json").read_text())
    assert saved["state_hash"] == first.pairing.init_hash == second.pairing.init_hash
    assert first.fields.ticks == DATA.num_warmup  # one tick per warm-up conversation (batch 1)
    fresh = build_toy("mixtral-tiny", seed=0)
    assert state_hash(fresh) != saved["state_hash"]  # it was pretrained


def test_controller_only_changes_no_base_parameter(tmp_path):
    record = run_cell(cell("controller_only", eta=0.03, pressure_scale=1.0), tmp_path).record
    assert record.base_params_changed == 0
    assert record.train.steps == TRAIN.steps
    offsets = record.fields.offsets
    assert set(offsets) == {"pressure_offset", "log_temperature_offset"}
    assert offsets["pressure_offset"] > 0  # the offsets did train
    off = run_cell(cell("controller_only", mode="off"), tmp_path).record
    assert off.train is None and off.base_params_changed == 0


def test_switch_routing_metrics_use_the_decoder_routers(tmp_path):
    result = run_cell(cell("joint", model="switch-tiny"), tmp_path)
    assert all(name.startswith("decoder.") for name in result.routing)
    assert all(ids.shape[1] == 1 for ids in result.routing.values())


def test_a_model_directory_runs_like_a_preset(tmp_path):
    directory = tmp_path / "model"
    build_toy("mixtral-tiny", seed=5).save_pretrained(directory)
    spec = dataclasses.replace(cell("frozen", model=str(directory)), train=dataclasses.replace(TRAIN, pretrain_steps=0))
    record = run_cell(spec, tmp_path / "run").record
    assert record.model_info.family == "mixtral"
    assert record.heldout.loss > 0
    assert not (tmp_path / "run" / BASES_DIR).exists()  # no pretraining requested


@pytest.mark.parametrize("model_name", ["mixtral-tiny", "switch-tiny"])
def test_padded_evaluation_batches_give_the_unpadded_loss(model_name, tmp_path):
    single = run_cell(cell("joint", model=model_name, mode="off"), tmp_path / "a")
    batched_spec = dataclasses.replace(cell("joint", model=model_name, mode="off"),
                                       eval=dataclasses.replace(EVAL, batch_size=3))
    batched = run_cell(batched_spec, tmp_path / "b")
    assert batched.record.heldout.tokens == single.record.heldout.tokens
    assert batched.record.heldout.loss == pytest.approx(single.record.heldout.loss, abs=1e-4)
    for name, ids in single.routing.items():
        assert (batched.routing[name] == ids).mean() > 0.99


@pytest.fixture(scope="module")
def streaming_runs(tmp_path_factory, one_torch_thread):
    """Held-out metrics of the joint off arm evaluated in full forwards and streamed, and the
    streamed on arm's record."""
    run_dir = tmp_path_factory.mktemp("streaming")
    streaming = dataclasses.replace(EVAL, streaming=True)
    full_off = run_cell(cell("joint", mode="off"), run_dir).record.heldout
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream_off = run_cell(dataclasses.replace(cell("joint", mode="off"), eval=streaming), run_dir).record.heldout
    stream_on = run_cell(dataclasses.replace(cell("joint"), eval=streaming), run_dir).record
    return full_off, stream_off, stream_on, [str(warning.message) for warning in caught]


def test_streaming_turn_by_turn_gives_the_loss_of_the_full_forward(streaming_runs):
    full_off, stream_off, *_ = streaming_runs
    assert stream_off.streaming and stream_off.tokens == full_off.tokens
    assert stream_off.loss == pytest.approx(full_off.loss, abs=1e-4)  # the KV-cache path is the same model


def test_streaming_evaluation_ticks_the_controller_after_every_turn(streaming_runs):
    *_, stream_on, _ = streaming_runs
    turns = DATA.num_heldout * len(synthetic.PHASES)
    assert stream_on.fields.ticks == TRAIN.steps + turns


def test_streaming_evaluation_passes_the_kv_cache_through_the_non_deprecated_cache_argument(streaming_runs):
    *_, messages = streaming_runs
    assert not [message for message in messages if "past_key_values" in message or "deprecated" in message]


def test_streaming_evaluation_needs_batch_size_one():
    with pytest.raises(ValueError, match="batch_size"):
        EvalSpec(streaming=True, batch_size=2)


def test_a_streaming_config_with_an_encoder_decoder_model_is_refused():
    raw = {"protocol": "joint", "models": ["switch-tiny"], "seeds": 1, "eval": {"streaming": True}}
    with pytest.raises(ConfigError, match="eval.streaming"):
        parse_config(raw)
