"""``chronovisor reproduce``: re-run cells of a published run and compare (in-process via ``cli.main``).

One tiny joint run (2 seeds, placebo and pt arms) is swept once per module and treated as published;
tests that tamper with it work on a copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_WORLD
from scipy import stats

from chronovisor import cli
from chronovisor.eval.config import parse_config
from chronovisor.eval.reproduce import choose_cells, load_published, prediction_interval
from chronovisor.eval.sweep import run_sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = {
    "name": "tiny-published",
    "protocol": "joint",
    "models": ["mixtral-tiny"],
    "seeds": 2,
    "data": dict(TINY_WORLD, num_train=4, num_heldout=3),
    "train": {"steps": 4, "lr": 1e-2},
    "eval": {"null_permutations": 10, "trajectory_every": 2},
    "grid": {"mode": ["placebo", "pt"]},
}


def reproduce(*argv: str) -> tuple[int, str]:
    """``chronovisor reproduce ARGV --no-progress``: (exit status, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["reproduce", *argv, "--no-progress"])
    return status, out.getvalue()


def refused(capsys, *argv: str) -> str:
    """The one stderr line of ``chronovisor reproduce ARGV``, which must exit with the user-error status 2."""
    status, _ = reproduce(*argv)
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("chronovisor reproduce: error: ") and err.count("\n") == 1, err
    return err


def tree_digest(path: Path) -> str:
    """Names, contents and modification times of every file under ``path``."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*")):
        digest.update(str(file.relative_to(path)).encode())
        if file.is_file():
            digest.update(file.read_bytes())
            digest.update(str(file.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def edit_record(run: Path, cell_id: str, edit) -> None:
    path = run / "cells" / f"{cell_id}.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record, indent=2))


@pytest.fixture(scope="module")
def published(tmp_path_factory, one_torch_thread) -> Path:
    run = tmp_path_factory.mktemp("published") / "run"
    run_sweep(parse_config(CONFIG), run, progress=False)
    return run


@pytest.fixture(scope="module")
def untouched(published, tmp_path_factory):
    """``reproduce --cells 2`` of the published run: (status, stdout, digest before, digest after, scratch)."""
    scratch = tmp_path_factory.mktemp("scratch") / "rerun"
    before = tree_digest(published)
    status, out = reproduce(str(published), "--cells", "2", "--out", str(scratch))
    return status, out, before, tree_digest(published), scratch


@pytest.fixture
def copy(published, tmp_path) -> Path:
    return Path(shutil.copytree(published, tmp_path / "published"))


def first_choice(run: Path) -> tuple[str, str]:
    """(on cell id, off cell id) of what ``--cells 1`` re-runs."""
    cell = choose_cells(load_published(run), 1)[0]
    return cell.cell_id, cell.paired_off().cell_id


# ------------------------------------------------------------------------------ verdicts
def test_reproducing_two_cells_of_an_untouched_run_is_bit_identical_and_exits_zero(untouched):
    status, out, *_ = untouched
    lines = [line for line in out.splitlines() if ": bit-identical;" in line]
    assert status == 0
    assert len(lines) == 2
    assert "reproduced: 2/2 bit-identical, 0 inside the interval, 0 not reproduced" in out


def test_reproduce_prints_the_published_and_current_numerics_and_the_scratch_directory(untouched):
    _, out, _, _, scratch = untouched
    assert "published: commit" in out and "numerics device=cpu, torch_threads=1" in out
    assert "here:      commit" in out
    assert f"into {scratch}" in out
    assert sorted(p.name for p in (scratch / "cells").glob("*.json")) and (scratch / "manifest.json").is_file()


def test_reproduce_leaves_the_published_directory_unchanged(untouched):
    _, _, before, after, _ = untouched
    assert before == after


def test_a_tampered_published_held_out_loss_is_reported_as_same_numerics_different_result(copy):
    on_id, _ = first_choice(copy)
    edit_record(copy, on_id, lambda record: record["heldout"].update(loss=record["heldout"]["loss"] + 1e-3))
    status, out = reproduce(str(copy), "--cells", "1", "--out", str(copy.parent / "scratch"))
    line = next(line for line in out.splitlines() if line.startswith(on_id))
    assert "bit-identical" not in line
    assert "same numerics, different result (differs: held-out loss)" in line
    assert "(1 with same numerics, different result)" in out


def test_an_arm_whose_published_losses_are_all_shifted_is_not_reproduced_and_exits_one(copy):
    on_id, _ = first_choice(copy)
    arm = load_published(copy).records[on_id].variant
    for path in (copy / "cells").glob("*.json"):
        if json.loads(path.read_text())["variant"] == arm:
            edit_record(copy, path.stem, lambda record: record["heldout"].update(loss=2 * record["heldout"]["loss"]))
    status, out = reproduce(str(copy), "--cells", "1", "--out", str(copy.parent / "scratch"))
    assert status == 1
    assert f"{on_id}: not reproduced;" in out
    assert "reproduced: 0/1 bit-identical, 0 inside the interval, 1 not reproduced" in out


def test_a_cell_published_under_other_numerics_is_judged_by_the_interval(copy):
    on_id, _ = first_choice(copy)
    edit_record(copy, on_id, lambda record: record["numerics"].update(torch_threads=7))
    status, out = reproduce(str(copy), "--cells", "1", "--out", str(copy.parent / "scratch"))
    assert status == 0
    assert f"{on_id}: inside the interval;" in out
    assert "published under other numerics (device=cpu, torch_threads=7; values equal)" in out
    assert "numerics device=cpu, torch_threads=1 | device=cpu, torch_threads=7" in out


def test_a_stacked_frozen_run_with_a_pretrained_base_reproduces_bit_identically(tmp_path):
    config = dict(CONFIG, protocol="frozen", seeds=1, batch_configs=2, train={"pretrain_steps": 3, "lr": 1e-2},
                  data=dict(CONFIG["data"], num_warmup=2))
    run_sweep(parse_config(config), tmp_path / "frozen", progress=False)
    status, out = reproduce(str(tmp_path / "frozen"), "--cells", "2", "--out", str(tmp_path / "scratch"))
    assert status == 0
    assert "reproduced: 2/2 bit-identical" in out
    assert list((tmp_path / "scratch" / "bases").iterdir())


# ----------------------------------------------------------------------- choosing cells
def test_cells_are_chosen_round_robin_over_arms_with_each_arm_starting_at_another_seed(published):
    chosen = [(cell.variant, cell.seed) for cell in choose_cells(load_published(published), 3)]
    assert chosen == [("placebo", 0), ("pt", 1), ("placebo", 1)]


def test_asking_for_more_cells_than_published_chooses_every_on_cell_once(published):
    chosen = [cell.cell_id for cell in choose_cells(load_published(published), 99)]
    assert len(chosen) == len(set(chosen)) == 4


def test_the_prediction_interval_is_mean_plus_minus_t_sd_times_root_one_plus_one_over_n():
    values = [0.3, -0.1, 0.5, 0.2]
    interval = prediction_interval(values)
    half = stats.t.ppf(0.975, 3) * np.std(values, ddof=1) * math.sqrt(1 + 1 / 4)
    assert interval.low == pytest.approx(np.mean(values) - half)
    assert interval.high == pytest.approx(np.mean(values) + half)
    assert not prediction_interval([0.3]).contains(0.3)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("missing", ["manifest.json", "config.yaml", "cells"])
def test_a_run_directory_missing_a_part_exits_two_with_one_line_naming_it(capsys, copy, missing):
    target = copy / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert str(target) in refused(capsys, str(copy), "--cells", "1")


def test_a_cell_file_holding_another_cells_record_exits_two_naming_the_file(capsys, copy):
    on_id, _ = first_choice(copy)
    foreign = copy / "cells" / "joint_mixtral-tiny_s0_pt_eta0.5_P0.5_00000000.json"
    shutil.copy(copy / "cells" / f"{on_id}.json", foreign)
    message = refused(capsys, str(copy), "--cells", "1")
    assert f"{foreign}: records cell {on_id!r}, not the cell its file name says" in message


def test_a_cell_record_of_another_run_exits_two_naming_the_file(capsys, copy):
    on_id, _ = first_choice(copy)
    foreign = copy / "cells" / "joint_other_s9_pt_00000000.json"
    edit_record(copy, on_id, lambda record: record.update(cell_id=foreign.stem))
    (copy / "cells" / f"{on_id}.json").rename(foreign)
    message = refused(capsys, str(copy), "--cells", "1")
    assert f"{foreign}: cell {foreign.stem} is not a cell of {copy / 'config.yaml'}" in message


def test_a_scratch_directory_inside_the_published_run_is_refused(capsys, copy):
    assert "reproduce never writes there" in refused(capsys, str(copy), "--cells", "1", "--out", str(copy / "scratch"))
    assert not (copy / "scratch").exists()


def test_the_rerun_uses_the_published_thread_count_by_default(published, tmp_path, capsys):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main(["reproduce", str(published), "--cells", "1", "--out", str(tmp_path / "re"),
                         "--no-progress"]) == 0
    finally:
        torch.set_num_threads(previous)
    assert "here:" in capsys.readouterr().out
    record = json.loads(next((tmp_path / "re" / "cells").glob("*.json")).read_text())
    assert record["numerics"]["torch_threads"] == 1


@pytest.mark.parametrize("run", sorted(path.parent.name for path in
                                       (Path(__file__).resolve().parent.parent / "docs" / "results").glob("*/manifest.json")))
def test_every_published_run_is_read_back_by_this_code_with_its_manifests_config_hash_and_cells(run):
    """A setting added later with a default that changes nothing (e.g. train.lr_warmup_steps 0) must leave
    the runs published before it reproducible and resumable."""
    published = load_published(Path(__file__).resolve().parent.parent / "docs" / "results" / run)
    assert published.records
