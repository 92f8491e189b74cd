"""Controller-only training (chronovisor.training): the base stays frozen, the offsets learn.

"Routing matters" is built honestly from a real tiny Mixtral:

1. train the base model briefly (AdamW, a few dozen steps) on a deterministic sequence task
   (arithmetic progressions mod 64), so it has a real, low loss;
2. corrupt every expert but expert 0 in every layer (their ``down_proj`` replaced by large
   seeded noise), so the loss rises to ~6 nats and only routing to expert 0 can bring it down;
3. save it as safetensors and reload it; each test wraps a fresh copy.

The controller then has to discover, from the LM loss alone, that expert 0 is the one to use.
(Measured over base seeds 0-2: the loss falls from ~6 to ~2 within 30 steps at lr 0.1, and expert
0 becomes every token's first choice in both layers; the margins asserted below are ~2x looser.)
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import chronovisor
from chronovisor import ChronovisorModel, PTConfig
from chronovisor.training import TrainConfig, ZeroGradientError, train_controller
from chronovisor.wrappers import build_toy

INTACT_EXPERT = 0
VOCAB, STEP, LENGTH, BATCH = 64, 7, 32, 8


def progression_batches(seed: int, count: int = 4) -> list[dict[str, torch.Tensor]]:
    """Sequences 1 + (s + 7 t) mod 64: every next token is determined by the previous one."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        start = torch.randint(0, VOCAB, (BATCH, 1), generator=generator)
        ids = (start + STEP * torch.arange(LENGTH)) % VOCAB + 1
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


@pytest.fixture(scope="module")
def batches():
    return progression_batches(seed=0)


@pytest.fixture(scope="module")
def corrupted_dir(tmp_path_factory, batches):
    """A tiny Mixtral that learned the task, then lost every expert but one; saved as safetensors."""
    model = build_toy("mixtral-tiny", seed=0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for step in range(30):
            model(**batches[step % len(batches)]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained_loss = mean_loss(model, batches)
        noise = torch.Generator().manual_seed(1)
        for layer in model.model.layers:
            down = layer.mlp.experts.down_proj                                  # [E, H, I]
            mask = torch.arange(down.shape[0]) != INTACT_EXPERT
            down[mask] = torch.randn(down[mask].shape, generator=noise) * down.std() * 10
        corrupted_loss = mean_loss(model, batches)
    assert trained_loss < 1.0 < 0.5 * corrupted_loss, (trained_loss, corrupted_loss)  # routing now matters
    directory = tmp_path_factory.mktemp("corrupted-mixtral")
    model.save_pretrained(directory)
    return directory


def load_base(directory) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def mean_loss(model, batches) -> float:
    with torch.no_grad():
        return sum(float(model(**batch).loss) for batch in batches) / len(batches)


def first_choice_share(wrapped: ChronovisorModel, batches, expert: int) -> list[float]:
    """Per layer, the share of tokens whose first choice is ``expert``."""
    with torch.no_grad(), wrapped.record_routing() as record:
        for batch in batches:
            wrapped(**batch)
    return [float((ids[:, 0] == expert).float().mean()) for ids in record.expert_index]


@pytest.fixture(scope="module")
def trained(corrupted_dir, batches):
    """One controller-only run: (wrapped model, log, base state before, loss before, share before)."""
    wrapped = chronovisor.wrap(load_base(corrupted_dir), PTConfig(learnable=True, mode="pt"), step_mode="manual")
    loss_before = mean_loss(wrapped, batches)
    share_before = first_choice_share(wrapped, batches, INTACT_EXPERT)
    state_before = {name: tensor.clone() for name, tensor in wrapped.model.state_dict().items()}
    wrapped.step_mode = "auto"
    log = train_controller(wrapped, batches, TrainConfig(steps=40, learning_rate=0.1, log_every=10),
                           progress=False)
    wrapped.step_mode = "manual"
    return wrapped, log, state_before, loss_before, share_before


# --------------------------------------------------------------------------- learning works
def test_controller_only_training_lowers_the_training_loss_where_routing_matters(trained, batches):
    wrapped, log, _, loss_before, _ = trained
    assert log[-1]["loss"] < 0.75 * log[0]["loss"]
    assert mean_loss(wrapped, batches) < 0.6 * loss_before


def test_controller_only_training_changes_no_base_parameter(trained):
    wrapped, _, state_before, _, _ = trained
    state_after = wrapped.model.state_dict()
    assert state_after.keys() == state_before.keys()
    changed = [name for name in state_before if not torch.equal(state_before[name], state_after[name])]
    assert changed == []
    assert not any(p.requires_grad for p in wrapped.model.parameters())
    assert all(p.grad is None for p in wrapped.model.parameters())


def test_the_learned_offsets_not_the_online_fields_lower_the_loss(trained, batches):
    wrapped, _, _, _, _ = trained
    controller = wrapped.controller
    learned = mean_loss(wrapped, batches)
    saved = (controller.pressure_offset.detach().clone(), controller.log_temperature_offset.detach().clone())
    try:
        with torch.no_grad():
            controller.pressure_offset.zero_()
            controller.log_temperature_offset.zero_()
        without_offsets = mean_loss(wrapped, batches)           # same online P x T fields, no offsets
    finally:
        with torch.no_grad():
            controller.pressure_offset.copy_(saved[0])
            controller.log_temperature_offset.copy_(saved[1])
    assert learned < 0.6 * without_offsets


def test_the_learned_offsets_route_every_token_to_the_intact_expert_first(trained, batches):
    wrapped, _, _, _, share_before = trained
    assert max(share_before) < 0.5
    assert first_choice_share(wrapped, batches, INTACT_EXPERT) == [1.0, 1.0]
    centred = wrapped.controller.pressure_offset - wrapped.controller.pressure_offset.mean(-1, keepdim=True)
    assert bool((centred.argmax(dim=-1) == INTACT_EXPERT).all())


def test_training_log_has_one_entry_per_log_interval(trained):
    _, log, _, _, _ = trained
    assert [entry["step"] for entry in log] == [10, 20, 30, 40]
    for entry in log:
        assert set(entry) == {"step", "loss", "max_abs_pressure_offset", "log_temperature_offset_std"}
        assert all(math.isfinite(value) for value in entry.values())
    assert log[-1]["max_abs_pressure_offset"] > 0


def test_a_trained_controller_saves_in_kilobytes_and_reloads_its_effect(trained, corrupted_dir, batches, tmp_path):
    wrapped, _, _, _, _ = trained
    wrapped.save_pretrained(tmp_path / "ctrl")
    assert sum(path.stat().st_size for path in (tmp_path / "ctrl").iterdir()) < 32 * 1024
    reloaded = ChronovisorModel.from_pretrained(load_base(corrupted_dir), tmp_path / "ctrl", step_mode="manual")
    assert mean_loss(reloaded, batches) == mean_loss(wrapped, batches)


# ------------------------------------------------------------------------- refusing to train
def test_top1_renormalised_routing_raises_zero_gradient_error(batches):
    """Mixtral with k=1 renormalises its one weight to exactly 1: the loss ignores the router."""
    wrapped = chronovisor.wrap(build_toy("mixtral-tiny", seed=0, num_experts_per_tok=1), PTConfig(learnable=True))
    before = {name: tensor.clone() for name, tensor in wrapped.controller.state_dict().items()}
    with pytest.raises(ZeroGradientError, match="top-1") as error:
        train_controller(wrapped, batches, TrainConfig(steps=3), progress=False)
    assert "renormalised" in str(error.value)
    assert isinstance(error.value, RuntimeError)
    assert torch.equal(wrapped.controller.pressure_offset, before["pressure_offset"])


def test_training_refuses_a_controller_without_learnable_offsets(corrupted_dir, batches):
    wrapped = chronovisor.wrap(load_base(corrupted_dir), PTConfig(learnable=False))
    with pytest.raises(ValueError, match="learnable=True"):
        train_controller(wrapped, batches, TrainConfig(steps=1), progress=False)


def test_training_refuses_mode_off(corrupted_dir, batches):
    wrapped = chronovisor.wrap(load_base(corrupted_dir), PTConfig(learnable=True, mode="off"))
    with pytest.raises(ValueError, match="mode 'off'"):
        train_controller(wrapped, batches, TrainConfig(steps=1), progress=False)


def test_training_refuses_a_controller_loaded_frozen(corrupted_dir, batches, tmp_path):
    chronovisor.wrap(load_base(corrupted_dir), PTConfig(learnable=True)).save_pretrained(tmp_path / "ctrl")
    frozen = ChronovisorModel.from_pretrained(load_base(corrupted_dir), tmp_path / "ctrl", is_trainable=False)
    with pytest.raises(ValueError, match="is_trainable=True"):
        train_controller(frozen, batches, TrainConfig(steps=1), progress=False)


def test_training_needs_labels(corrupted_dir, batches):
    wrapped = chronovisor.wrap(load_base(corrupted_dir), PTConfig(learnable=True))
    with pytest.raises(ValueError, match="labels"):
        train_controller(wrapped, [{"input_ids": batches[0]["input_ids"]}], TrainConfig(steps=1), progress=False)


def test_training_needs_batches(corrupted_dir):
    wrapped = chronovisor.wrap(load_base(corrupted_dir), PTConfig(learnable=True))
    with pytest.raises(ValueError, match="no training batches"):
        train_controller(wrapped, [], TrainConfig(steps=1), progress=False)


# ------------------------------------------------------------------------ TrainConfig checks
@pytest.mark.parametrize(("field", "value"), [
    ("steps", 0), ("steps", 2.5), ("steps", True),
    ("learning_rate", 0.0), ("learning_rate", -0.1), ("learning_rate", math.nan), ("learning_rate", math.inf),
    ("weight_decay", -1.0), ("weight_decay", math.nan),
    ("log_every", 0), ("log_every", 1.5),
    ("max_grad_norm", 0.0), ("max_grad_norm", -1.0),
])
def test_train_config_rejects_an_invalid_value_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_train_config_accepts_no_gradient_clipping():
    assert TrainConfig(max_grad_norm=None).max_grad_norm is None
