"""Paired evaluation protocols: the controller on vs off, per seed, on held-out conversations.

Every protocol runs one *arm* at a time — the controller on (a :class:`PTConfig` with a mode other
than ``off``) or off (``mode="off"``: identity routing, the same hooks record the same statistics).
The two arms of a seed share everything else: the initial weights, the data and its order. Because
``mode="off"`` is identity, the off arm depends on no controller field, so one off arm serves every
η × P cell of a seed (:meth:`CellSpec.paired_off`).

Protocols (DESIGN.md §5):

``joint``
    The reference protocol: a toy model trained from its seeded init with the controller live
    (AdamW, plain next-token CE, one tick per forward, ``train.steps`` steps over the training
    conversations). The off arm trains the same init on the same batches in the same order.
``frozen``
    The base is frozen. Toy presets are first pretrained *without* a controller for
    ``train.pretrain_steps`` (deterministic per seed, identical for both arms, cached under the run
    directory so every cell of a seed reuses it). The controller then runs online over a warm-up
    stream of ``data.num_warmup`` further training-distribution conversations (ticks on).
``controller_only``
    The frozen base of ``frozen``; only the controller's learnable offsets (δb, δlogT;
    ``PTConfig(learnable=True)``) are trained for ``train.steps`` steps, ticks on. Base parameters
    are checked to be bit-identical afterwards. In the off arm the offsets never reach the router,
    so there is nothing to train: it evaluates the frozen base.

All three end with the same held-out evaluation: conversations from the same generator world but
another sample stream, the fields frozen as they ended (no ticks), the loss as the mean
cross-entropy over real next-token targets (padding masked) and the routing of every MoE layer.
With ``eval.streaming`` the held-out conversations instead go turn by turn through the KV cache
and the controller ticks after every turn (online adaptation; decoder-only models).

Causality. Decoder-only models get the conversation as ``input_ids`` with a causal mask.
Encoder–decoder models (Switch) would leak the future through cross-attention if the encoder saw
the conversation (the reference's bug, in another form), so the encoder gets a single pad token
and the decoder reads the conversation by teacher forcing: decoder input = [start, x_0 … x_{n−2}],
target = [x_0 … x_{n−1}]. Target x_0 is not scored, so both families are scored on x_1 … x_{n−1},
the tokens the loss floor of :mod:`chronovisor.eval.data` refers to. Routing metrics of Switch use
the decoder routers (those that see one token per decoder position).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chronovisor.controllers import PTConfig
from chronovisor.eval import baselines, jsonl, metrics, synthetic
from chronovisor.eval import data as data_lib

PROTOCOLS = ("joint", "frozen", "controller_only")
DATA_SOURCES = ("synthetic", "jsonl")
OFF = "off"
LOSS_FREE = "loss_free"
# Number of final training steps averaged into the reported (in-sample) training loss, as in the
# reference's ablation (mean of the last 50 per-step losses).
TRAIN_LOSS_TAIL = 50
BASES_DIR = "bases"
#: ``tick(step, loss)``: one controller tick after a forward (and the field trajectory's sample).
Tick = Callable[[int, torch.Tensor], None]


# ------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class DataSpec:
    """Where the conversations come from.

    Attributes:
        source: ``synthetic`` (:class:`~chronovisor.eval.data.ConversationGenerator`) or ``jsonl``.
        num_train: training conversations (synthetic); ``joint``/``controller_only`` cycle over them,
            ``frozen`` pretrains the base on them.
        num_heldout: held-out conversations (synthetic): same world, an independent sample stream.
        num_warmup: ``frozen`` only: conversations of the warm-up stream (the next samples of the
            training stream, unseen in pretraining; for ``jsonl`` the training split).
        generator: :class:`~chronovisor.eval.data.ConversationConfig` fields (synthetic).
        path, tokenizer, max_length, heldout_fraction: the ``jsonl`` source: a file of
            ``{"turns": [...]}`` lines, a local tokenizer directory (default: the model directory),
            truncation length and the share of conversations held out (seeded split).
    """

    source: str = "synthetic"
    num_train: int = 10
    num_heldout: int = 10
    num_warmup: int = 10
    generator: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    tokenizer: str | None = None
    max_length: int = 1024
    heldout_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source must be one of {', '.join(DATA_SOURCES)} (got {self.source!r})")
        for name in ("num_train", "num_heldout"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be at least 1 (got {getattr(self, name)})")
        if self.num_warmup < 0:
            raise ValueError(f"data.num_warmup must be >= 0 (got {self.num_warmup})")
        if self.source == "synthetic":
            try:
                synthetic.ConversationConfig(**self.generator)
            except TypeError as error:
                raise ValueError(f"data: {error}") from None
        elif self.path is None:
            raise ValueError("data.path is required when data.source is 'jsonl'")

    @property
    def conversation_config(self) -> synthetic.ConversationConfig:
        return synthetic.ConversationConfig(**self.generator)


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings (AdamW, plain next-token cross-entropy).

    Attributes:
        steps: ``joint``: training steps of model and live controller; ``controller_only``: steps
            training the controller offsets. One step = one forward = one tick.
        lr: AdamW learning rate of the model weights (``joint`` training and base pretraining);
            the reference uses 1e-4.
        weight_decay: AdamW weight decay (PyTorch's default 0.01).
        batch_size: conversations per step (the reference uses 1).
        pretrain_steps: ``frozen``/``controller_only``: steps pretraining the base without a
            controller before it is frozen (0 = use the model's weights as they are, e.g. a
            pretrained model directory).
        controller_lr: ``controller_only``: AdamW learning rate of the offsets.
    """

    steps: int = 500
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 1
    pretrain_steps: int = 0
    controller_lr: float = 1e-2

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 0), ("batch_size", 1), ("pretrain_steps", 0)):
            if getattr(self, name) < minimum:
                raise ValueError(f"train.{name} must be >= {minimum} (got {getattr(self, name)})")
        for name in ("lr", "weight_decay", "controller_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"train.{name} must be a finite number >= 0 (got {value})")


@dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation settings.

    Attributes:
        batch_size: held-out conversations per forward (padding is masked everywhere).
        null_permutations: turn-label permutations for the separation null.
        trajectory_every: record the fields every this many ticks.
        streaming: evaluate turn by turn through the KV cache and tick the controller after every
            turn (the fields keep adapting online; DESIGN.md §3 "per turn in streaming evaluation").
            Off: one forward per batch with the fields frozen. Decoder-only models, batch 1.
    """

    batch_size: int = 1
    null_permutations: int = metrics.DEFAULT_PERMUTATIONS
    trajectory_every: int = 5
    streaming: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (("batch_size", 1), ("null_permutations", 2), ("trajectory_every", 1)):
            if getattr(self, name) < minimum:
                raise ValueError(f"eval.{name} must be >= {minimum} (got {getattr(self, name)})")
        if self.streaming and self.batch_size != 1:
            raise ValueError(f"eval.streaming runs one conversation at a time: eval.batch_size must be 1 "
                             f"(got {self.batch_size})")


@dataclass(frozen=True)
class LoadSpec:
    """How model directories / hub ids are loaded (toy presets are built in memory on ``device``).

    Attributes:
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``); None = load, then move the
            model to the process's device.
        torch_dtype: e.g. ``"bfloat16"``; None = the checkpoint's dtype.
    """

    device_map: str | None = None
    torch_dtype: str | None = None


def variant_config(label: str, **fields: Any) -> PTConfig:
    """The PTConfig of an ablation label: a PTConfig mode, or ``loss_free`` (DeepSeek's
    auxiliary-loss-free sign rule: ``dynamics="loss_free"``, ``mode="pressure"``)."""
    if label == LOSS_FREE:
        return PTConfig(**{**fields, "dynamics": LOSS_FREE, "mode": "pressure"})
    return PTConfig(**{**fields, "mode": label})


def variant_label(config: PTConfig) -> str:
    """Inverse of :func:`variant_config`: ``loss_free`` for the DeepSeek comparator, else the mode."""
    if config.mode != OFF and config.dynamics == LOSS_FREE:
        return LOSS_FREE
    return config.mode


@dataclass(frozen=True)
class CellSpec:
    """One arm of one seed: everything that determines its result.

    ``controller`` is None for the off arm (``mode="off"``; no controller field matters).
    """

    protocol: str
    model: str
    seed: int
    controller: PTConfig | None
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    load: LoadSpec = field(default_factory=LoadSpec)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {self.protocol!r})")
        if self.controller is not None:
            if self.controller.mode == OFF:
                raise ValueError("an off arm has controller=None, not a PTConfig with mode='off'")
            if self.controller.seed != self.seed:
                raise ValueError(f"controller.seed ({self.controller.seed}) must equal the cell seed ({self.seed})")
            if self.protocol == "controller_only" and not self.controller.learnable:
                raise ValueError("protocol controller_only trains the offsets: the PTConfig needs learnable=True")
            if self.protocol != "controller_only" and self.controller.learnable:
                raise ValueError(f"protocol {self.protocol} trains no controller offsets: set learnable=False")

    @property
    def is_off(self) -> bool:
        return self.controller is None

    @property
    def variant(self) -> str:
        return OFF if self.controller is None else variant_label(self.controller)

    def arm_config(self) -> PTConfig:
        """The PTConfig this arm wraps the model with."""
        if self.controller is not None:
            return self.controller
        return PTConfig(mode=OFF, seed=self.seed, learnable=False)

    def paired_off(self) -> CellSpec:
        """The off arm paired with this cell (itself for an off arm)."""
        return dataclasses.replace(self, controller=None)

    # --------------------------------------------------------------------- identity
    def relevant_settings(self) -> dict[str, Any]:
        """The settings that can change this arm's result (and nothing else), as plain data.

        Settings a protocol never reads are left out, so editing them does not invalidate
        finished cells; the off arm leaves out every controller setting.
        """
        train = dataclasses.asdict(self.train)
        data = dataclasses.asdict(self.data)
        if self.data.source == "synthetic":
            for name in ("path", "tokenizer", "max_length", "heldout_fraction"):
                data.pop(name)
        else:
            for name in ("num_train", "num_heldout", "generator"):
                data.pop(name)
        if self.protocol == "joint":
            unused = ["pretrain_steps", "controller_lr"]
        elif self.protocol == "frozen":
            unused = ["steps", "controller_lr"]
        else:
            unused = [] if not self.is_off else ["steps", "controller_lr"]
        if self.protocol != "frozen":
            data.pop("num_warmup")
        for name in unused:
            train.pop(name)
        return {
            "protocol": self.protocol,
            "model": self.model,
            "seed": self.seed,
            "controller": None if self.controller is None else self.controller.to_dict(),
            "data": data,
            "train": train,
            "eval": dataclasses.asdict(self.eval),
            "load": dataclasses.asdict(self.load),
        }

    @property
    def digest(self) -> str:
        return stable_hash(self.relevant_settings())

    @property
    def cell_id(self) -> str:
        """Readable name plus a short hash of :meth:`relevant_settings`, e.g.
        ``joint_mixtral-2l8e_s0_pt_eta0.015_P0.5_3f9c2a1b`` (a file-name-safe string)."""
        parts = [self.protocol, _model_tag(self.model), f"s{self.seed}", self.variant]
        if self.controller is not None:
            default = PTConfig()
            parts += [f"eta{self.controller.eta:g}", f"P{self.controller.pressure_scale:g}"]
            if self.controller.usage != default.usage:
                parts.append(self.controller.usage)
            if self.controller.dynamics not in (default.dynamics, LOSS_FREE):
                parts.append(self.controller.dynamics)
        return "_".join(parts + [self.digest[:8]])


def stable_hash(value: Any) -> str:
    """SHA-256 hex digest of a JSON-able value (keys sorted, so the same content gives the same hash)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _model_tag(model: str) -> str:
    tag = Path(model.rstrip("/")).name or model
    return "".join(c if c.isalnum() or c in "-." else "-" for c in tag)


# ---------------------------------------------------------------------------- result types
@dataclass
class ArmResult:
    """What one arm produced.

    record: JSON-able result (see :func:`run_cell` for the keys).
    routing: held-out routing per analysed MoE layer, ``routing[layer_name]`` = [N_real, k] int
        expert ids over the real (unpadded) held-out tokens in a fixed order, so the arms of a seed
        can be compared token by token (routing preservation).
    """

    record: dict[str, Any]
    routing: dict[str, np.ndarray]


# ------------------------------------------------------------------------------------- data
@dataclass
class Conversations:
    """The batches of one cell: training, held-out and warm-up conversations, and the loss floor."""

    train: data_lib.ConversationBatch
    heldout: data_lib.ConversationBatch
    warmup: data_lib.ConversationBatch | None
    loss_floor: dict[str, float] | None
    vocab_size: int


def load_conversations(spec: DataSpec, seed: int, model: str, protocol: str) -> Conversations:
    """Conversations of a seed: same for both arms (they depend on the seed and the data spec only)."""
    if spec.source == "synthetic":
        config = spec.conversation_config
        train_stream = synthetic.ConversationGenerator(config, seed=seed, split="train")
        train = train_stream.sample(spec.num_train)
        warmup = train_stream.sample(spec.num_warmup) if protocol == "frozen" and spec.num_warmup else None
        heldout = synthetic.ConversationGenerator(config, seed=seed, split="heldout").sample(spec.num_heldout)
        floor = baselines.loss_floor(synthetic.ConversationGenerator(config, seed=seed, split="heldout"), heldout)
        return Conversations(train, heldout, warmup, dataclasses.asdict(floor), config.vocab_size)
    tokenizer = spec.tokenizer or model
    batch = jsonl.load_jsonl(spec.path, tokenizer, max_length=spec.max_length)
    train, heldout = data_lib.split_batch(batch, spec.heldout_fraction, seed=seed)
    warmup = train.select(range(min(spec.num_warmup, len(train)))) if protocol == "frozen" and spec.num_warmup else None
    return Conversations(train, heldout, warmup, None, int(batch.input_ids.max()) + 1)


def training_schedule(num_conversations: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Conversation indices of each of ``steps`` batches: epochs over a fresh seeded permutation each.

    Deterministic in its arguments, so both arms of a seed see the same batches in the same order.
    """
    rng = np.random.default_rng([seed, num_conversations, batch_size])
    schedule: list[list[int]] = []
    order: list[int] = []
    while len(schedule) < steps:
        if len(order) < batch_size:
            order += rng.permutation(num_conversations).tolist()
        schedule.append(order[:batch_size])
        order = order[batch_size:]
    return schedule


# ----------------------------------------------------------------------------- the model
def is_encoder_decoder(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


@dataclass
class ModelInputs:
    """Forward kwargs, next-token targets [B, S] (−100 = not scored) and per-position routing labels.

    ``turn_ids`` [B, S] is the turn of the token each routed position reads (−1 on padding).
    """

    kwargs: dict[str, torch.Tensor]
    targets: torch.Tensor
    turn_ids: torch.Tensor


def model_inputs(model: torch.nn.Module, batch: data_lib.ConversationBatch, device: torch.device) -> ModelInputs:
    """Causal inputs for ``model`` (see the module docstring for the encoder–decoder layout)."""
    batch = batch.to(device)
    mask = batch.attention_mask
    if not is_encoder_decoder(model):
        return ModelInputs(
            kwargs={"input_ids": batch.input_ids, "attention_mask": mask},
            targets=data_lib.next_token_labels(batch.labels),
            turn_ids=batch.turn_ids,
        )
    config = model.config
    start = config.decoder_start_token_id
    start = config.pad_token_id if start is None else start
    B = len(batch)
    # Position t of the decoder reads x_{t-1} (the start token at t = 0) and predicts x_t.
    decoder_input_ids = torch.cat([torch.full((B, 1), start, dtype=torch.long, device=device),
                                   batch.input_ids[:, :-1]], dim=1)
    turn_ids = torch.cat([batch.turn_ids[:, :1], batch.turn_ids[:, :-1]], dim=1).masked_fill(mask == 0, -1)
    targets = batch.labels.clone()
    targets[:, 0] = data_lib.IGNORE_INDEX  # x_0 has no prefix; score x_1 … x_{n-1} like a causal LM
    encoder_ids = torch.full((B, 1), config.pad_token_id, dtype=torch.long, device=device)
    return ModelInputs(
        kwargs={
            "input_ids": encoder_ids,
            "attention_mask": torch.ones_like(encoder_ids),
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": mask,
        },
        targets=targets,
        turn_ids=turn_ids,
    )


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of CE over scored targets, number of scored targets); logits [B, S, V], targets [B, S]."""
    total = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=data_lib.IGNORE_INDEX, reduction="sum"
    )
    return total, int((targets != data_lib.IGNORE_INDEX).sum())


def mean_loss(model: torch.nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """Mean next-token CE of one forward of ``model`` (a ChronovisorModel or a bare HF model)."""
    output = model(**inputs.kwargs, use_cache=False)
    total, count = token_cross_entropy(output.logits, inputs.targets)
    return total / max(count, 1)


def tensor_hashes(module: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of every parameter and buffer (dtype, shape, bytes), by name.

    Tensors accelerate has offloaded (on ``meta``) contribute their dtype and shape only.
    """
    hashes = {}
    for name, tensor in module.state_dict().items():
        digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.device.type != "meta" and tensor.numel():
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        hashes[name] = digest.hexdigest()
    return hashes


def state_hash(module: torch.nn.Module) -> str:
    """One SHA-256 over :func:`tensor_hashes` in name order: equal iff every tensor is equal."""
    return stable_hash(sorted(tensor_hashes(module).items()))


def schedule_hash(schedule: list[list[int]], batch: data_lib.ConversationBatch) -> str:
    """Hash of the exact token stream a schedule feeds (the pairing check for data and order)."""
    digest = hashlib.sha256(json.dumps(schedule).encode())
    digest.update(batch.input_ids.numpy().tobytes())
    return digest.hexdigest()


def build_model(model: str, seed: int, load: LoadSpec, device: torch.device) -> torch.nn.Module:
    """The bare HF model of ``model``: a toy preset with its seed's init, or a directory / hub id."""
    from chronovisor.model import load_base_model

    loaded = load_base_model(model, seed=seed, device_map=load.device_map, torch_dtype=load.torch_dtype)
    return loaded if load.device_map is not None else loaded.to(device)


def model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a ChronovisorModel (or the model itself)."""
    return getattr(model, "base_model", model)


def _train_steps(
    model: torch.nn.Module,
    parameters: list[torch.nn.Parameter],
    batches: data_lib.ConversationBatch,
    schedule: list[list[int]],
    lr: float,
    weight_decay: float,
    device: torch.device,
    after_step: Tick | None = None,
) -> list[float]:
    """AdamW over ``parameters`` on the scheduled batches; returns the per-step training losses.

    ``after_step(step, loss)`` runs after each optimiser step (the controller's tick).
    """
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    losses = []
    for step, indices in enumerate(schedule):
        inputs = model_inputs(model_of(model), batches.select(indices), device)
        loss = mean_loss(model, inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        detached = loss.detach()
        if after_step is not None:
            after_step(step, detached)
        losses.append(float(detached))
    return losses


# ------------------------------------------------------------------- pretrained-base cache
@contextlib.contextmanager
def _quiet_transformers():
    """No transformers progress bars (weight loading / shard writing) inside the block."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def pretrained_base(cell: CellSpec, conversations: Conversations, work_dir: Path, device: torch.device) -> torch.nn.Module:
    """The frozen base of ``frozen``/``controller_only``: the model after ``pretrain_steps`` of plain
    training (no controller), cached per (model, seed, data, pretraining settings) in
    ``work_dir/bases``. Concurrent processes may both train it; the first rename wins and every
    cell loads that copy, so all arms of a seed start from bit-identical weights."""
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
    directory = work_dir / BASES_DIR / f"{_model_tag(cell.model)}_s{cell.seed}_{stable_hash(key)[:12]}"
    if not (directory / "base.json").is_file():
        torch.manual_seed(cell.seed)
        base.train()
        schedule = training_schedule(len(conversations.train), cell.train.batch_size, cell.train.pretrain_steps, cell.seed)
        losses = _train_steps(base, list(base.parameters()), conversations.train, schedule, cell.train.lr,
                              cell.train.weight_decay, device)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        with _quiet_transformers():
            base.save_pretrained(staging)
        tail = losses[-TRAIN_LOSS_TAIL:]
        (staging / "base.json").write_text(json.dumps(
            {"key": key, "state_hash": state_hash(base), "final_train_loss": sum(tail) / len(tail)}, indent=2))
        try:
            os.rename(staging, directory)
        except OSError:  # another process finished the same base first
            shutil.rmtree(staging, ignore_errors=True)
    with _quiet_transformers():
        weights = type(base).from_pretrained(directory).to(device)
    expected = json.loads((directory / "base.json").read_text())["state_hash"]
    if state_hash(weights) != expected:
        raise RuntimeError(f"cached base {directory} does not match its recorded hash; delete it and rerun")
    return weights


# ---------------------------------------------------------------------------- evaluation
class FieldTrajectory:
    """Small summaries of the controller's fields every ``every`` ticks."""

    def __init__(self, every: int):
        self.every = every
        self.rows: dict[str, list[float]] = {key: [] for key in (
            "tick", "T_bar_global_mean", "T_bar_global_var", "T_bar_local_var", "pressure_mean_abs", "T_eff_mean")}

    def maybe_record(self, controller) -> None:
        if controller.ticks % self.every:
            return
        T_global, T_local = controller.T_bar_global, controller.T_bar_local
        values = {
            "tick": controller.ticks,
            "T_bar_global_mean": float(T_global.mean()),
            "T_bar_global_var": float(metrics.expert_variance(T_global)),
            "T_bar_local_var": float(np.mean(metrics.expert_variance(T_local))),
            "pressure_mean_abs": float(controller.pressure.abs().mean()),
            "T_eff_mean": float(controller.temperature.mean()),
        }
        for key, value in values.items():
            self.rows[key].append(value)


class _HeldoutAccumulator:
    """Collects per-position losses and routing of held-out forwards (whole batches or single turns)."""

    def __init__(self) -> None:
        self.loss_sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}
        self.layer_ids: dict[str, list[np.ndarray]] = {}
        self.turn_ids: list[np.ndarray] = []
        self.conversation_ids: list[np.ndarray] = []

    def add(self, logits: torch.Tensor, targets: torch.Tensor, turn_ids: torch.Tensor, record,
            conversations: list[int]) -> torch.Tensor:
        """Add one forward: logits [B, S, V], targets/turn_ids [B, S], B = len(conversations).

        Returns the forward's mean loss over its scored targets (NaN if none).
        """
        losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets,
                                                   ignore_index=data_lib.IGNORE_INDEX, reduction="none")  # [B, S]
        scored = targets != data_lib.IGNORE_INDEX
        for row, conversation in enumerate(conversations):
            self.loss_sums[conversation] = self.loss_sums.get(conversation, 0.0) + float(losses[row][scored[row]].sum())
            self.counts[conversation] = self.counts.get(conversation, 0) + int(scored[row].sum())
        turns = turn_ids.reshape(-1).cpu().numpy()
        real = turns >= 0
        for name, stack, index in zip(record.layer_names, record.layer_stacks, record.expert_index, strict=True):
            # Only routers that see one token per conversation position: for Switch the decoder
            # (its encoder routers see the single pad token of each conversation).
            if stack != "decoder" or index.shape[0] != turns.size:
                continue
            self.layer_ids.setdefault(name, []).append(index.numpy()[real])
        self.turn_ids.append(turns[real])
        self.conversation_ids.append(np.repeat(np.asarray(conversations), turn_ids.shape[1])[real])
        return losses[scored].mean()

    def finish(self, spec: EvalSpec, num_experts: int, seed: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if not self.layer_ids:
            raise RuntimeError("no MoE layer routed the held-out tokens (routing record has no matching layer)")
        turns = np.concatenate(self.turn_ids)
        conversations = np.concatenate(self.conversation_ids)
        routing = {name: np.concatenate(chunks).astype(np.int16) for name, chunks in self.layer_ids.items()}
        layers = []
        for name, experts in routing.items():
            excess = metrics.excess_separation(experts, turns, num_experts, conversations,
                                               n_permutations=spec.null_permutations, seed=seed)
            balance = metrics.load_balance(experts, num_experts)
            layers.append({
                "layer": name,
                "separation": excess.separation,
                "null_mean": excess.null_mean,
                "null_std": excess.null_std,
                "excess_separation": excess.excess,
                "excess_z": excess.z,
                "nmi": metrics.normalized_mutual_information(experts, turns, num_experts),
                "max_vio": balance.max_vio,
                "load_cv": balance.cv,
                "load_entropy": balance.load_entropy,
                "dead_fraction": balance.dead_fraction,
                "load": balance.load.tolist(),
            })
        summary = {key: float(np.mean([layer[key] for layer in layers]))
                   for key in ("separation", "null_mean", "excess_separation", "nmi", "max_vio", "load_cv",
                               "load_entropy", "dead_fraction")}
        order = sorted(self.counts)
        total, count = sum(self.loss_sums.values()), sum(self.counts.values())
        record = {
            "loss": total / count,
            "tokens": count,
            "per_conversation_loss": [self.loss_sums[i] / max(self.counts[i], 1) for i in order],
            "streaming": spec.streaming,
            "routing_layers": list(routing),
            "layers": layers,
            "mean_over_layers": summary,
        }
        return record, routing


def evaluate_heldout(cm, heldout: data_lib.ConversationBatch, spec: EvalSpec, device: torch.device,
                     num_experts: int, seed: int,
                     tick: Tick | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Held-out loss and per-layer routing metrics.

    Default: one forward per batch of ``spec.batch_size`` conversations, no ticks (the fields stay
    as the protocol left them). With ``spec.streaming``: each conversation turn by turn through the
    KV cache, ``tick(turn, loss)`` after every turn, so the fields keep adapting online (decoder-only
    models, batch 1). Returns (record, routing) as described in :class:`ArmResult`.
    """
    cm.eval()
    accumulator = _HeldoutAccumulator()
    with torch.no_grad():
        if spec.streaming:
            if is_encoder_decoder(cm.base_model):
                raise ValueError("eval.streaming needs a decoder-only model (the encoder-decoder layout has no "
                                 "per-turn KV-cache path here)")
            turn = 0
            for index in range(len(heldout)):
                for loss in _stream_conversation(cm, heldout.select([index]), index, device, accumulator):
                    if tick is not None:
                        tick(turn, loss)
                    turn += 1
        else:
            for start in range(0, len(heldout), spec.batch_size):
                indices = list(range(start, min(start + spec.batch_size, len(heldout))))
                inputs = model_inputs(cm.base_model, heldout.select(indices), device)
                with cm.record_routing() as record:
                    output = cm(**inputs.kwargs, use_cache=False)
                accumulator.add(output.logits, inputs.targets, inputs.turn_ids, record, indices)
    return accumulator.finish(spec, num_experts, seed)


def _stream_conversation(cm, conversation: data_lib.ConversationBatch, index: int, device: torch.device,
                         accumulator: _HeldoutAccumulator):
    """Feed one conversation turn by turn through the KV cache; yields each turn's mean loss.

    Position t of a turn is scored against x_{t+1}, so the last position of a turn predicts the
    first token of the next one, exactly as in the single full forward.
    """
    conversation = conversation.to(device)
    tokens = conversation.input_ids[0]
    length = int(conversation.lengths[0])
    bounds = [*conversation.turn_boundaries[0], length]
    cache = None
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        targets = torch.full((1, end - start), data_lib.IGNORE_INDEX, dtype=torch.long, device=device)
        last = min(end, length - 1)
        targets[0, : last - start] = tokens[start + 1: last + 1]
        with cm.record_routing() as record:
            output = cm(input_ids=tokens[start:end][None], attention_mask=torch.ones(1, end, dtype=torch.long, device=device),
                        past_key_values=cache, use_cache=True)
        cache = output.past_key_values
        yield accumulator.add(output.logits, targets, conversation.turn_ids[:, start:end], record, [index])


# ------------------------------------------------------------------------------ the cell
def run_cell(cell: CellSpec, work_dir: str | Path, device: torch.device | str = "cpu") -> ArmResult:
    """Run one arm and return its record and held-out routing.

    Record keys: ``cell_id``, ``spec`` (:meth:`CellSpec.relevant_settings`), ``variant``, ``arm``
    (``on``/``off``), ``paired_off_cell``, ``pairing`` (``init_hash`` of the weights the arm
    starts from, ``data_hash`` of the token stream it trains or warms up on), ``heldout`` (loss,
    per-layer routing metrics; see :func:`evaluate_heldout`), ``loss_floor`` (synthetic data),
    ``train`` (in-sample training loss, labelled as such), ``fields`` (final T̄ variance and the
    trajectory; None for the off arm), ``base_params_changed`` (frozen protocols: number of base
    tensors that changed, always 0 — a change raises), ``numerics``, ``wall_time_s``.
    """
    import chronovisor

    started = time.perf_counter()
    device = torch.device(device)
    work_dir = Path(work_dir)
    torch.manual_seed(cell.seed)
    conversations = load_conversations(cell.data, cell.seed, cell.model, cell.protocol)

    if cell.protocol == "joint":
        base = build_model(cell.model, cell.seed, cell.load, device)
    else:
        base = pretrained_base(cell, conversations, work_dir, device)
    vocab = base.get_output_embeddings().weight.shape[0]
    if conversations.vocab_size > vocab:
        raise ValueError(f"data vocabulary ({conversations.vocab_size} ids) exceeds the model's ({vocab}) for {cell.model}")
    init_hash = state_hash(base)
    config = cell.arm_config()
    cm = chronovisor.wrap(base, config, tick="manual")
    controller = cm.controller
    trajectory = FieldTrajectory(cell.eval.trajectory_every)

    def tick(_step: int, loss: torch.Tensor) -> None:
        controller.step(loss=loss)
        trajectory.maybe_record(controller)

    torch.manual_seed(cell.seed)
    phase = _PROTOCOL_PHASES[cell.protocol](cell, cm, conversations, device, tick)
    if phase.base_params_changed:
        raise RuntimeError(f"{cell.protocol} changed {phase.base_params_changed} base tensors; "
                           f"only the controller offsets may train")

    heldout, routing = evaluate_heldout(cm, conversations.heldout, cell.eval, device, cm.info.num_experts, cell.seed,
                                        tick=tick)
    fields = None
    if not cell.is_off:
        fields = {
            "T_bar_variance": metrics.expert_variance(controller.T_bar_global),
            "T_bar_local_variance": float(np.mean(metrics.expert_variance(controller.T_bar_local))),
            "pressure_mean_abs": float(controller.pressure.abs().mean()),
            "ticks": controller.ticks,
            "trajectory": trajectory.rows,
        }
        if config.learnable:
            fields["offsets"] = {name: float(p.detach().abs().mean()) for name, p in controller.named_parameters()}
    record = {
        "cell_id": cell.cell_id,
        "spec": cell.relevant_settings(),
        "variant": cell.variant,
        "arm": "off" if cell.is_off else "on",
        "paired_off_cell": cell.paired_off().cell_id,
        "pairing": {"init_hash": init_hash, "data_hash": phase.data_hash},
        "model_info": {"family": cm.info.family, "num_layers": cm.info.num_layers,
                       "num_experts": cm.info.num_experts, "top_k": cm.info.top_k},
        "heldout": heldout,
        "loss_floor": conversations.loss_floor,
        "train": phase.train_record,
        "fields": fields,
        "base_params_changed": phase.base_params_changed,
        "numerics": numerics(device),
        "wall_time_s": time.perf_counter() - started,
    }
    return ArmResult(record, routing)


def numerics(device: torch.device) -> dict[str, Any]:
    """What decides the floating-point reduction order: device type and intra-op thread count.

    Training is bit-reproducible only under equal numerics; over hundreds of steps a different
    thread count alone moves the held-out loss by as much as a controller might (float-order
    chaos), so the report flags pairs whose arms ran under different numerics.
    """
    return {"device": device.type, "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if device.type == "cuda" else None}


def _train_summary(losses: list[float], every: int) -> dict[str, Any]:
    tail = losses[-TRAIN_LOSS_TAIL:]
    return {
        "note": "in-sample training loss (the training conversations); compare arms on heldout.loss",
        "steps": len(losses),
        "final_loss": sum(tail) / len(tail) if tail else None,
        "curve_every": every,
        "curve": losses[::every],
    }


# ---------------------------------------------------------------------- protocol phases
@dataclass
class _Phase:
    """What a protocol's phase before the held-out evaluation reports."""

    data_hash: str | None = None
    train_record: dict[str, Any] | None = None
    base_params_changed: int | None = None


def _joint_phase(cell: CellSpec, cm, conversations: Conversations, device: torch.device, tick: Tick) -> _Phase:
    """Train model weights with the controller live (off arm: identity routing), one tick per step."""
    schedule = training_schedule(len(conversations.train), cell.train.batch_size, cell.train.steps, cell.seed)
    cm.train()
    losses = _train_steps(cm, list(cm.base_model.parameters()), conversations.train, schedule, cell.train.lr,
                          cell.train.weight_decay, device, after_step=tick)
    return _Phase(schedule_hash(schedule, conversations.train), _train_summary(losses, cell.eval.trajectory_every))


def _frozen_phase(cell: CellSpec, cm, conversations: Conversations, device: torch.device, tick: Tick) -> _Phase:
    """Run the frozen model over the warm-up stream in order, one tick per batch."""
    warmup = conversations.warmup
    if warmup is None:
        raise ValueError("protocol frozen needs a warm-up stream: set data.num_warmup >= 1")
    cm.base_model.requires_grad_(False)
    before = tensor_hashes(cm.base_model)
    size = cell.train.batch_size
    schedule = [list(range(i, min(i + size, len(warmup)))) for i in range(0, len(warmup), size)]
    cm.eval()
    with torch.no_grad():
        for step, indices in enumerate(schedule):
            tick(step, mean_loss(cm, model_inputs(cm.base_model, warmup.select(indices), device)))
    return _Phase(schedule_hash(schedule, warmup), None, _count_changed(cm.base_model, before))


def _controller_only_phase(cell: CellSpec, cm, conversations: Conversations, device: torch.device,
                           tick: Tick) -> _Phase:
    """Train only the controller offsets on the frozen base, one tick per step (off arm: nothing to train)."""
    cm.base_model.requires_grad_(False)
    before = tensor_hashes(cm.base_model)
    schedule = training_schedule(len(conversations.train), cell.train.batch_size, cell.train.steps, cell.seed)
    train_record = None
    if not cell.is_off:
        offsets = [p for p in cm.controller.parameters() if p.requires_grad]
        if not offsets:
            raise RuntimeError("controller_only: the controller has no trainable offsets")
        cm.eval()  # a frozen base: no dropout or router jitter; gradients still reach the offsets
        losses = _train_steps(cm, offsets, conversations.train, schedule, cell.train.controller_lr, 0.0, device,
                              after_step=tick)
        train_record = _train_summary(losses, cell.eval.trajectory_every)
    return _Phase(schedule_hash(schedule, conversations.train), train_record, _count_changed(cm.base_model, before))


_PROTOCOL_PHASES: dict[str, Callable[..., _Phase]] = {
    "joint": _joint_phase,
    "frozen": _frozen_phase,
    "controller_only": _controller_only_phase,
}


def _count_changed(module: torch.nn.Module, before: dict[str, str]) -> int:
    """Number of parameters/buffers whose bytes differ from the ``before`` hashes."""
    after = tensor_hashes(module)
    return sum(after.get(name) != digest for name, digest in before.items())


# ------------------------------------------------------------------- stacked frozen cells
#: PTConfig fields in which the cells of one :func:`run_cells_stacked` call may differ.
STACKABLE_CONTROLLER_FIELDS = ("eta", "pressure_scale", "mode", "seed")


def stack_key(cell: CellSpec) -> str | None:
    """Cells with the same key (and the ``frozen`` protocol) can run together in
    :func:`run_cells_stacked`: the same model, seed, data, training, evaluation and load settings,
    and the same controller apart from :data:`STACKABLE_CONTROLLER_FIELDS`. Off arms (None) join
    any key of their (model, seed, settings); see :func:`stack_group_key`."""
    if cell.controller is None:
        return None
    fields = cell.controller.to_dict()
    for name in STACKABLE_CONTROLLER_FIELDS:
        fields.pop(name, None)
    return stable_hash(fields)


def stack_group_key(cell: CellSpec) -> str:
    """The non-controller part of the stacking key: everything but the controller must be equal."""
    settings = cell.relevant_settings()
    settings.pop("controller")
    return stable_hash(settings)


def check_stackable(cells: list[CellSpec]) -> None:
    """Raise ValueError naming the first setting in which ``cells`` cannot share one stacked run."""
    if not cells:
        raise ValueError("run_cells_stacked: no cells")
    first = cells[0]
    for cell in cells:
        if cell.protocol != "frozen":
            raise ValueError(f"run_cells_stacked: only the frozen protocol can stack configurations "
                             f"(cell {cell.cell_id} has protocol {cell.protocol!r})")
        if cell.eval.streaming:
            raise ValueError(f"run_cells_stacked: eval.streaming ticks per turn of one conversation and cannot "
                             f"be stacked (cell {cell.cell_id})")
        mine, theirs = cell.relevant_settings(), first.relevant_settings()
        for name in ("model", "seed", "data", "train", "eval", "load"):
            if mine[name] != theirs[name]:
                detail = ""
                if isinstance(mine[name], dict):
                    keys = sorted(k for k in set(mine[name]) | set(theirs[name])
                                  if mine[name].get(k) != theirs[name].get(k))
                    detail = f" ({', '.join(f'{name}.{k}' for k in keys)})"
                raise ValueError(f"run_cells_stacked: cells differ in {name}{detail}: {first.cell_id} vs "
                                 f"{cell.cell_id}; stacked cells may differ only in controller "
                                 f"{', '.join(STACKABLE_CONTROLLER_FIELDS)}")
    on = [cell for cell in cells if cell.controller is not None]
    for cell in on[1:]:
        reference, other = on[0].controller.to_dict(), cell.controller.to_dict()
        differing = sorted(k for k in reference if k not in STACKABLE_CONTROLLER_FIELDS and reference[k] != other.get(k))
        if differing:
            raise ValueError(f"run_cells_stacked: controllers differ in {', '.join(f'controller.{k}' for k in differing)} "
                             f"({on[0].cell_id}: {', '.join(f'{k}={reference[k]!r}' for k in differing)}; "
                             f"{cell.cell_id}: {', '.join(f'{k}={other.get(k)!r}' for k in differing)}); stacked "
                             f"cells may differ only in controller {', '.join(STACKABLE_CONTROLLER_FIELDS)}")


class _GroupFields:
    """One group's fields of a stacked controller, as :class:`FieldTrajectory` reads a single one."""

    def __init__(self, controller, group: int):
        self._controller, self._group = controller, group

    @property
    def ticks(self) -> int:
        return self._controller.ticks

    @property
    def T_bar_global(self) -> torch.Tensor:
        return self._controller.T_bar_global[self._group]

    @property
    def T_bar_local(self) -> torch.Tensor:
        return self._controller.T_bar_local[self._group]

    @property
    def pressure(self) -> torch.Tensor:
        return self._controller.pressure[self._group]

    @property
    def temperature(self) -> torch.Tensor:
        return self._controller.temperature[self._group]


@dataclass
class _GroupRecord:
    """One group's slice of a stacked forward's :class:`~chronovisor.model.RoutingRecord`."""

    layer_names: list[str]
    layer_stacks: list[str]
    expert_index: list[torch.Tensor]


def _split_record(record, groups: int) -> list[_GroupRecord]:
    """Group c's routing: the c-th of ``groups`` equal consecutive blocks of every layer's tokens."""
    blocks = [index.view(groups, -1, index.shape[-1]) for index in record.expert_index]
    return [_GroupRecord(record.layer_names, record.layer_stacks, [block[g] for block in blocks])
            for g in range(groups)]


def _repeat_batch(tensors: dict[str, torch.Tensor], groups: int) -> dict[str, torch.Tensor]:
    """Every tensor repeated ``groups`` times along the batch axis (group c = the c-th block)."""
    return {name: value.repeat(groups, *([1] * (value.dim() - 1))) for name, value in tensors.items()}


def run_cells_stacked(cells: list[CellSpec], work_dir: str | Path, device: torch.device | str = "cpu",
                      max_group: int | None = None) -> list[ArmResult]:
    """Run several ``frozen`` cells of one seed in stacked forwards; returns what :func:`run_cell`
    returns for each cell, in order (same record keys and values, same routing).

    The cells must share protocol (``frozen``), model, seed, data, training, evaluation and load
    settings, and their controllers may differ only in :data:`STACKABLE_CONTROLLER_FIELDS` (else a
    ValueError names the differing setting). Off arms join as a ``mode="off"`` group (identity:
    b = 0, T = 1, bit-identical logits). The frozen base is pretrained (or loaded from the cache)
    once; then for each chunk of at most ``max_group`` cells (default: all) the base is wrapped
    once with a stacked controller (``PTController(L, E, K, [config_1, ..., config_C])``), every
    warm-up batch is fed repeated C times along the batch axis (group c = configuration c) with one
    tick per batch and each group's own loss, and the held-out batches likewise, split per group
    into each cell's record. Memory: activations of C × ``eval.batch_size`` / ``train.batch_size``
    conversations per forward. ``wall_time_s`` of each record is its share of the whole call.
    """
    import chronovisor

    check_stackable(cells)
    if max_group is not None and max_group < 1:
        raise ValueError(f"run_cells_stacked: max_group must be >= 1 (got {max_group})")
    started = time.perf_counter()
    device = torch.device(device)
    work_dir = Path(work_dir)
    first = cells[0]
    torch.manual_seed(first.seed)
    conversations = load_conversations(first.data, first.seed, first.model, first.protocol)
    base = pretrained_base(first, conversations, work_dir, device)
    vocab = base.get_output_embeddings().weight.shape[0]
    if conversations.vocab_size > vocab:
        raise ValueError(f"data vocabulary ({conversations.vocab_size} ids) exceeds the model's ({vocab}) for {first.model}")
    init_hash = state_hash(base)
    warmup = conversations.warmup
    if warmup is None:
        raise ValueError("protocol frozen needs a warm-up stream: set data.num_warmup >= 1")
    base.requires_grad_(False)
    before = tensor_hashes(base)
    size = first.train.batch_size
    schedule = [list(range(i, min(i + size, len(warmup)))) for i in range(0, len(warmup), size)]
    data_hash = schedule_hash(schedule, warmup)
    # Inputs are the same for every group and chunk: build them once.
    warmup_inputs = [model_inputs(base, warmup.select(indices), device) for indices in schedule]
    heldout_batches = []
    for start in range(0, len(conversations.heldout), first.eval.batch_size):
        indices = list(range(start, min(start + first.eval.batch_size, len(conversations.heldout))))
        heldout_batches.append((indices, model_inputs(base, conversations.heldout.select(indices), device)))

    on = next((cell.controller for cell in cells if cell.controller is not None), None)
    chunk = max_group or len(cells)
    parts: list[tuple[CellSpec, dict[str, Any], dict[str, np.ndarray], dict[str, Any] | None, dict[str, Any]]] = []
    for offset in range(0, len(cells), chunk):
        group_cells = cells[offset: offset + chunk]
        # The off arm's config: the shared fields of the on arms, mode off (no field reaches the router).
        configs = [cell.controller if cell.controller is not None else
                   dataclasses.replace(on or cell.arm_config(), mode=OFF, seed=cell.seed) for cell in group_cells]
        groups = len(configs)
        cm = chronovisor.wrap(base, configs if groups > 1 else configs[0], tick="manual")
        controller = cm.controller
        views = [_GroupFields(controller, g) for g in range(groups)] if groups > 1 else [controller]
        trajectories = [FieldTrajectory(first.eval.trajectory_every) for _ in group_cells]
        torch.manual_seed(first.seed)
        cm.eval()
        with torch.no_grad():
            for inputs in warmup_inputs:
                kwargs = _repeat_batch(inputs.kwargs, groups) if groups > 1 else inputs.kwargs
                logits = cm(**kwargs, use_cache=False).logits
                rows = inputs.targets.shape[0]
                losses = []
                for g in range(groups):
                    total, count = token_cross_entropy(logits[g * rows:(g + 1) * rows], inputs.targets)
                    losses.append(total / max(count, 1))
                controller.step(loss=torch.stack(losses) if groups > 1 else losses[0])
                for trajectory, view in zip(trajectories, views, strict=True):
                    trajectory.maybe_record(view)
            accumulators = [_HeldoutAccumulator() for _ in group_cells]
            for indices, inputs in heldout_batches:
                kwargs = _repeat_batch(inputs.kwargs, groups) if groups > 1 else inputs.kwargs
                with cm.record_routing() as record:
                    output = cm(**kwargs, use_cache=False)
                rows = inputs.targets.shape[0]
                records = _split_record(record, groups) if groups > 1 else [record]
                for g, accumulator in enumerate(accumulators):
                    accumulator.add(output.logits[g * rows:(g + 1) * rows], inputs.targets, inputs.turn_ids,
                                    records[g], indices)
        for g, cell in enumerate(group_cells):
            heldout, routing = accumulators[g].finish(cell.eval, cm.info.num_experts, cell.seed)
            fields = None
            if not cell.is_off:
                view = views[g]
                fields = {
                    "T_bar_variance": metrics.expert_variance(view.T_bar_global),
                    "T_bar_local_variance": float(np.mean(metrics.expert_variance(view.T_bar_local))),
                    "pressure_mean_abs": float(view.pressure.abs().mean()),
                    "ticks": controller.ticks,
                    "trajectory": trajectories[g].rows,
                }
            info = {"family": cm.info.family, "num_layers": cm.info.num_layers,
                    "num_experts": cm.info.num_experts, "top_k": cm.info.top_k}
            parts.append((cell, heldout, routing, fields, info))
        cm.unwrap()
    changed = _count_changed(base, before)
    if changed:
        raise RuntimeError(f"frozen changed {changed} base tensors; only the controller offsets may train")
    share = (time.perf_counter() - started) / len(cells)
    results = []
    for cell, heldout, routing, fields, info in parts:
        record = {
            "cell_id": cell.cell_id,
            "spec": cell.relevant_settings(),
            "variant": cell.variant,
            "arm": "off" if cell.is_off else "on",
            "paired_off_cell": cell.paired_off().cell_id,
            "pairing": {"init_hash": init_hash, "data_hash": data_hash},
            "model_info": info,
            "heldout": heldout,
            "loss_floor": conversations.loss_floor,
            "train": None,
            "fields": fields,
            "base_params_changed": changed,
            "numerics": numerics(device),
            "wall_time_s": share,
        }
        results.append(ArmResult(record, routing))
    return results
