"""Specification of the pretrained-base cache of the frozen protocols."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_WORLD

from chronovisor.eval.bases import WEIGHTS_FILE, pretrained_base
from chronovisor.eval.inputs import load_conversations, state_hash
from chronovisor.eval.specs import CellSpec, DataSpec, TrainSpec

CELL = CellSpec(protocol="frozen", model="mixtral-tiny", seed=0, pt_config=None,
                data=DataSpec(num_train=2, num_heldout=1, num_warmup=1, generator=TINY_WORLD),
                train=TrainSpec(pretrain_steps=2, lr=1e-2))


def _cache_as_rank(rank: int, run_dir: str, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        if rank == 1:  # only the second rank builds the cache entry
            conversations = load_conversations(CELL.data, CELL.seed, CELL.model, CELL.protocol)
            results.put(state_hash(pretrained_base(CELL, conversations, run_dir, torch.device("cpu"))))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_base_cached_by_a_non_zero_rank_of_a_distributed_sweep_holds_its_weights(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_cache_as_rank, args=(str(tmp_path), port, results), nprocs=2, start_method="spawn")
    cached = next((tmp_path / "bases").iterdir())
    assert (cached / WEIGHTS_FILE).is_file()
    conversations = load_conversations(CELL.data, CELL.seed, CELL.model, CELL.protocol)
    assert state_hash(pretrained_base(CELL, conversations, tmp_path, torch.device("cpu"))) == results.get()


def test_a_cached_base_loads_back_bit_identical_to_the_trained_one(tmp_path):
    conversations = load_conversations(CELL.data, CELL.seed, CELL.model, CELL.protocol)
    first = pretrained_base(CELL, conversations, tmp_path, torch.device("cpu"))
    again = pretrained_base(CELL, conversations, tmp_path, torch.device("cpu"))
    assert state_hash(first) == state_hash(again)
    assert len(list((tmp_path / "bases").iterdir())) == 1


def test_two_processes_needing_one_base_at_once_train_it_once_and_load_the_same_weights(tmp_path, monkeypatch):
    """The second caller finds the base's claim held and waits for the cached copy (claims exclude each
    other across threads of one process as across processes); the first one's training is slowed
    down so that the two calls overlap."""
    import threading
    import time

    import chronovisor.eval.bases as bases

    trainings = []
    pretrain = bases._pretrain

    def slow_pretrain(*args, **kwargs):
        trainings.append(threading.current_thread().name)
        time.sleep(1.0)
        pretrain(*args, **kwargs)

    monkeypatch.setattr(bases, "_pretrain", slow_pretrain)
    conversations = load_conversations(CELL.data, CELL.seed, CELL.model, CELL.protocol)
    hashes = {}

    def need_base(name: str) -> None:
        hashes[name] = state_hash(pretrained_base(CELL, conversations, tmp_path, torch.device("cpu")))

    threads = [threading.Thread(target=need_base, args=(name,), name=name) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(trainings) == 1
    assert hashes["first"] == hashes["second"]
    assert not list((tmp_path / "claims").iterdir())
