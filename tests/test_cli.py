"""The ``chronovisor`` command line: ``inspect`` and ``train`` (run in-process via ``cli.main``)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from chronovisor import ChronovisorModel, PTConfig
from chronovisor.cli import main
from chronovisor.wrappers import TOY_PRESETS, build_toy

# Small synthetic training run: 4 conversations of 24 tokens, 2 per batch.
TRAIN_ARGS = ["--steps", "5", "--conversations", "4", "--max-length", "24", "--batch-size", "2",
              "--log-every", "1"]


@pytest.fixture(scope="module")
def mixtral_dir(mixtral_tiny_dir):
    return mixtral_tiny_dir


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-tiny")
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """``chronovisor train mixtral-tiny --out DIR --set usage=ema ...`` (one run shared by the tests)."""
    out = tmp_path_factory.mktemp("trained") / "controller"
    assert main(["train", "mixtral-tiny", "--out", str(out), "--set", "usage=ema", *TRAIN_ARGS]) == 0
    return out


def run(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def fails(capsys, *argv: str) -> str:
    """The error line of a command that fails with the user-error status 2: the last line on stderr
    (transformers' weight-loading progress bar may precede it)."""
    assert main(list(argv)) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"chronovisor {argv[0]}: error: "), line
    return line


# ----------------------------------------------------------------------------------- inspect
def test_inspect_a_preset_prints_family_routers_experts_top_k_and_parameters(capsys):
    out = run(capsys, "inspect", "mixtral-tiny")
    total = sum(p.numel() for p in build_toy("mixtral-tiny").parameters())
    assert "MixtralForCausalLM" in out
    assert "family:     mixtral" in out
    assert "2 x MixtralTopKRouter, 8 experts, top-2" in out
    assert "softmax(fp32) -> top-k -> renormalise" in out
    assert "model.layers.0.mlp.gate" in out and "model.layers.1.mlp.gate" in out
    assert f"parameters: {total:,} total, {total:,} trainable" in out
    assert "learnable offsets would add 32 parameters" in out


def test_inspect_presets_lists_every_toy_preset(capsys):
    lines = run(capsys, "inspect", "--presets").splitlines()
    assert [line.split()[0] for line in lines] == list(TOY_PRESETS)
    assert all(TOY_PRESETS[line.split()[0]].description in line for line in lines)


def test_inspect_a_saved_model_directory(capsys, mixtral_dir):
    assert run(capsys, "inspect", str(mixtral_dir)) == run(capsys, "inspect", "mixtral-tiny")


def test_inspect_a_wider_preset_reports_its_shape(capsys):
    out = run(capsys, "inspect", "mixtral-tiny-16e")
    assert "4 x MixtralTopKRouter, 16 experts, top-2" in out
    assert "model.layers.3.mlp.gate" in out


@pytest.mark.parametrize("budget", ["cpu=200KB", "cpu=200000"])
def test_inspect_loads_through_an_accelerate_device_map_with_disk_offload(capsys, mixtral_dir, tmp_path, budget):
    out = run(capsys, "inspect", str(mixtral_dir), "--device-map", "auto", "--max-memory", budget,
              "--offload-folder", str(tmp_path / "offload"))
    assert "model.layers.0.mlp.gate  [decoder, cpu]" in out
    assert "model.layers.1.mlp.gate  [decoder, cpu]" in out


def test_inspect_without_a_model_exits_with_a_hint(capsys):
    assert "--presets" in fails(capsys, "inspect")


def test_inspect_a_non_moe_directory_exits_with_a_clear_error(capsys, llama_dir):
    message = fails(capsys, "inspect", str(llama_dir))
    assert "no Mixture-of-Experts router" in message
    assert "LlamaForCausalLM" in message and "mixtral" in message


# ------------------------------------------------------------------------------------- train
def test_train_writes_a_kilobyte_controller_and_its_log(trained_dir):
    files = {path.name: path.stat().st_size for path in trained_dir.iterdir()}
    assert {"controller.safetensors", "controller_config.json", "training_log.json"} <= set(files)
    assert sum(files.values()) < 32 * 1024
    log = json.loads((trained_dir / "training_log.json").read_text())
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5]


def test_train_output_loads_with_from_pretrained(trained_dir):
    model = ChronovisorModel.from_pretrained(build_toy("mixtral-tiny", seed=0), trained_dir)
    controller = model.controller
    assert (controller.num_layers, controller.num_experts, controller.top_k) == (2, 8, 2)
    assert controller.ticks == 5
    assert controller.config.learnable
    assert float(controller.pressure_offset.abs().max()) > 0           # the offsets did train


def test_train_passes_set_values_to_ptconfig(trained_dir):
    saved = json.loads((trained_dir / "controller_config.json").read_text())
    assert saved["config"]["usage"] == "ema"
    assert PTConfig.from_dict(saved["config"]).usage == "ema"


def test_train_records_the_base_model_it_was_trained_on(trained_dir):
    saved = json.loads((trained_dir / "controller_config.json").read_text())
    assert saved["family"] == "mixtral"
    assert saved["base_model_name_or_path"] == "mixtral-tiny"


def test_train_on_a_model_directory_records_that_directory(mixtral_dir, tmp_path):
    out = tmp_path / "controller"
    assert main(["train", str(mixtral_dir), "--out", str(out), *TRAIN_ARGS]) == 0
    saved = json.loads((out / "controller_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(mixtral_dir)
    model = ChronovisorModel.from_pretrained(AutoModelForCausalLM.from_pretrained(mixtral_dir), out)
    assert model.controller.ticks == 5


def test_train_leaves_the_base_model_frozen_and_prints_the_trainable_share(capsys, tmp_path):
    assert main(["train", "mixtral-tiny", "--out", str(tmp_path / "c"), "--steps", "1", "--conversations", "2",
                 "--max-length", "16", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    total = sum(p.numel() for p in build_toy("mixtral-tiny").parameters()) + 32
    assert f"trainable params: 32 || all params: {total:,}" in out
    assert "KiB" in out


def test_train_with_an_invalid_set_value_exits_naming_the_field(capsys, tmp_path):
    message = fails(capsys, "train", "mixtral-tiny", "--out", str(tmp_path / "c"), "--set", "eta=2", *TRAIN_ARGS)
    assert "eta" in message and "[0, 1]" in message
    assert not (tmp_path / "c").exists()


def test_train_with_an_unknown_set_field_exits_naming_it(capsys, tmp_path):
    assert "no_such_knob" in fails(capsys, "train", "mixtral-tiny", "--out", str(tmp_path / "c"), "--set",
                                   "no_such_knob=1", *TRAIN_ARGS)


def test_train_with_a_malformed_set_exits(capsys, tmp_path):
    assert "FIELD=VALUE" in fails(capsys, "train", "mixtral-tiny", "--out", str(tmp_path / "c"), "--set", "usage",
                                  *TRAIN_ARGS)


def test_train_requires_out():
    with pytest.raises(SystemExit):
        main(["train", "mixtral-tiny", "--steps", "1"])


def test_trained_controller_steers_the_model_it_was_trained_for(trained_dir):
    base = build_toy("mixtral-tiny", seed=0)
    ids = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        model = ChronovisorModel.from_pretrained(base, trained_dir, step_mode="manual")
        steered = model(input_ids=ids).logits
        with model.disable_controller():
            assert torch.equal(model(input_ids=ids).logits, expected)
    assert not torch.equal(steered, expected)
