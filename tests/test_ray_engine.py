"""The Ray engine on a real local Ray cluster: a head and a second node on this machine, one CPU each.

The cluster is started with ``ray start`` in two new process groups and torn down by killing
exactly those groups (and any process that names this cluster's temporary directory), never
with ``ray stop``, which would stop every Ray on the machine.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TINY_WORLD
from test_sweep import cli_env, free_port, write_config

from chronovisor.eval.config import parse_config
from chronovisor.eval.rundir import RunDir
from chronovisor.eval.sweep import run_sweep

CONFIG = {
    "name": "ray-tiny",
    "protocol": "joint",
    "models": ["mixtral-tiny"],
    "seeds": [0],
    "data": dict(TINY_WORLD, num_train=4, num_heldout=3),
    "train": {"steps": 4, "lr": 1e-2},
    "eval": {"null_permutations": 10, "trajectory_every": 2},
    "grid": {"eta": [0.03], "pressure_scale": [1.0]},
}


def _kill_cluster(groups: list[int], temp_dir: str) -> None:
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


@pytest.fixture(scope="module")
def ray_cluster():
    """``HOST:PORT`` of a two-node Ray cluster on this machine (1 CPU per node, no GPU, no dashboard)."""
    ray = str(Path(sys.executable).with_name("ray"))
    temp_dir = tempfile.mkdtemp(prefix="cvray-", dir="/tmp")             # Ray's socket paths must stay short
    port = free_port()
    common = ["--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir}", "--object-store-memory=80000000",
              "--disable-usage-stats"]
    groups = []
    try:
        for role in (["--head", f"--port={port}", "--include-dashboard=false"], [f"--address=127.0.0.1:{port}"]):
            start = subprocess.Popen([ray, "start", *role, *common], env=cli_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
            groups.append(start.pid)                      # its daemons stay in this process group
            output = start.communicate(timeout=180)[0]
            assert start.returncode == 0, output[-3000:]
        yield f"127.0.0.1:{port}"
    finally:
        _kill_cluster(groups, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def local_and_ray_runs(ray_cluster, tmp_path_factory, one_torch_thread):
    """A two-cell sweep by the local engine (this process, one thread) and by ``--engine ray`` on the cluster."""
    root = tmp_path_factory.mktemp("ray")
    local = RunDir(root / "local")
    run_sweep(parse_config(CONFIG), local, progress=False)
    config_path = write_config(root / "tiny.yaml", CONFIG)
    command = [sys.executable, "-m", "chronovisor.cli", "sweep", str(config_path), "--out", str(root / "ray"),
               "--engine", "ray", "--address", ray_cluster, "--no-progress"]
    first = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    return local, RunDir(root / "ray"), command, first


def _content(run_dir: RunDir, cell_id: str) -> dict:
    record = json.loads(run_dir.cell_path(cell_id).read_text())
    return {key: value for key, value in record.items() if key not in ("wall_time_s", "process_index")}


def test_the_ray_engine_writes_every_cell_with_the_records_and_routing_of_the_local_engine(local_and_ray_runs):
    local, ray_run, _, first = local_and_ray_runs
    cells = parse_config(CONFIG).cells()
    assert "[ray] ran 2 cells, skipped 0 finished; run complete (2 cells)" in first.stderr
    for cell in cells:
        assert _content(ray_run, cell.cell_id) == _content(local, cell.cell_id)
        for layer, ids in local.read_routing(cell.cell_id).items():
            assert (ray_run.read_routing(cell.cell_id)[layer] == ids).all()
    assert json.loads(ray_run.manifest_path.read_text())["finished"] is not None
    assert not list(ray_run.claims_dir.glob("*"))


def test_rerunning_the_ray_sweep_after_a_crash_runs_only_the_lost_cell_and_clears_the_dead_claim(local_and_ray_runs):
    """A crash mid-cell leaves no cell file and a claim file no process holds; rerunning the command resumes."""
    local, ray_run, command, _ = local_and_ray_runs
    lost = parse_config(CONFIG).cells()[-1].cell_id
    ray_run.cell_path(lost).unlink()
    (ray_run.claims_dir / f"{lost}.claim").write_text('{"host": "crashed", "pid": 1}\n')
    again = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[ray] ran 1 cells, skipped 1 finished; run complete (2 cells)" in again.stderr
    assert _content(ray_run, lost) == _content(local, lost)
    assert not list(ray_run.claims_dir.glob("*"))


def test_killing_the_live_driver_mid_cell_then_rerunning_the_command_finishes_with_the_local_records(
        local_and_ray_runs, tmp_path):
    """SIGKILL the whole driver process group while a trial holds a claim; Ray ends the job's trials, and the
    same command then runs what was lost and nothing twice."""
    local, _, command, _ = local_and_ray_runs
    command = [*command[:command.index("--out") + 1], str(tmp_path / "killed"), *command[command.index("--out") + 2:]]
    run = RunDir(tmp_path / "killed")
    driver = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run.claims_dir.is_dir() and any(run.claims_dir.glob("*.claim"))):
        assert driver.poll() is None, "the sweep ended before any trial claimed a cell"
        assert time.monotonic() < deadline, "no trial claimed a cell within 300 s"
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    cells = [cell.cell_id for cell in parse_config(CONFIG).cells()]
    assert not all(run.is_finished(cell) for cell in cells), "the kill came after every cell was finished"
    while list(run.claims_dir.glob("*.claim")):       # the trials of the dead driver's job end and drop their claims
        run.clean_stale()
        assert time.monotonic() < deadline, "a trial of the killed driver still holds its claim after 300 s"
        time.sleep(0.2)
    unfinished = [cell for cell in cells if not run.is_finished(cell)]     # a trial may have finished one meanwhile

    again = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"[ray] ran {len(unfinished)} cells, skipped {2 - len(unfinished)} finished; run complete (2 cells)" \
        in again.stderr
    for cell in cells:
        assert _content(run, cell) == _content(local, cell)
    assert not list(run.claims_dir.glob("*"))
