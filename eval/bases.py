"""The base model of a cell: built from a preset / directory / hub id, or pretrained and cached.

``frozen`` and ``controller_only`` freeze a base that was first pretrained without a controller
for ``train.pretrain_steps``. It is deterministic per seed and identical for both arms, so it is
trained once and cached in the run directory (:meth:`RunDir.base_dir`); every cell of the seed
loads that copy. The process that trains it holds the base's claim; the others needing it wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import torch

from chronovisor.eval.errors import RunDirError
from chronovisor.eval.inputs import Conversations, state_hash, training_schedule
from chronovisor.eval.rundir import RunDir, write_json
from chronovisor.eval.specs import CellSpec, LoadSpec, model_tag, stable_hash
from chronovisor.eval.train_loop import final_loss, train_steps

BASE_INFO = "base.json"
WEIGHTS_FILE = "model.safetensors"
#: Seconds between looks at the cache while another process trains the base.
BASE_WAIT_S = 2.0


def build_model(model: str, seed: int, load: LoadSpec, device: torch.device) -> torch.nn.Module:
    """The bare HF model of ``model``: a toy preset with its seed's init, or a directory / hub id."""
    from chronovisor.model import load_base_model

    loaded = load_base_model(model, seed=seed, device_map=load.device_map, torch_dtype=load.torch_dtype)
    return loaded if load.device_map is not None else loaded.to(device)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers progress bars (weight loading / shard writing) inside the block."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def pretrained_base(cell: CellSpec, conversations: Conversations, run_dir: RunDir | str | Path,
                    device: torch.device) -> torch.nn.Module:
    """The frozen base of ``frozen``/``controller_only``.

    The model after ``train.pretrain_steps`` of plain training (no controller), cached per (model,
    seed, data, pretraining settings) under ``run_dir``. One process trains it while holding its
    claim (:meth:`RunDir.try_claim`); the other processes of this machine that need it wait for the
    cached copy instead of training it too. Processes whose locks do not exclude each other (other
    machines on storage without ``flock``) may both train it: the first rename wins. Every cell
    loads the cached copy, so all arms of a seed start from bit-identical weights. With
    ``pretrain_steps`` 0 the model as built.

    Args:
        cell: any cell of the seed (its model, seed, data, train and load settings count).
        conversations: the cell's conversations (pretraining uses the training ones).
        run_dir: where the cache lives.
        device: where the model runs.
    """
    base = build_model(cell.model, cell.seed, cell.load, device)
    if cell.train.pretrain_steps == 0:
        return base
    key = {
        "model": cell.model,
        "seed": cell.seed,
        "data": cell.relevant_settings()["data"] | {"num_warmup": None},
        "pretrain_steps": cell.train.pretrain_steps,
        "lr": cell.train.lr,
        "weight_decay": cell.train.weight_decay,
        "batch_size": cell.train.batch_size,
        "load": dataclasses.asdict(cell.load),
    }
    if cell.train.lr_warmup_steps:
        key["lr_warmup_steps"] = cell.train.lr_warmup_steps
    run_dir = RunDir.of(run_dir)
    directory = run_dir.base_dir(f"{model_tag(cell.model)}_s{cell.seed}_{stable_hash(key)[:12]}")
    while not (directory / BASE_INFO).is_file():
        claim = run_dir.try_claim(f"base_{directory.name}")
        if claim is None:                      # another process is training it
            time.sleep(BASE_WAIT_S)
            continue
        with claim:
            if not (directory / BASE_INFO).is_file():
                _pretrain(base, cell, conversations, directory, key, device)
    return _load_cached(type(base), directory, device)


def _pretrain(base: torch.nn.Module, cell: CellSpec, conversations: Conversations, directory: Path,
              key: dict, device: torch.device) -> None:
    """Train ``base`` for the cell's ``pretrain_steps`` and cache it at ``directory`` (atomically)."""
    torch.manual_seed(cell.seed)
    base.train()
    schedule = training_schedule(len(conversations.train), cell.train.batch_size, cell.train.pretrain_steps,
                                 cell.seed)
    losses = train_steps(base, list(base.parameters()), conversations.train, schedule, cell.train.lr,
                         cell.train.weight_decay, device, lr_warmup_steps=cell.train.lr_warmup_steps)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    _save_weights(base, staging)
    write_json(staging / BASE_INFO, {"key": key, "state_hash": state_hash(base), "final_train_loss": final_loss(losses)})
    try:
        staging.rename(directory)
    except OSError:  # a process whose lock did not exclude ours finished the same base first
        shutil.rmtree(staging, ignore_errors=True)


def _load_cached(model_class: type, directory: Path, device: torch.device) -> torch.nn.Module:
    """The cached base in ``directory``, checked against the hash its ``base.json`` records.

    Raises:
        RunDirError: naming the directory when ``base.json`` or the weights are unreadable
            (truncated, corrupt) or the weights differ from the recorded hash; deleting the
            directory makes the next run pretrain the base again.
    """
    fix = f"delete {directory} and rerun: the base is pretrained again"
    try:
        info = json.loads((directory / BASE_INFO).read_text(encoding="utf-8"))
        expected = info["state_hash"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise RunDirError(f"cached base {directory / BASE_INFO} is unreadable ({type(error).__name__}: "
                          f"{' '.join(str(error).split())}); {fix}") from None
    try:
        with _quiet_transformers():
            weights = model_class.from_pretrained(directory).to(device)
    except Exception as error:  # safetensors / transformers raise many kinds on a damaged file
        raise RunDirError(f"cached base {directory} is unreadable ({type(error).__name__}: "
                          f"{' '.join(str(error).split())[:200]}); {fix}") from None
    if state_hash(weights) != expected:
        raise RunDirError(f"cached base {directory} does not match its recorded hash; {fix}")
    return weights


def _save_weights(model: torch.nn.Module, directory: Path) -> None:
    """Write ``model`` as ``from_pretrained`` reads it (config.json + model.safetensors), from any process.

    Not ``save_pretrained``: under an initialised ``torch.distributed`` group (a sweep launched with
    ``accelerate launch``) transformers writes checkpoint files on rank 0 only, so another rank's
    cache entry would hold no weights.
    """
    model.config.save_pretrained(directory)
    safetensors.torch.save_model(model, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if not (directory / WEIGHTS_FILE).is_file():
        raise RuntimeError(f"saving the pretrained base to {directory} wrote no {WEIGHTS_FILE}")
