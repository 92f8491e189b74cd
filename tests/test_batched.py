"""Stacked frozen cells (``run_cells_stacked``, sweep ``batch_configs``) equal the sequential ones."""

import dataclasses
import json
import math

import numpy as np
import pytest
from conftest import TINY_WORLD

from chronovisor.eval.config import parse_config
from chronovisor.eval.errors import ConfigError
from chronovisor.eval.protocols import run_cell
from chronovisor.eval.record import ArmResult
from chronovisor.eval.rundir import RunDir
from chronovisor.eval.specs import CellSpec, DataSpec, EvalSpec, TrainSpec, variant_config
from chronovisor.eval.stacked import run_cells_stacked
from chronovisor.eval.sweep import plan_stacks, run_sweep, shard_stacks

DATA = DataSpec(num_train=4, num_heldout=3, num_warmup=4, generator=TINY_WORLD)
TRAIN = TrainSpec(pretrain_steps=3, lr=1e-2)
EVAL = EvalSpec(null_permutations=10, trajectory_every=2, batch_size=2)
# Fields that legitimately differ between two runs of the same cell.
VOLATILE = ("wall_time_s", "process_index")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cell(pt_config=None, seed=0, **changes):
    settings = dict(protocol="frozen", model="mixtral-tiny", seed=seed, pt_config=pt_config, data=DATA,
                    train=TRAIN, eval=EVAL)
    settings.update(changes)
    return CellSpec(**settings)


def pt(label="pt", seed=0, **fields):
    return variant_config(label, seed=seed, **{"update_every": 1, **fields})   # fields move within the warm-up


def stable(record: dict) -> dict:
    """A record's JSON without run-dependent fields, as plain data."""
    return json.loads(json.dumps({key: value for key, value in record.items() if key not in VOLATILE}, default=float))


def assert_equal(a, b, where="record"):
    """Equal structure and values; floats to float32 rounding (a C-times-larger batch may take
    other GEMM kernels, which moves some activations by an ulp), NaN equal to NaN."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), f"{where}: {a!r} vs {b!r}"
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), \
            f"{where}: {a!r} vs {b!r}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_same(stacked: ArmResult, sequential: ArmResult):
    assert_equal(stable(stacked.record.to_dict()), stable(sequential.record.to_dict()))
    assert list(stacked.routing) == list(sequential.routing)
    for name, ids in sequential.routing.items():
        np.testing.assert_array_equal(stacked.routing[name], ids)


def test_stacked_cells_give_the_records_and_routing_of_run_cell(tmp_path):
    """Off, pt at two (η, P), pressure, temperature in one stacked run; loss_free (+ off) in another."""
    grid = [cell(), cell(pt(eta=0.01, pressure_scale=0.5)), cell(pt(eta=0.05, pressure_scale=2.0)),
            cell(pt("pressure")), cell(pt("temperature", eta=0.03))]
    loss_free = [cell(pt("loss_free", pressure_scale=0.5)), cell(), cell(pt("loss_free", pressure_scale=1.0))]
    stacked = run_cells_stacked(grid, tmp_path) + run_cells_stacked(loss_free, tmp_path, stack_size=2)
    for spec, result in zip(grid + loss_free, stacked, strict=True):
        assert_same(result, run_cell(spec, tmp_path))
    # The grid is not degenerate: the configurations steer differently.
    losses = {result.record.heldout.loss for result in stacked[:5]}
    assert len(losses) >= 4


def test_cells_that_cannot_share_a_stacked_controller_raise_an_error_naming_the_setting(tmp_path):
    base = cell(pt())
    with pytest.raises(ValueError, match=r"differ in seed"):
        run_cells_stacked([base, cell(pt(seed=1), seed=1)], tmp_path)
    with pytest.raises(ValueError, match=r"differ in eval \(eval.null_permutations\)"):
        run_cells_stacked([base, cell(pt(eta=0.03), eval=dataclasses.replace(EVAL, null_permutations=12))], tmp_path)
    with pytest.raises(ValueError, match=r"controller.usage"):
        run_cells_stacked([base, cell(pt(eta=0.03, usage="ema"))], tmp_path)
    with pytest.raises(ValueError, match=r"controller.dynamics"):
        run_cells_stacked([base, cell(pt("loss_free"))], tmp_path)
    with pytest.raises(ValueError, match=r"only the frozen protocol"):
        run_cells_stacked([cell(pt(), protocol="joint"), cell(pt(eta=0.03), protocol="joint")], tmp_path)


def sweep_config(**changes):
    config = {
        "name": "stacked",
        "protocol": "frozen",
        "models": ["mixtral-tiny"],
        "seeds": 2,
        "data": dict(TINY_WORLD, num_train=4, num_heldout=3, num_warmup=3),
        "train": {"pretrain_steps": 2, "lr": 1e-2},
        "eval": {"null_permutations": 10, "trajectory_every": 2},
        "controller": {"update_every": 1},
        "grid": [{"eta": [0.01, 0.03], "pressure_scale": [0.5, 1.0], "mode": ["pt"]},
                 {"mode": ["loss_free"]}],
    }
    config.update(changes)
    return config


def read_cells(run_dir: RunDir) -> dict[str, dict]:
    cells = {}
    for path in sorted(run_dir.cells_dir.glob("*.json")):
        with np.load(run_dir.routing_path(path.stem)) as routing:
            ids = {key: routing[key].tolist() for key in routing.files}
        cells[path.stem] = {"record": stable(json.loads(path.read_text())), "routing": ids}
    return cells


def test_batch_configs_is_an_execution_setting_left_out_of_the_config_hash():
    plain = parse_config(sweep_config())
    stacked = parse_config(sweep_config(batch_configs=3))
    assert stacked.stack_size == 3 and plain.stack_size == 1
    assert stacked.config_hash == plain.config_hash            # resumable either way


def test_stacks_cover_every_cell_once_with_at_most_batch_configs_cells_each():
    cells = parse_config(sweep_config(batch_configs=3)).cells()
    stacks = plan_stacks(cells, 3)
    assert sorted(c.cell_id for stack in stacks for c in stack) == sorted(c.cell_id for c in cells)
    assert max(len(stack) for stack in stacks) == 3


def test_two_processes_take_disjoint_stacks_that_cover_every_cell_once():
    cells = parse_config(sweep_config(batch_configs=3)).cells()
    stacks = plan_stacks(cells, 3)
    shards = [shard_stacks(stacks, index, 2) for index in range(2)]
    ids = [c.cell_id for shard in shards for stack in shard for c in stack]
    assert sorted(ids) == sorted(c.cell_id for c in cells)


@pytest.fixture(scope="module")
def plain_and_stacked_runs(tmp_path_factory, one_torch_thread):
    """The same sweep one cell at a time and with ``batch_configs: 3``; the stacked run resumes a
    directory in which one cell of the first stack had already finished."""
    root = tmp_path_factory.mktemp("stacking")
    plain, stacked = RunDir(root / "plain"), RunDir(root / "stacked")
    run_sweep(parse_config(sweep_config()), plain, progress=False)
    config = parse_config(sweep_config(batch_configs=3))
    finished_first = plan_stacks(config.cells(), 3)[0][1]
    stacked.save_cell(run_cell(finished_first, stacked))
    outcome = run_sweep(config, stacked, progress=False)
    return plain, stacked, config, finished_first, outcome


def test_a_resumed_stacked_sweep_runs_only_the_unfinished_cells_of_a_stack(plain_and_stacked_runs):
    _, _, config, finished_first, outcome = plain_and_stacked_runs
    assert finished_first.cell_id in outcome.skipped and finished_first.cell_id not in outcome.ran
    assert outcome.complete and len(outcome.ran) == len(config.cells()) - 1


def test_a_stacked_sweep_writes_the_cells_of_a_sweep_one_cell_at_a_time(plain_and_stacked_runs):
    plain, stacked, *_ = plain_and_stacked_runs
    assert_equal(read_cells(stacked), read_cells(plain))


def test_rerunning_a_finished_stacked_sweep_runs_nothing(plain_and_stacked_runs):
    _, stacked, config, *_ = plain_and_stacked_runs
    assert run_sweep(config, stacked, progress=False).ran == []


def test_batch_configs_must_be_an_integer_of_at_least_one():
    with pytest.raises(ConfigError, match="batch_configs"):
        parse_config(sweep_config(batch_configs=0))
    with pytest.raises(ConfigError, match="batch_configs"):
        parse_config(sweep_config(batch_configs="9"))


def test_batch_configs_is_refused_outside_the_frozen_protocol():
    with pytest.raises(ConfigError, match="batch_configs: .*frozen"):
        parse_config(sweep_config(protocol="joint", train={"steps": 2}, batch_configs=4))


def test_a_misspelt_batch_configs_key_is_an_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown top-level key"):
        parse_config(sweep_config(stack_configs=4))
