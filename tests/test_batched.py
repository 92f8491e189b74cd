"""Stacked frozen cells (``run_cells_stacked``, sweep ``batch_configs``) equal the sequential ones."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from chronovisor.eval import protocols as P
from chronovisor.eval import sweep
from chronovisor.eval.sweep import ConfigError, parse_config

TINY_WORLD = dict(vocab_size=64, phase_vocab_size=12, topic_vocab_size=8, min_turn_length=4, max_turn_length=8,
                  min_length=32, max_length=56)
DATA = P.DataSpec(num_train=4, num_heldout=3, num_warmup=4, generator=TINY_WORLD)
TRAIN = P.TrainSpec(pretrain_steps=3, lr=1e-2)
EVAL = P.EvalSpec(null_permutations=10, trajectory_every=2, batch_size=2)
# Fields that legitimately differ between two runs of the same cell.
VOLATILE = ("wall_time_s", "process_index")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cell(controller=None, seed=0, **changes):
    settings = dict(protocol="frozen", model="mixtral-tiny", seed=seed, controller=controller, data=DATA,
                    train=TRAIN, eval=EVAL)
    settings.update(changes)
    return P.CellSpec(**settings)


def pt(label="pt", seed=0, **fields):
    return P.variant_config(label, seed=seed, **{"update_every": 1, **fields})   # fields move within the warm-up


def stable(record) -> dict:
    """The record without run-dependent fields, as plain JSON data."""
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


def assert_same(stacked: P.ArmResult, sequential: P.ArmResult):
    assert_equal(stable(stacked.record), stable(sequential.record))
    assert list(stacked.routing) == list(sequential.routing)
    for name, ids in sequential.routing.items():
        np.testing.assert_array_equal(stacked.routing[name], ids)


def test_stacked_cells_equal_run_cell(tmp_path):
    """Off, pt at two (η, P), pressure, temperature in one stacked run; loss_free (+ off) in another."""
    grid = [cell(), cell(pt(eta=0.01, pressure_scale=0.5)), cell(pt(eta=0.05, pressure_scale=2.0)),
            cell(pt("pressure")), cell(pt("temperature", eta=0.03))]
    loss_free = [cell(pt("loss_free", pressure_scale=0.5)), cell(), cell(pt("loss_free", pressure_scale=1.0))]
    stacked = P.run_cells_stacked(grid, tmp_path) + P.run_cells_stacked(loss_free, tmp_path, max_group=2)
    for spec, result in zip(grid + loss_free, stacked, strict=True):
        assert_same(result, P.run_cell(spec, tmp_path))
    # The grid is not degenerate: the configurations steer differently.
    losses = {result.record["heldout"]["loss"] for result in stacked[:5]}
    assert len(losses) >= 4


def test_mismatched_cells_raise_a_clear_error(tmp_path):
    base = cell(pt())
    with pytest.raises(ValueError, match=r"differ in seed"):
        P.run_cells_stacked([base, cell(pt(seed=1), seed=1)], tmp_path)
    with pytest.raises(ValueError, match=r"differ in eval \(eval.null_permutations\)"):
        P.run_cells_stacked([base, cell(pt(eta=0.03), eval=dataclasses.replace(EVAL, null_permutations=12))], tmp_path)
    with pytest.raises(ValueError, match=r"controller.usage"):
        P.run_cells_stacked([base, cell(pt(eta=0.03, usage="ema"))], tmp_path)
    with pytest.raises(ValueError, match=r"controller.dynamics"):
        P.run_cells_stacked([base, cell(pt("loss_free"))], tmp_path)
    with pytest.raises(ValueError, match=r"only the frozen protocol"):
        P.run_cells_stacked([cell(pt(), protocol="joint"), cell(pt(eta=0.03), protocol="joint")], tmp_path)


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


def read_cells(run_dir: Path) -> dict[str, dict]:
    cells = {}
    for path in sorted((run_dir / sweep.CELLS_DIR).glob("*.json")):
        with np.load(run_dir / sweep.CELLS_DIR / f"{path.stem}{sweep.ROUTING_SUFFIX}") as routing:
            ids = {key: routing[key].tolist() for key in routing.files}
        cells[path.stem] = {"record": stable(json.loads(path.read_text())), "routing": ids}
    return cells


def test_sweep_with_stacking_writes_the_same_cells(tmp_path):
    plain = parse_config(sweep_config())
    stacked = parse_config(sweep_config(batch_configs=3))
    assert stacked.batch_configs == 3 and plain.batch_configs == 1
    assert stacked.config_hash == plain.config_hash            # an execution setting: resumable either way
    units = sweep.stack_units(stacked.cells(), 3)
    assert sorted(c.cell_id for unit in units for c in unit) == sorted(c.cell_id for c in stacked.cells())
    assert max(len(unit) for unit in units) == 3
    # Two processes take disjoint units that cover every cell once.
    shards = [sweep.shard_units(units, index, 2) for index in range(2)]
    ids = [c.cell_id for shard in shards for unit in shard for c in unit]
    assert sorted(ids) == sorted(c.cell_id for c in stacked.cells())

    sweep.run_sweep(plain, tmp_path / "plain", progress=False)
    # Resume-safety: a partially finished stacked run (one cell of a unit done) runs the rest only.
    first = units[0][1]
    sweep.save_cell(tmp_path / "stacked", P.run_cell(first, tmp_path / "stacked"))
    outcome = sweep.run_sweep(stacked, tmp_path / "stacked", progress=False)
    assert first.cell_id in outcome.skipped and first.cell_id not in outcome.ran
    assert outcome.complete and len(outcome.ran) == len(stacked.cells()) - 1
    assert_equal(read_cells(tmp_path / "stacked"), read_cells(tmp_path / "plain"))
    again = sweep.run_sweep(stacked, tmp_path / "stacked", progress=False)
    assert again.ran == []


def test_batch_configs_is_validated():
    with pytest.raises(ConfigError, match="batch_configs"):
        parse_config(sweep_config(batch_configs=0))
    with pytest.raises(ConfigError, match="batch_configs"):
        parse_config(sweep_config(batch_configs="9"))
    with pytest.raises(ConfigError, match="batch_configs: .*frozen"):
        parse_config(sweep_config(protocol="joint", train={"steps": 2}, batch_configs=4))
    with pytest.raises(ConfigError, match="unknown top-level key"):
        parse_config(sweep_config(stack_configs=4))
