"""Sweep configs, cells, resume after SIGKILL and 2-process sharding (real subprocesses)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_WORLD

from chronovisor import cli
from chronovisor.eval.config import load_config, parse_config
from chronovisor.eval.errors import ConfigError, RunDirError
from chronovisor.eval.report import write_report
from chronovisor.eval.rundir import RunDir
from chronovisor.eval.sweep import claim_order, plan_stacks, run_sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**changes):
    config = {
        "name": "tiny",
        "protocol": "joint",
        "models": ["mixtral-tiny"],
        "seeds": 2,
        "data": dict(TINY_WORLD, num_train=4, num_heldout=3),
        "train": {"steps": 6, "lr": "1e-2"},  # a string, as YAML reads 1e-2: accepted as a number
        "eval": {"null_permutations": 10, "trajectory_every": 2},
        "grid": {"eta": [0.01, 0.03], "pressure_scale": [1.0]},
    }
    config.update(changes)
    return {key: value for key, value in config.items() if value is not None}


def test_the_workers_of_a_sweep_over_several_seeds_start_on_different_seeds_each_owning_whole_seeds():
    """The arms of a frozen seed share a pretrained base: two workers starting on one seed would leave one
    of them waiting for the other's base."""
    config = parse_config(tiny_config(protocol="frozen", seeds=3, train={"steps": 2, "pretrain_steps": 2}))
    stacks = plan_stacks(config.cells(), 1)
    arms = len(stacks) // 3
    seeds_in_order = [[stack[0].seed for stack in claim_order(stacks, index, 2)] for index in range(2)]
    assert seeds_in_order == [[0] * arms + [2] * arms + [1] * arms, [1] * arms + [0] * arms + [2] * arms]


def test_the_workers_of_a_one_seed_sweep_still_start_on_different_stacks():
    stacks = plan_stacks(parse_config(tiny_config(seeds=1)).cells(), 1)
    assert claim_order(stacks, 0, 2)[0] is not claim_order(stacks, 1, 2)[0]


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


# ------------------------------------------------------------------------------ configs
def test_grid_expands_with_one_shared_off_arm_per_seed():
    config = parse_config(tiny_config(grid={"eta": [0.01, 0.03], "pressure_scale": [0.5, 1.0]}))
    cells = config.cells()
    off = [cell for cell in cells if cell.is_off]
    on = [cell for cell in cells if not cell.is_off]
    assert len(off) == 2 and len(on) == 8
    assert len({cell.cell_id for cell in cells}) == len(cells)
    for cell in on:
        assert cell.paired_off().cell_id in {o.cell_id for o in off}
        assert cell.pt_config.seed == cell.seed
    assert config.train.lr == 0.01


def test_grid_accepts_a_union_of_grids_and_the_ablation_labels():
    config = parse_config(tiny_config(grid=[{"mode": ["off", "pressure", "temperature", "pt", "loss_free"]},
                                            {"mode": ["pt"], "eta": [0.0]}]))
    variants = sorted(cell.variant for cell in config.cells() if cell.seed == 0)
    assert variants == ["loss_free", "off", "pressure", "pt", "pt", "temperature"]


@pytest.mark.parametrize("change, key", [
    ({"protocl": "joint"}, "protocl"),
    ({"protocol": "online"}, "protocol"),
    ({"models": ["mixtral-2l9e"]}, "models[0]"),
    ({"seeds": [0, 0]}, "seeds"),
    ({"train": {"steps": "ten"}}, "train.steps"),
    ({"train": {"stepz": 3}}, "train.stepz"),
    ({"data": {"vocab_size": 4}}, "vocab_size"),
    ({"eval": {"null_permutations": 1}}, "eval.null_permutations"),
    ({"grid": {"eta": [0.01, 2.0]}}, "eta"),
    ({"grid": {"eta": 0.01}}, "grid.eta"),
    ({"grid": {"temperture": [1.0]}}, "grid.temperture"),
    ({"grid": {"mode": ["warm"]}}, "grid.mode[0]"),
    ({"controller": {"seed": 3}}, "controller.seed"),
    ({"controller": {"usage": "fossil"}}, "usage"),
    ({"data": dict(TINY_WORLD, vocab_size=2000, phase_vocab_size=12)}, "data.vocab_size"),
])
def test_bad_configs_fail_naming_the_key(change, key):
    with pytest.raises(ConfigError) as error:
        parse_config(tiny_config(**change))
    assert key in str(error.value)


def test_a_bad_config_fails_in_the_cli_naming_file_and_key_before_any_work(capsys, tmp_path):
    config = write_config(tmp_path / "bad.yaml", tiny_config(train={"steps": 6, "learning_rate": 1e-3}))
    out = tmp_path / "run"
    assert cli.main(["sweep", str(config), "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert message.startswith("chronovisor sweep: error: ") and message.count("\n") == 1
    assert str(config) in message and "train.learning_rate" in message
    assert not out.exists()


def test_a_bad_config_exits_with_status_two_and_one_line_on_stderr(tmp_path):
    config = write_config(tmp_path / "bad.yaml", tiny_config(seeds=0))
    completed = subprocess.run([sys.executable, "-m", "chronovisor.cli", "sweep", str(config), "--out",
                                str(tmp_path / "run")], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [completed.stderr.strip()]
    assert "seeds" in completed.stderr


@pytest.fixture
def model_dir(tmp_path):
    from chronovisor.wrappers import build_toy

    directory = tmp_path / "my-model"
    build_toy("mixtral-tiny").save_pretrained(directory)
    return directory


def test_environment_variables_in_the_config_are_expanded(tmp_path, monkeypatch, model_dir):
    path = write_config(tmp_path / "c.yaml", tiny_config(models=None, model="${MODEL_DIR}"))
    monkeypatch.delenv("MODEL_DIR", raising=False)
    with pytest.raises(ConfigError, match="MODEL_DIR"):
        load_config(path)
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    assert load_config(path).models == (str(model_dir),)


def test_set_overrides_edit_the_config_before_validation(tmp_path, monkeypatch, model_dir):
    path = write_config(tmp_path / "c.yaml", tiny_config(models=None, model="${MODEL_DIR}"))
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    config = load_config(path, ["train.steps=3", "grid.eta=[0.02]"])
    assert config.train.steps == 3 and config.grid[0]["eta"] == (0.02,)
    with pytest.raises(ConfigError, match="model"):
        load_config(path, [f"model={tmp_path / 'missing'}"])


def test_a_malformed_set_override_names_the_expected_form(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(write_config(tmp_path / "c.yaml", tiny_config()), ["train.steps"])


# ------------------------------------------------------------------- resume and sharding
def test_sigkilled_sweep_resumes_to_the_same_summary(tmp_path):
    """All three runs are CLI subprocesses with one environment, so every cell runs under equal numerics."""
    config_path = write_config(tmp_path / "tiny.yaml", tiny_config())

    def sweep_command(out: Path) -> list[str]:
        return [sys.executable, "-m", "chronovisor.cli", "sweep", str(config_path), "--out", str(out), "--no-progress"]

    reference = tmp_path / "uninterrupted"
    subprocess.run(sweep_command(reference), env=cli_env(), check=True, capture_output=True, timeout=300)
    write_report(reference)
    with pytest.raises(RunDirError, match="another config"):
        run_sweep(parse_config(tiny_config(seeds=[5])), reference, progress=False)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(sweep_command(interrupted), env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    cells = RunDir(interrupted).cells_dir
    deadline = time.monotonic() + 120
    while not (cells.is_dir() and any(cells.glob("*.json"))):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no cell finished in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = sorted(path.name for path in cells.glob("*.json"))
    total = len(parse_config(tiny_config()).cells())
    assert 1 <= len(finished) < total
    assert json.loads(RunDir(interrupted).manifest_path.read_text())["finished"] is None
    before = {name: (cells / name).read_text() for name in finished}

    resumed = subprocess.run(sweep_command(interrupted), env=cli_env(), check=True, capture_output=True, text=True,
                             timeout=300)
    assert f"skipped {len(finished)} finished" in resumed.stderr
    manifest = json.loads(RunDir(interrupted).manifest_path.read_text())
    assert manifest["finished"] is not None and len(manifest["resumed"]) == 1
    assert all((cells / name).read_text() == text for name, text in before.items())  # kept, not redone
    assert not list(cells.glob(".*.tmp"))
    assert not list(RunDir(interrupted).claims_dir.glob("*"))       # the killed workers' claims were cleaned up
    write_report(interrupted)
    assert (interrupted / "summary.md").read_text() == (reference / "summary.md").read_text()


def test_two_accelerate_processes_share_the_cells_so_that_each_cell_runs_exactly_once(tmp_path):
    config_path = write_config(tmp_path / "tiny.yaml", tiny_config(seeds=[0, 1, 2], grid={"eta": [0.03]}))
    out = tmp_path / "run"
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "chronovisor.cli", "sweep", str(config_path), "--out", str(out), "--no-progress"]
    launcher = Path(sys.executable).with_name("accelerate")
    completed = subprocess.run([str(launcher)] + command[1:], env=cli_env(), capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    cells = parse_config(tiny_config(seeds=[0, 1, 2], grid={"eta": [0.03]})).cells()
    ran = {int(line[1]) - 1: int(line.split(" ran ")[1].split()[0]) for line in completed.stderr.splitlines()
           if "] ran " in line}
    assert sorted(ran) == [0, 1] and sum(ran.values()) == len(cells)
    indices = [json.loads(RunDir(out).cell_path(cell.cell_id).read_text())["process_index"] for cell in cells]
    assert {index: indices.count(index) for index in ran} == ran           # each cell by the process that says so
    assert json.loads(RunDir(out).manifest_path.read_text())["finished"] is not None


# ------------------------------------------------------------------- workers and claims
CLAIMER = """
import sys, time
from chronovisor.eval.rundir import RunDir
claim = RunDir(sys.argv[1]).try_claim(sys.argv[2])
print("held" if claim is not None else "busy", flush=True)
if claim is not None and sys.argv[3] == "hold":
    time.sleep(600)
"""


def claimer(run_dir: RunDir, name: str, hold: bool) -> subprocess.Popen:
    """Another process trying to claim ``name``; it prints held / busy (and, holding, sleeps)."""
    return subprocess.Popen([sys.executable, "-c", CLAIMER, str(run_dir.path), name, "hold" if hold else "release"],
                            stdout=subprocess.PIPE, text=True, env=cli_env())


def test_a_claimed_stack_cannot_be_claimed_by_another_process_until_the_holder_releases_it(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    claim = run_dir.try_claim("stack")
    assert claim is not None
    assert claimer(run_dir, "stack", hold=False).communicate(timeout=60)[0].strip() == "busy"
    claim.release()
    assert not (run_dir.claims_dir / "stack.claim").exists()
    assert claimer(run_dir, "stack", hold=False).communicate(timeout=60)[0].strip() == "held"


def test_the_claim_of_a_killed_process_is_free_again_and_the_next_run_removes_what_dead_writers_left(tmp_path):
    from chronovisor.eval.rundir import temporary_path

    run_dir = RunDir(tmp_path / "run")
    holder = claimer(run_dir, "stack", hold=True)
    assert holder.stdout.readline().strip() == "held"
    assert run_dir.try_claim("stack") is None
    run_dir.cells_dir.mkdir(parents=True)
    dead_write = temporary_path(run_dir.cell_path("a"), pid=holder.pid)
    live_write = temporary_path(run_dir.cell_path("b"))
    for path in (dead_write, live_write):
        path.write_text("{")
    holder.kill()
    holder.wait()

    removed = run_dir.clean_stale()
    assert sorted(removed) == sorted([run_dir.claims_dir / "stack.claim", dead_write])
    assert live_write.exists()                                       # this process is alive: its write stays
    with run_dir.try_claim("stack") as claim:
        assert claim is not None
        assert json.loads(claim.path.read_text())["pid"] == os.getpid()


@pytest.fixture(scope="module")
def shared_and_sequential_runs(tmp_path_factory, one_torch_thread):
    """The tiny sweep run in this process, one cell after another; and by two ``chronovisor sweep``
    processes started together on one directory, the first with a pool of two workers."""
    root = tmp_path_factory.mktemp("workers")
    config = tiny_config()
    config_path = write_config(root / "tiny.yaml", config)
    sequential = root / "sequential"
    run_sweep(parse_config(config), sequential, progress=False)
    shared = root / "shared"
    processes = [subprocess.Popen([sys.executable, "-m", "chronovisor.cli", "sweep", str(config_path), "--out",
                                   str(shared), "--no-progress", "--workers", workers], env=cli_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for workers in ("2", "1")]
    stderrs = [process.communicate(timeout=600)[1] for process in processes]
    for process, stderr in zip(processes, stderrs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    return RunDir(sequential), RunDir(shared), parse_config(config).cells(), stderrs


def test_two_sweeps_on_one_directory_one_with_two_workers_run_each_cell_exactly_once(shared_and_sequential_runs):
    _, shared, cells, stderrs = shared_and_sequential_runs
    ran = [int(stderr.split("] ran ")[1].split()[0]) for stderr in stderrs]
    assert sum(ran) == len(cells)
    assert all(shared.is_finished(cell.cell_id) for cell in cells)
    assert json.loads(shared.manifest_path.read_text())["finished"] is not None
    assert not list(shared.claims_dir.glob("*"))


def test_cells_run_by_worker_processes_have_the_records_of_one_process_running_them_in_turn(shared_and_sequential_runs):
    sequential, shared, cells, _ = shared_and_sequential_runs

    def content(run_dir: RunDir, cell_id: str) -> dict:
        record = json.loads(run_dir.cell_path(cell_id).read_text())
        return {key: value for key, value in record.items() if key not in ("wall_time_s", "process_index")}

    for cell in cells:
        assert content(shared, cell.cell_id) == content(sequential, cell.cell_id)
        for layer, ids in sequential.read_routing(cell.cell_id).items():
            assert (shared.read_routing(cell.cell_id)[layer] == ids).all()


# ------------------------------------------------------------------- the shipped configs
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_shipped_configs_validate(name, tmp_path, monkeypatch):
    from chronovisor.wrappers import build_toy

    build_toy("mixtral-tiny").save_pretrained(tmp_path / "model")
    (tmp_path / "chats.jsonl").write_text('{"turns": ["hello"]}\n')
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("CONVERSATIONS", str(tmp_path / "chats.jsonl"))
    config = load_config(CONFIGS / name)
    assert config.cells()


#: The shipped study configs on the synthetic world.
STUDY_CONFIGS = ["headline_frozen_learned", "headline_joint_learned", "ablation_mixtral_2l8e", "sweep_eta_p",
                 "scaling_mixtral_4l16e", "switch_2l8e", "expertchoice_2l8e_learned", "expertchoice_2l8e_grid"]
#: The configs of published runs, kept as those runs ran (their models do not beat the count bigram).
KEPT_AS_THEY_RAN = ["headline_joint", "headline_frozen", "expertchoice_2l8e"]


def test_every_shipped_config_is_a_study_a_published_runs_record_the_demo_or_the_pretrained_template():
    shipped = {path.stem for path in CONFIGS.glob("*.yaml")}
    assert shipped == set(STUDY_CONFIGS) | set(KEPT_AS_THEY_RAN) | {"quickstart", "pretrained_frozen"}
    for name in KEPT_AS_THEY_RAN:
        assert (CONFIGS / f"{name}.yaml").read_text().startswith("# KEPT AS IT RAN, for the published run")


@pytest.mark.parametrize("name", STUDY_CONFIGS)
def test_study_configs_see_each_training_conversation_once_in_a_random_phase_order_beside_a_placebo(name):
    sweep = load_config(CONFIGS / f"{name}.yaml")
    training_steps = sweep.train.pretrain_steps if sweep.protocol == "frozen" else sweep.train.steps
    assert sweep.data.num_train >= training_steps * sweep.train.batch_size
    assert sweep.data.conversation_config.random_phase_order
    assert "placebo" in {cell.arm for cell in sweep.cells()}
    assert all(contrast.name == "pt - off" for contrast in sweep.primary)


def test_the_switch_and_scaling_studies_declare_pt_vs_off_as_their_primary_contrast():
    for name in ("switch_2l8e", "scaling_mixtral_4l16e"):
        assert [contrast.name for contrast in load_config(CONFIGS / f"{name}.yaml").primary] == ["pt - off"]


def test_pretrained_frozen_config_runs_on_a_model_directory_with_jsonl(tmp_path, monkeypatch):
    """configs/pretrained_frozen.yaml end to end on a small saved model with its own tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from chronovisor.wrappers import build_toy

    words = "hello there how are you i am fine thanks what about the weather it is sunny today".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "[PAD]"] + words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "model"
    build_toy("mixtral-tiny", seed=3).save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(model_dir)
    rng = __import__("random").Random(0)
    lines = [json.dumps({"turns": [" ".join(rng.choices(words, k=rng.randint(3, 8))) for _ in range(rng.randint(2, 5))]})
             for _ in range(12)]
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    monkeypatch.setenv("CONVERSATIONS", str(tmp_path / "chats.jsonl"))
    config = load_config(CONFIGS / "pretrained_frozen.yaml",
                         ["seeds=1", "data.num_warmup=4", "eval.null_permutations=5", "grid.mode=[pt]"])
    outcome = run_sweep(config, tmp_path / "run", progress=False)
    assert outcome.complete and len(outcome.ran) == 2
    text = write_report(tmp_path / "run").summary_path.read_text()
    assert "| frozen |" in text


def test_a_saved_config_parses_back_to_the_same_hash_and_cells():
    from chronovisor.eval.config import parse_resolved

    config = parse_config(tiny_config(primary=["pt - off"], grid={"mode": ["placebo", "pt"]}))
    again = parse_resolved(yaml.safe_load(yaml.safe_dump(config.resolved)))
    assert again.config_hash == config.config_hash
    assert [cell.cell_id for cell in again.cells()] == [cell.cell_id for cell in config.cells()]
