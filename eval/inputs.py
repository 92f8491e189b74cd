"""What goes into the model: a cell's conversations, batch schedules, causal inputs, the loss, and hashes.

Causality. Decoder-only models get the conversation as ``input_ids`` with a causal mask.
Encoder–decoder models (Switch) would leak the future through cross-attention if the encoder saw
the conversation, so the encoder gets a single pad token and the decoder reads the conversation by
teacher forcing: decoder input = [start, x_0 … x_{n−2}], target = [x_0 … x_{n−1}]. Target x_0 is
not scored, so both families are scored on x_1 … x_{n−1}, the tokens the loss floor of
:mod:`chronovisor.eval.data` refers to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from chronovisor.eval import baselines, jsonl, synthetic
from chronovisor.eval import data as data_lib
from chronovisor.eval.specs import DataSpec, stable_hash


# ------------------------------------------------------------------------------------- data
@dataclass
class Conversations:
    """The conversations of one cell: training, held-out and warm-up, the loss floor and the vocabulary.

    Attributes:
        train: the training conversations (``joint``/``controller_only`` train on them, ``frozen``
            pretrains its base on them).
        heldout: the held-out conversations every protocol is evaluated on.
        warmup: ``frozen`` only: the warm-up stream (None otherwise).
        loss_floor: the synthetic generator's loss floors (None for jsonl data).
        baselines: unigram and count-bigram held-out losses fit on ``train``.
        vocab_size: token ids the data uses (at most the model's vocabulary).
    """

    train: data_lib.ConversationBatch
    heldout: data_lib.ConversationBatch
    warmup: data_lib.ConversationBatch | None
    loss_floor: baselines.LossFloor | None
    baselines: baselines.NgramBaselines
    vocab_size: int

    def require_warmup(self) -> data_lib.ConversationBatch:
        """The warm-up stream; a ValueError with the fix if the cell has none."""
        if self.warmup is None:
            raise ValueError("protocol frozen needs a warm-up stream: set data.num_warmup >= 1")
        return self.warmup


def load_conversations(spec: DataSpec, seed: int, model: str, protocol: str) -> Conversations:
    """Conversations of a seed: same for both arms (they depend on the seed and the data spec only).

    The n-gram baselines predict over the data's token space: the world's vocabulary for synthetic
    data, the ids up to the largest one seen for JSONL data (slightly optimistic next to a model
    that spreads mass over a larger tokenizer vocabulary).
    """
    if spec.source == "synthetic":
        config = spec.conversation_config
        train_stream = synthetic.ConversationGenerator(config, seed=seed, split="train")
        train = train_stream.sample(spec.num_train)
        warmup = train_stream.sample(spec.num_warmup) if protocol == "frozen" and spec.num_warmup else None
        heldout = heldout_conversations(spec, seed, model)
        floor = _loss_floor(spec, seed, heldout)
        vocab_size = config.vocab_size
    else:
        batch = _jsonl_batch(spec, model)
        train, heldout = data_lib.split_batch(batch, spec.heldout_fraction, seed=seed)
        warmup = train.select(range(min(spec.num_warmup, len(train)))) if protocol == "frozen" and spec.num_warmup else None
        floor, vocab_size = None, int(batch.input_ids.max()) + 1
    ngram = baselines.ngram_baselines(train, heldout, vocab_size)
    return Conversations(train, heldout, warmup, floor, ngram, vocab_size)


def heldout_conversations(spec: DataSpec, seed: int, model: str) -> data_lib.ConversationBatch:
    """The held-out conversations of a seed, exactly as :func:`load_conversations` gives them (the
    report rebuilds them to label the tokens of the routing files by turn)."""
    if spec.source == "synthetic":
        return synthetic.ConversationGenerator(spec.conversation_config, seed=seed, split="heldout").sample(spec.num_heldout)
    return data_lib.split_batch(_jsonl_batch(spec, model), spec.heldout_fraction, seed=seed)[1]


def _jsonl_batch(spec: DataSpec, model: str) -> data_lib.ConversationBatch:
    return jsonl.load_jsonl(spec.path, spec.tokenizer or model, max_length=spec.max_length)


#: (data spec hash, seed) -> its held-out loss floor: every arm of a seed shares it, and the exact
#: filter of random-order data takes seconds, so a sweep process computes it once per seed.
_FLOORS: dict[tuple[str, int], baselines.LossFloor] = {}


def _loss_floor(spec: DataSpec, seed: int, heldout: data_lib.ConversationBatch) -> baselines.LossFloor:
    key = (stable_hash(dataclasses.asdict(spec)), seed)
    if key not in _FLOORS:
        generator = synthetic.ConversationGenerator(spec.conversation_config, seed=seed, split="heldout")
        _FLOORS[key] = baselines.loss_floor(generator, heldout)
    return _FLOORS[key]


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


def in_order_batches(num_conversations: int, batch_size: int) -> list[list[int]]:
    """Conversation indices of consecutive batches of at most ``batch_size``, in order (one pass)."""
    return [list(range(start, min(start + batch_size, num_conversations)))
            for start in range(0, num_conversations, batch_size)]


# ----------------------------------------------------------------------------- the model
def is_encoder_decoder(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The full HF model inside a ChronovisorModel (or the model itself)."""
    from chronovisor.model import ChronovisorModel

    return model.get_base_model() if isinstance(model, ChronovisorModel) else model


@dataclass
class ModelInputs:
    """Forward kwargs, next-token targets ``[B, S]`` (−100 = not scored) and per-position routing labels.

    ``turn_ids`` ``[B, S]`` is the turn of the token each routed position reads (−1 on padding).
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
    turn_ids = decoder_turn_ids(batch.turn_ids, mask)
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


def decoder_turn_ids(turn_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The turn each decoder position of the encoder–decoder layout reads: position t reads x_{t−1}
    (position 0 reads the start token and counts as the first token's turn); −1 on padding."""
    return torch.cat([turn_ids[:, :1], turn_ids[:, :-1]], dim=1).masked_fill(attention_mask == 0, -1)


def repeat_groups(kwargs: dict[str, torch.Tensor], groups: int) -> dict[str, torch.Tensor]:
    """The forward kwargs of a stacked controller with ``groups`` groups: every tensor ``[B, ...]``
    repeated to ``[groups·B, ...]`` (group c = rows c·B … (c+1)·B − 1); unchanged for one group."""
    if groups == 1:
        return kwargs
    return {name: value.repeat(groups, *([1] * (value.dim() - 1))) for name, value in kwargs.items()}


# ------------------------------------------------------------------------------- the loss
def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of CE over scored targets, number of scored targets); logits ``[B, S, V]``, targets ``[B, S]``."""
    total = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=data_lib.IGNORE_INDEX, reduction="sum"
    )
    return total, int((targets != data_lib.IGNORE_INDEX).sum())


def mean_loss(model: torch.nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """Mean next-token CE of one forward of ``model`` (a ChronovisorModel or a bare HF model)."""
    output = model(**inputs.kwargs, use_cache=False)
    total, count = token_cross_entropy(output.logits, inputs.targets)
    return total / max(count, 1)


def group_mean_losses(logits: torch.Tensor, targets: torch.Tensor, groups: int) -> torch.Tensor:
    """Each group's mean next-token CE: logits ``[groups·B, S, V]``, targets ``[B, S]`` → ``[groups]``
    (a scalar for one group)."""
    rows = targets.shape[0]
    losses = []
    for g in range(groups):
        total, count = token_cross_entropy(logits[g * rows:(g + 1) * rows], targets)
        losses.append(total / max(count, 1))
    return torch.stack(losses) if groups > 1 else losses[0]


# ------------------------------------------------------------------------------- hashes
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


def count_changed(module: torch.nn.Module, before: dict[str, str]) -> int:
    """Number of parameters/buffers whose bytes differ from the ``before`` :func:`tensor_hashes`."""
    after = tensor_hashes(module)
    return sum(after.get(name) != digest for name, digest in before.items())


def schedule_hash(schedule: list[list[int]], batch: data_lib.ConversationBatch) -> str:
    """Hash of the exact token stream a schedule feeds (the pairing check for data and order)."""
    digest = hashlib.sha256(json.dumps(schedule).encode())
    digest.update(batch.input_ids.numpy().tobytes())
    return digest.hexdigest()
