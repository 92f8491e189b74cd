"""Reliability: nothing non-finite is saved, nothing corrupt is loaded, every CLI error is one clear line.

Sections: training that goes non-finite; controller files (corrupt, non-finite, edited, another
family; atomic save); the controller's public inputs; run directories the report reads; YAML;
validation before work; the command line's error policy and start-up time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_WORLD
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import chronovisor
from chronovisor import ChronovisorModel, PTConfig, PTController
from chronovisor.cli import main
from chronovisor.controllers.persistence import CONFIG_FILE, STATE_FILE, ControllerFileError
from chronovisor.eval.bases import WEIGHTS_FILE, pretrained_base
from chronovisor.eval.config import load_config
from chronovisor.eval.errors import ConfigError, RunDirError
from chronovisor.eval.inputs import load_conversations
from chronovisor.eval.pairing import load_run
from chronovisor.eval.report import write_report
from chronovisor.eval.specs import CellSpec, DataSpec, TrainSpec
from chronovisor.training import NonFiniteTrainingError, TrainConfig, train_controller
from chronovisor.wrappers import build_toy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
PUBLISHED_RUN = REPO / "docs" / "results" / "headline_joint"
#: A quick synthetic ``chronovisor train`` run.
TRAIN_ARGS = ["--steps", "5", "--conversations", "4", "--max-length", "24", "--batch-size", "2"]


def token_batches(count: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, 1000, (2, 12), generator=generator)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


def learnable_model() -> ChronovisorModel:
    return chronovisor.wrap(build_toy("mixtral-tiny", seed=0), PTConfig(learnable=True), freeze_base=True)


def offsets(model: ChronovisorModel) -> list[torch.Tensor]:
    return [model.controller.pressure_offset.detach().clone(), model.controller.log_temperature_offset.detach().clone()]


def cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``chronovisor ARGV`` in a real subprocess (one torch thread)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "chronovisor.cli", *argv], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


def one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The error line of a command that failed with the user-error status 2: the last line on stderr
    (a progress bar may precede it), with no traceback anywhere."""
    assert result.returncode == 2, result.stderr
    line = result.stderr.splitlines()[-1]
    assert line.startswith(f"chronovisor {command}: error: ") and "Traceback" not in result.stderr, result.stderr
    return line


def fails(capsys, *argv: str) -> str:
    """In-process ``main(argv)``: status 2 and one stderr line, returned."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- non-finite training
def test_training_with_an_absurd_learning_rate_stops_at_the_first_non_finite_value_keeping_finite_offsets():
    model = learnable_model()
    with pytest.raises(NonFiniteTrainingError, match=r"non-finite .* at step \d"):
        train_controller(model, token_batches(), TrainConfig(steps=20, learning_rate=1e30), progress=False)
    assert all(torch.isfinite(value).all() for value in offsets(model))


def test_a_batch_with_a_nan_input_embedding_stops_training_with_the_offsets_of_the_step_before():
    model = learnable_model()
    good = token_batches(count=1)[0]
    embeds = model.get_input_embeddings()(good["input_ids"]).detach().clone()
    embeds[1, 3] = math.nan
    poisoned = {"inputs_embeds": embeds, "labels": good["labels"]}
    train_controller(model, [good], TrainConfig(steps=1), progress=False)
    before = offsets(model)
    with pytest.raises(NonFiniteTrainingError, match="non-finite loss or gradient at step 2"):
        train_controller(model, [good, poisoned], TrainConfig(steps=2), progress=False)
    after = offsets(model)
    assert torch.isfinite(after[0]).all() and torch.isfinite(after[1]).all()
    assert not torch.equal(after[0], before[0])       # step 1 of the second run did update them


def test_the_train_command_with_an_absurd_learning_rate_exits_two_and_saves_nothing(tmp_path):
    out = tmp_path / "controller"
    result = cli("train", "mixtral-tiny", "--out", str(out), "--lr", "1e30", *TRAIN_ARGS)
    assert "non-finite" in one_error_line(result, "train")
    assert not out.exists()


@pytest.mark.parametrize(("field", "changes"), [
    ("weight_decay", dict(weight_decay=math.inf)),
    ("weight_decay", dict(weight_decay=-0.1)),
    ("learning_rate", dict(learning_rate=True)),
    ("learning_rate", dict(learning_rate="0.1")),
    ("learning_rate", dict(learning_rate=math.nan)),
    ("max_grad_norm", dict(max_grad_norm=math.inf)),
    ("steps", dict(steps=2.5)),
])
def test_train_config_refuses_a_non_finite_mistyped_or_out_of_range_value_naming_it(field, changes):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**changes)


def test_a_batch_without_any_target_token_is_refused_as_such_not_blamed_on_the_model():
    batch = token_batches(count=1)[0]
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(ValueError, match="batch 1 has no target token"):
        train_controller(learnable_model(), [batch], TrainConfig(steps=1), progress=False)


def test_a_sweep_cell_whose_training_loss_goes_non_finite_fails_without_writing_its_record(tmp_path):
    from chronovisor.eval.config import parse_config
    from chronovisor.eval.sweep import run_sweep

    config = parse_config({"name": "nan", "protocol": "joint", "models": "mixtral-tiny", "seeds": 1,
                           "data": dict(TINY_WORLD, num_train=2, num_heldout=2), "train": {"steps": 4, "lr": 1e30},
                           "eval": {"null_permutations": 10}, "grid": {"mode": ["pt"]}})
    with pytest.raises(RuntimeError) as error:
        run_sweep(config, tmp_path / "run", progress=False)
    assert isinstance(error.value.__cause__, NonFiniteTrainingError)
    assert not list((tmp_path / "run" / "cells").glob("*.json"))


# ----------------------------------------------------------------------------- controller files
def saved_controller(directory: Path) -> PTController:
    controller = PTController(2, 4, 2, PTConfig(learnable=True, usage="ema"))
    with torch.no_grad():
        controller.pressure_offset.copy_(torch.randn(2, 4, generator=torch.Generator().manual_seed(1)))
    for _ in range(3):
        controller.observe(0, torch.tensor([[0, 1], [2, 3]]))
        controller.step(loss=1.0)
    controller.save(directory)
    return controller


def test_a_controller_whose_last_64_bytes_were_overwritten_is_refused_naming_the_file(tmp_path):
    saved_controller(tmp_path / "c")
    path = tmp_path / "c" / STATE_FILE
    data = bytearray(path.read_bytes())
    data[-64:] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(ControllerFileError, match=f"{path}: its bytes do not match the state_sha256"):
        PTController.load(tmp_path / "c")


def test_a_controller_with_a_nan_field_is_refused_naming_the_file_and_the_tensor(tmp_path):
    saved_controller(tmp_path / "c")
    path = tmp_path / "c" / STATE_FILE
    tensors = load_file(str(path))
    tensors["_pressure"][0, 1] = math.nan
    save_file(tensors, str(path))
    description = json.loads((tmp_path / "c" / CONFIG_FILE).read_text())
    del description["state_sha256"]             # as a file written before checksums were recorded
    (tmp_path / "c" / CONFIG_FILE).write_text(json.dumps(description))
    with pytest.raises(ControllerFileError, match=f"{path}: tensor '_pressure' holds non-finite values"):
        PTController.load(tmp_path / "c")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(ticks=-5), "field 'ticks' must be an integer >= 0, got -5"),
    (lambda d: d.update(ticks=3.7), "field 'ticks' must be an integer >= 0, got 3.7"),
    (lambda d: d["config"].pop("eta"), "field 'config' lacks eta"),
    (lambda d: d.pop("num_layers"), "field 'num_layers' is missing"),
    (lambda d: d["config"].update(mode=False), "field 'config': PTConfig.mode"),
    (lambda d: d.update(family=7), "field 'family' must be a string or null"),
])
def test_an_edited_controller_json_is_refused_naming_the_file_and_the_field(tmp_path, edit, message):
    saved_controller(tmp_path)
    path = tmp_path / CONFIG_FILE
    description = json.loads(path.read_text())
    edit(description)
    path.write_text(json.dumps(description))
    with pytest.raises(ControllerFileError, match=f"{path}: {message}"):
        PTController.load(tmp_path)


@pytest.mark.parametrize(("text", "message"), [("{\"format_version\": 1,", "not valid JSON"),
                                               ("", "not valid JSON"), ("[1, 2]", "expected a JSON object, got a list")])
def test_a_controller_json_that_is_truncated_empty_or_a_list_is_refused_naming_the_file(tmp_path, text, message):
    saved_controller(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(text)
    with pytest.raises(ControllerFileError, match=f"{tmp_path / CONFIG_FILE}: {message}"):
        PTController.load(tmp_path)


def test_a_controller_saved_with_ptcontroller_save_records_its_family_and_refuses_another_family(tmp_path):
    model = chronovisor.wrap(build_toy("mixtral-tiny", seed=0))
    model.controller.save(tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["family"] == "mixtral"
    qwen = build_toy("qwen3_moe-tiny", seed=0)               # the same shape: 2 layers x 8 experts, top-2
    with pytest.raises(ValueError, match="saved for the mixtral family, but Qwen3MoeForCausalLM is qwen3_moe"):
        ChronovisorModel.from_pretrained(qwen, tmp_path)
    assert ChronovisorModel.from_pretrained(build_toy("mixtral-tiny", seed=0), tmp_path).controller.family == "mixtral"


def test_saving_a_controller_with_non_finite_offsets_is_refused_and_writes_nothing(tmp_path):
    controller = PTController(2, 4, 2, PTConfig(learnable=True))
    with torch.no_grad():
        controller.log_temperature_offset[1, 2] = math.inf
    with pytest.raises(ValueError, match="log_temperature_offset holds non-finite values"):
        controller.save(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_a_save_that_fails_writing_the_config_leaves_the_previous_controller_whole(tmp_path):
    previous = saved_controller(tmp_path / "c")
    replacement = PTController(2, 4, 2, PTConfig(learnable=True, usage="ema"))
    with pytest.raises(TypeError, match="not JSON serializable"):
        replacement.save(tmp_path / "c", metadata={"note": object()})      # fails after the tensors are written
    loaded = PTController.load(tmp_path / "c")
    assert torch.equal(loaded.pressure_offset, previous.pressure_offset) and loaded.ticks == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c"]      # no staging directory left behind


def test_saving_over_a_controller_directory_keeps_its_other_files(tmp_path):
    saved_controller(tmp_path / "c")
    (tmp_path / "c" / "training_log.json").write_text("[]\n")
    (tmp_path / "c" / "notes").mkdir()
    (tmp_path / "c" / "notes" / "a.txt").write_text("kept")
    PTController(2, 4, 2, PTConfig(learnable=True, usage="ema")).save(tmp_path / "c")
    assert (tmp_path / "c" / "training_log.json").read_text() == "[]\n"
    assert (tmp_path / "c" / "notes" / "a.txt").read_text() == "kept"
    assert PTController.load(tmp_path / "c").ticks == 0


# ----------------------------------------------------------------------------- the controller's inputs
def test_a_dict_passed_where_a_ptconfig_belongs_is_refused_saying_how_to_build_one():
    with pytest.raises(TypeError, match=r"got a dict; build one with PTConfig\(\*\*values\)"):
        PTController(2, 8, 2, {"eta": 0.1})


@pytest.mark.parametrize(("ids", "kwargs", "message"), [
    (torch.tensor([[True, False]]), {}, "expert_index must be an integer tensor"),
    (torch.tensor([[0, 1, 2, 3]]), {}, r"expert_index must be an integer tensor \[tokens, 2\]"),
    (torch.tensor([[0, 1]]), {"mask": torch.tensor([0.5])}, "mask must be a bool tensor"),
    (torch.tensor([[0, 1]]), {"weights": torch.tensor([[1, 0]])}, "weights must be a floating-point tensor"),
    (torch.tensor([[0, 8]]), {}, r"expert ids must lie in \[0, 8\), got 0..8"),
    (torch.tensor([[-1, 2]]), {}, r"expert ids must lie in \[0, 8\), got -1..2"),
])
def test_observe_refuses_wrong_input_naming_the_argument_and_counts_nothing(ids, kwargs, message):
    controller = PTController(2, 8, 2)
    with pytest.raises(ValueError, match=message):
        controller.observe(0, ids, **kwargs)
    controller.step()
    assert float(controller.usage.sum()) == 0.0


def test_tokens_routed_from_nan_scores_are_not_counted_into_usage_by_the_hooks():
    model = chronovisor.wrap(build_toy("mixtral-tiny", seed=0), step_mode="manual")
    ids = torch.randint(3, 1000, (2, 5), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach().clone()
    embeds[1] = math.nan                                   # the second sequence routes from NaN scores
    with torch.no_grad():
        model(inputs_embeds=embeds)
    model.controller.step()
    assert model.controller.usage.sum(dim=-1).tolist() == [10.0, 10.0]    # 5 real tokens x top-2, per layer
    assert torch.isfinite(model.controller.usage).all()


def test_a_model_no_longer_ticks_its_controller_after_unwrap():
    model = chronovisor.wrap(build_toy("mixtral-tiny", seed=0))
    ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
        model.unwrap()
        model(input_ids=ids)
    assert model.controller.ticks == 1


# ----------------------------------------------------------------------------- run directories
@pytest.fixture
def run_copy(tmp_path) -> Path:
    """A copy of a published run directory (2 seeds x 7 arms), to be damaged by a test."""
    return Path(shutil.copytree(PUBLISHED_RUN, tmp_path / "run"))


def cell_file(run: Path, seed: int, variant: str, suffix: str = ".json") -> Path:
    return sorted((run / "cells").glob(f"*_s{seed}_{variant}_*{suffix}"))[0]


def test_a_cell_file_holding_another_cells_record_is_refused_naming_the_file(run_copy):
    target = cell_file(run_copy, 1, "pt")
    shutil.copy(cell_file(run_copy, 0, "pt"), target)
    with pytest.raises(RunDirError, match=f"{target}: records cell .*_s0_pt_.*, not the cell its file name says"):
        load_run(run_copy)


def test_an_edited_cell_record_whose_spec_no_longer_matches_its_id_is_refused(run_copy):
    target = cell_file(run_copy, 1, "pt")
    record = json.loads(target.read_text())
    record["spec"]["seed"] = 0
    target.write_text(json.dumps(record))
    with pytest.raises(RunDirError, match=f"{target}: its spec does not match"):
        load_run(run_copy)


def test_a_manifest_cell_id_that_leaves_the_run_directory_is_refused(run_copy):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["cells"][0] = "../../../x"
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirError, match=r"cell id '\.\./\.\./\.\./x' is not a cell file name"):
        load_run(run_copy)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda run: (run / "manifest.json").write_text(""), "manifest.json: not valid JSON"),
    (lambda run: (run / "manifest.json").write_text((run / "manifest.json").read_text()[:200]),
     "manifest.json: not valid JSON"),
    (lambda run: (run / "manifest.json").write_text("[]"), "manifest.json: expected a JSON object, got a list"),
    (lambda run: cell_file(run, 0, "off").write_text('{"cell_id": '), r"_s0_off_\w+\.json: not valid JSON"),
    (lambda run: cell_file(run, 0, "off").write_text(json.dumps(
        {k: v for k, v in json.loads(cell_file(run, 0, "off").read_text()).items() if k != "heldout"})),
     r"_s0_off_\w+\.json: not a cell record \(missing key 'heldout'\)"),
    (lambda run: cell_file(run, 0, "pt", ".routing.npz").write_bytes(
        cell_file(run, 0, "pt", ".routing.npz").read_bytes()[:100]), r"_s0_pt_\S+\.routing\.npz: not a readable"),
])
def test_a_damaged_run_file_makes_report_fail_with_one_error_naming_it(run_copy, damage, message):
    damage(run_copy)
    with pytest.raises(RunDirError, match=message):
        write_report(run_copy)


def test_the_report_command_on_a_damaged_run_exits_two_with_one_line_naming_the_file(run_copy):
    (run_copy / "manifest.json").write_text("[]")
    assert f"{run_copy / 'manifest.json'}: expected a JSON object" in one_error_line(cli("report", str(run_copy)),
                                                                                       "report")


def test_a_truncated_cached_base_is_refused_naming_it_and_saying_to_delete_it(tmp_path):
    cell = CellSpec(protocol="frozen", model="mixtral-tiny", seed=0, pt_config=None,
                    data=DataSpec(num_train=2, num_heldout=1, num_warmup=1, generator=TINY_WORLD),
                    train=TrainSpec(pretrain_steps=1, lr=1e-2))
    conversations = load_conversations(cell.data, cell.seed, cell.model, cell.protocol)
    pretrained_base(cell, conversations, tmp_path, torch.device("cpu"))
    weights = next((tmp_path / "bases").iterdir()) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(RunDirError, match=f"cached base {weights.parent} is unreadable .*; delete {weights.parent}"):
        pretrained_base(cell, conversations, tmp_path, torch.device("cpu"))


# ----------------------------------------------------------------------------- YAML
def sweep_yaml(path: Path, **changes) -> Path:
    config = {"name": "tiny", "protocol": "joint", "models": ["mixtral-tiny"], "seeds": 1,
              "data": dict(TINY_WORLD, num_train=2, num_heldout=2), "train": {"steps": 2, "lr": 1e-2},
              "eval": {"null_permutations": 10}, "grid": {"mode": ["pt"]}, **changes}
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_yaml_alias_bomb_is_refused_at_once_naming_the_file(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 600
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=f"{path}: the YAML expands to more than 100,000 values"):
        load_config(path)
    assert time.perf_counter() - started < 5.0


def test_mode_off_in_a_grid_and_in_a_set_override_is_the_off_arm_not_false(tmp_path):
    config = load_config(sweep_yaml(tmp_path / "c.yaml"), ["grid.mode=[pt, off]"])
    assert [setting["mode"] for setting in config.controller_settings()] == ["pt", "off"]
    path = tmp_path / "grid.yaml"
    path.write_text(sweep_yaml(tmp_path / "d.yaml").read_text().replace("- pt", "- pt\n  - off"))
    assert [setting["mode"] for setting in load_config(path).controller_settings()] == ["pt", "off"]


def test_the_train_command_reads_set_mode_off_as_the_mode_off(capsys, tmp_path):
    message = fails(capsys, "train", "mixtral-tiny", "--out", str(tmp_path / "c"), "--set", "mode=off", *TRAIN_ARGS)
    assert "mode 'off' ignores the controller" in message and "False" not in message


def test_an_unclosed_set_value_fails_with_one_line_naming_the_override(tmp_path):
    result = cli("sweep", str(sweep_yaml(tmp_path / "c.yaml")), "--out", str(tmp_path / "run"), "--set", "x=[unclosed")
    assert "--set 'x=[unclosed': not valid YAML" in one_error_line(result, "sweep")


# ----------------------------------------------------------------------------- validation before work
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(directory)
    return directory


def test_a_sweep_over_a_non_moe_model_directory_fails_before_any_work(capsys, tmp_path, llama_dir):
    config = sweep_yaml(tmp_path / "c.yaml", models=[str(llama_dir)], data=dict(TINY_WORLD, vocab_size=64,
                                                                                num_train=2, num_heldout=2))
    message = fails(capsys, "sweep", str(config), "--out", str(tmp_path / "run"))
    assert "models[0]" in message and "has no Mixture-of-Experts router" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("changes", "message"), [
    (dict(load={"torch_dtype": "float17"}), "load.torch_dtype: 'float17' is not a torch dtype"),
    (dict(seeds=[2**63]), r"seeds\[0\]: expected an integer in \[0, 2\*\*63\)"),
])
def test_a_sweep_value_that_would_fail_later_is_refused_by_validation(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_config(sweep_yaml(tmp_path / "c.yaml", **changes))


def test_a_malformed_jsonl_line_is_refused_by_validation_naming_file_and_line(tmp_path):
    data = tmp_path / "talks.jsonl"
    data.write_text('{"turns": ["a", "b"]}\n{"turns": ["c", \n')
    config = sweep_yaml(tmp_path / "c.yaml", data={"source": "jsonl", "path": str(data), "tokenizer": "none"})
    with pytest.raises(ConfigError, match=f"data.path: {data}:2: not valid JSON"):
        load_config(config)


def test_train_with_out_naming_an_existing_file_fails_before_loading_or_training(capsys, tmp_path):
    out = tmp_path / "taken"
    out.write_text("precious")
    message = fails(capsys, "train", "mixtral-tiny", "--out", str(out), *TRAIN_ARGS)
    assert f"--out {out}: exists and is not a directory" in message
    assert "trainable params" not in capsys.readouterr().out and out.read_text() == "precious"


def test_train_with_data_on_a_preset_and_no_tokenizer_fails_without_going_to_the_hub(capsys, tmp_path):
    data = tmp_path / "talks.jsonl"
    data.write_text('{"turns": ["a", "b"]}\n')
    assert "--data needs --tokenizer DIR" in fails(capsys, "train", "mixtral-tiny", "--out", str(tmp_path / "c"),
                                                   "--data", str(data), *TRAIN_ARGS)


# ----------------------------------------------------------------------------- the command line
@pytest.mark.parametrize(("argv", "message"), [
    (["train", "mixtral-tiny", "--out", "c", "--max-length", "0"], "argument --max-length: expected a positive integer"),
    (["train", "mixtral-tiny", "--out", "c", "--seed", str(2**63)], "argument --seed: expected a seed in [0, 2**63)"),
    (["train", "mixtral-tiny", "--out", "c", "--lr", "nan"], "argument --lr: expected a finite number > 0"),
    (["sweep", "missing.yaml", "--out", "run"], "config file not found: missing.yaml"),
])
def test_a_user_error_exits_two_with_one_line_naming_the_argument_or_file(tmp_path, argv, message):
    assert message in one_error_line(cli(*argv, cwd=tmp_path), argv[0])


def test_a_sweep_whose_out_is_a_regular_file_exits_two_naming_it(tmp_path):
    out = tmp_path / "file"
    out.write_text("")
    result = cli("sweep", str(sweep_yaml(tmp_path / "c.yaml")), "--out", str(out), "--dry-run")
    assert f"{out}: exists and is not a directory" in one_error_line(result, "sweep")


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    result = cli("--debug", "sweep", "missing.yaml", "--out", "run", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "config file not found: missing.yaml" in result.stderr


def test_help_imports_neither_torch_nor_transformers():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "chronovisor.cli", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: chronovisor" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "numpy", "yaml"}
