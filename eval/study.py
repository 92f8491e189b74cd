"""``chronovisor study``: the frozen real-text study, one cell per (seed, arm, adaptation stream), resumable.

    chronovisor study configs/realtext/study.yaml --out runs/realtext_study

A cell loads a fresh copy of the pretrained checkpoint, prepares its arm (:mod:`.study_arms`),
adapts on ``steps`` batches of the stream's training blocks (``mixed``: both domains; or one
domain's), then evaluates on held-out blocks of *both* domains: the loss per domain, and per MoE
layer the mutual information between the chosen experts and the domain of the token. The off arm
adapts on nothing, so it runs once per seed (stream ``none``) and pairs with every cell of the seed.

Paired per seed: every arm of a seed adapts on the same blocks in the same order and is evaluated
on the same held-out blocks (drawn per seed). Seeds vary the stream, the evaluation draw, the
controller's seed and the LoRA init; the checkpoint is the same for all. Each finished cell is one
JSON file under ``cells/``; a rerun skips them, and a rerun with more seeds adds theirs. :mod:`.study_report` turns them into the table.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from chronovisor.eval.corpus import DOMAINS, load_corpus
from chronovisor.eval.data import next_token_labels
from chronovisor.eval.errors import RunDirError
from chronovisor.eval.inputs import count_changed, tensor_hashes, token_cross_entropy
from chronovisor.eval.lm_blocks import DomainBlocks, corpus_blocks
from chronovisor.eval.metrics import mutual_information
from chronovisor.eval.pretrain import RECORD_FILE, block_order
from chronovisor.eval.study_arms import FROZEN_BASE_ARMS, ONLINE_ARMS, TRAINED_ARMS, PreparedArm, prepare_arm
from chronovisor.eval.study_config import ADAPT_STREAMS, OFF_ARM, StudyConfig

CONFIG_FILE = "study.json"
CELLS_DIR = "cells"
#: The off arm's stream: it adapts on nothing.
NO_STREAM = "none"


@dataclass
class StudyCell:
    """One (seed, arm, stream) of the study.

    Attributes:
        seed, arm, adapt: the cell (``adapt`` is ``none`` for the off arm).
        trainable_parameters: what the arm's optimiser updated (0: off, placebo, pt).
        adapt_loss: mean next-token CE over the adaptation batches (None for off).
        heldout_loss: domain -> held-out CE (nats per token) on the seed's evaluation blocks.
        mutual_information: per MoE layer, I(expert; domain) in bits over the held-out tokens of both domains.
        base_params_changed: base tensors that changed (must be 0 for off, placebo, pt, controller_only).
        wall_time_s: the cell's wall time.
    """

    seed: int
    arm: str
    adapt: str
    trainable_parameters: int
    adapt_loss: float | None
    heldout_loss: dict[str, float]
    mutual_information: list[float]
    base_params_changed: int
    wall_time_s: float

    @property
    def name(self) -> str:
        return cell_name(self.seed, self.arm, self.adapt)


def cell_name(seed: int, arm: str, adapt: str) -> str:
    return f"s{seed}_{arm}_{adapt}"


def study_cells(config: StudyConfig) -> list[tuple[int, str, str]]:
    """Every (seed, arm, stream) of the study, off first within each seed."""
    cells = []
    for seed in config.seeds:
        for arm in config.arms:
            streams = [NO_STREAM] if arm == OFF_ARM else config.adapt
            cells += [(seed, arm, stream) for stream in streams]
    return cells


@dataclass
class StudyData:
    """The checkpoint directory and the corpus as blocks (train and held-out, per domain)."""

    model_dir: str
    blocks: dict[tuple[str, str], DomainBlocks]


def load_study_data(base: str | Path) -> StudyData:
    """The checkpoint and its corpus as blocks of the pretraining ``seq_len``.

    Args:
        base: a ``chronovisor pretrain`` run directory.
    """
    from transformers import AutoTokenizer

    base = Path(base)
    record = base / RECORD_FILE
    if not record.is_file():
        raise RunDirError(f"{base} is not a finished pretraining run ({RECORD_FILE} missing); run "
                          f"`chronovisor pretrain CONFIG --out {base}` first")
    seq_len = json.loads(record.read_text())["config"]["train"]["seq_len"]
    tokenizer = AutoTokenizer.from_pretrained(str(base / "model"))
    return StudyData(str(base / "model"), corpus_blocks(load_corpus(base / "corpus"), tokenizer, seq_len))


def stream_batches(data: StudyData, stream: str, config: StudyConfig, seed: int) -> list[torch.Tensor]:
    """The adaptation batches of ``stream`` for ``seed``: ``steps`` batches of training blocks."""
    domains = DOMAINS if stream == "mixed" else (stream,)
    ids = torch.cat([data.blocks[domain, "train"].ids for domain in domains])
    order = block_order(len(ids), config.batch_size, config.steps, seed * len(ADAPT_STREAMS) + ADAPT_STREAMS.index(stream))
    return [ids[indices] for indices in order]


def eval_blocks(data: StudyData, config: StudyConfig, seed: int) -> dict[str, torch.Tensor]:
    """Per domain, the seed's ``eval_blocks`` held-out blocks (all of them if there are fewer)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for domain in DOMAINS:
        ids = data.blocks[domain, "heldout"].ids
        if len(ids) == 0:
            raise ValueError(f"held-out {domain} has no complete block; build a larger corpus slice")
        chosen[domain] = ids[torch.randperm(len(ids), generator=generator)[:config.eval_blocks]]
    return chosen


def batch_loss(wrapped: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE of one forward of a batch of blocks."""
    logits = wrapped(input_ids=batch, use_cache=False).logits
    total, count = token_cross_entropy(logits, next_token_labels(batch))
    return total / count


def adapt(prepared: PreparedArm, batches: list[torch.Tensor], config: StudyConfig) -> float:
    """Run the arm's adaptation over the batches; returns the mean CE over them.

    Online arms tick the controller after each no-grad forward; trained arms take one AdamW step per
    batch on their parameters (the controller ticking too, as in the harness's controller_only).
    """
    wrapped, controller = prepared.wrapped, prepared.wrapped.controller
    wrapped.eval()  # frozen base: no dropout; gradients still reach the trained parameters
    losses = []
    if prepared.arm in ONLINE_ARMS:
        with torch.no_grad():
            for batch in batches:
                loss = batch_loss(wrapped, batch)
                controller.step(loss=loss)
                losses.append(float(loss))
        return float(np.mean(losses))
    lr = getattr(config, TRAINED_ARMS[prepared.arm])
    optimizer = torch.optim.AdamW(prepared.trainable, lr=lr, weight_decay=0.0)
    for batch in batches:
        loss = batch_loss(wrapped, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        detached = loss.detach()
        controller.step(loss=detached)
        losses.append(float(detached))
    return float(np.mean(losses))


def evaluate(wrapped, blocks: dict[str, torch.Tensor], batch_size: int) -> tuple[dict[str, float], list[float]]:
    """Held-out CE per domain and, per layer, I(expert; domain) in bits over every held-out token, fields frozen."""
    wrapped.eval()
    losses: dict[str, float] = {}
    experts: list[list[torch.Tensor]] = [[] for _ in range(wrapped.info.num_layers)]
    labels = []
    with torch.no_grad():
        for index, domain in enumerate(DOMAINS):
            total, count = 0.0, 0
            for start in range(0, len(blocks[domain]), batch_size):
                batch = blocks[domain][start:start + batch_size]
                with wrapped.record_routing(keep_weights=False) as record:
                    logits = wrapped(input_ids=batch, use_cache=False).logits
                loss_sum, scored = token_cross_entropy(logits, next_token_labels(batch))
                total, count = total + float(loss_sum), count + scored
                for layer, chosen in enumerate(record.expert_index):
                    experts[layer].append(chosen)
                labels.append(torch.full((batch.numel(),), index, dtype=torch.long))
            losses[domain] = total / count
    domain_of_token = torch.cat(labels)
    mutual = [mutual_information(torch.cat(chosen), domain_of_token, wrapped.info.num_experts) for chosen in experts]
    return losses, mutual


def run_study_cell(data: StudyData, config: StudyConfig, seed: int, arm: str, stream: str) -> StudyCell:
    """Prepare, adapt and evaluate one cell.

    Raises:
        RuntimeError: a frozen-base arm changed a base tensor.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    prepared = prepare_arm(arm, data.model_dir, config, seed)
    before = tensor_hashes(prepared.wrapped.model)
    adapt_loss = None if arm == OFF_ARM else adapt(prepared, stream_batches(data, stream, config, seed), config)
    changed = count_changed(prepared.wrapped.model, before)
    if arm in FROZEN_BASE_ARMS and changed:
        raise RuntimeError(f"arm {arm} changed {changed} tensors of its frozen base; only the controller may change")
    losses, mutual = evaluate(prepared.wrapped, eval_blocks(data, config, seed), config.eval_batch_size)
    return StudyCell(seed, arm, stream, prepared.trainable_parameters, adapt_loss, losses, mutual, changed,
                     time.perf_counter() - started)


def run_study(config: StudyConfig, out_dir: str | Path, *, progress: bool = True) -> list[StudyCell]:
    """Run every unfinished cell; returns all cells (finished before or now), in :func:`study_cells` order.

    Args:
        config: the validated study config.
        out_dir: the study directory (``study.json`` + ``cells/``); a rerun resumes it.
        progress: show a progress bar.

    Raises:
        RunDirError: ``out_dir`` holds a study with another config.
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    (out_dir / CELLS_DIR).mkdir(parents=True, exist_ok=True)
    saved = out_dir / CONFIG_FILE
    if saved.is_file() and _without_seeds(json.loads(saved.read_text())) != _without_seeds(config.to_dict()):
        raise RunDirError(f"{out_dir} holds a study with another config ({CONFIG_FILE}); use another --out "
                          f"(only seeds may change between runs of one study)")
    saved.write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    data = load_study_data(config.base)
    cells = []
    for seed, arm, stream in tqdm(study_cells(config), desc=f"study {config.name}", disable=not progress):
        path = out_dir / CELLS_DIR / f"{cell_name(seed, arm, stream)}.json"
        if not path.is_file():
            cell = run_study_cell(data, config, seed, arm, stream)
            staging = path.with_suffix(".tmp")
            staging.write_text(json.dumps(asdict(cell), indent=1) + "\n")
            staging.rename(path)
        cells.append(StudyCell(**json.loads(path.read_text())))
    return cells


def _without_seeds(config: dict) -> dict:
    """A study config without its seeds: a cell is keyed by its seed, so a study can be extended by seeds."""
    return {key: value for key, value in config.items() if key != "seeds"}


def read_cells(out_dir: str | Path) -> list[StudyCell]:
    """Every finished cell of a study directory."""
    paths = sorted((Path(out_dir) / CELLS_DIR).glob("*.json"))
    if not paths:
        raise RunDirError(f"{out_dir} holds no study cells; run `chronovisor study CONFIG --out {out_dir}`")
    return [StudyCell(**json.loads(path.read_text())) for path in paths]
