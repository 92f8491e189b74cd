"""``chronovisor pretrain``: a Mixtral-family MoE trained from scratch on the real corpus, saved beside its tokenizer.

    chronovisor pretrain configs/realtext/pretrain.yaml --out runs/realtext

writes into ``--out``:

``corpus/``
    the corpus (:mod:`.corpus`; built and checked against the recorded hashes).
``model/``
    ``save_pretrained`` of the ``MixtralForCausalLM`` and of its BPE tokenizer (:mod:`.tokenizer`),
    so ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` (and ``chronovisor.load``) read it.
``pretrain.json``
    the :class:`PretrainRecord`: config, corpus counts, tokens per (domain, split), wall time, the
    training curve, and the held-out loss and perplexity per domain next to the unigram and
    count-bigram baselines fit on the training blocks.

The loss is Mixtral's standard one: next-token CE plus ``router_aux_loss_coef`` × its load-balancing
loss (``output_router_logits=True`` in the training forward). Deterministic per seed for a fixed
thread count (``threads``; torch's CPU sums depend on it): the same weights, bit for bit.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from chronovisor.eval.baselines import ngram_baselines
from chronovisor.eval.block_eval import block_loss
from chronovisor.eval.corpus import DOMAINS, SPLITS, build_corpus, load_corpus
from chronovisor.eval.inputs import state_hash
from chronovisor.eval.lm_blocks import DomainBlocks, blocks_with_labels, corpus_blocks
from chronovisor.eval.pretrain_config import PretrainConfig
from chronovisor.eval.tokenizer import train_tokenizer

RECORD_FILE = "pretrain.json"
#: Blocks per forward in the held-out evaluation.
EVAL_BATCH_SIZE = 16


@dataclass(frozen=True)
class SplitTokens:
    """Documents, tokens and blocks of one (domain, split) under the trained tokenizer."""

    domain: str
    split: str
    documents: int
    tokens: int
    blocks: int


@dataclass(frozen=True)
class DomainPerplexity:
    """Held-out loss (nats per token) and perplexity of the model and of the n-gram baselines on one domain."""

    domain: str
    scored_tokens: int
    loss: float
    perplexity: float
    unigram_loss: float
    unigram_perplexity: float
    bigram_loss: float
    bigram_perplexity: float


@dataclass
class PretrainRecord:
    """What one pretraining run did (``pretrain.json``)."""

    config: dict
    corpus: dict
    tokens: list[SplitTokens]
    parameters: int
    threads: int
    wall_time_s: float
    train_seconds: float
    final_train_ce: float
    final_aux_loss: float
    curve_every: int
    curve: list[float]
    heldout: list[DomainPerplexity]
    state_hash: str

    def to_dict(self) -> dict:
        return asdict(self)


def build_mixtral(config: PretrainConfig, vocab_size: int, eos_token_id: int) -> torch.nn.Module:
    """A freshly initialised ``MixtralForCausalLM`` of the config's shape, seeded by ``config.seed``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    shape = config.model
    hf_config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, num_local_experts=shape.num_local_experts,
        num_experts_per_tok=shape.num_experts_per_tok, router_aux_loss_coef=shape.router_aux_loss_coef,
        max_position_embeddings=config.train.seq_len, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        pad_token_id=eos_token_id, tie_word_embeddings=False, sliding_window=None)
    torch.manual_seed(config.seed)
    return MixtralForCausalLM(hf_config)


def learning_rate(step: int, config: PretrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    schedule = config.train
    if step < schedule.warmup_steps:
        return schedule.lr * (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(schedule.steps - schedule.warmup_steps, 1)
    return schedule.lr * 0.5 * (1 + math.cos(math.pi * progress))


def block_order(num_blocks: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Block indices of each step: epochs over fresh seeded permutations."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    batches = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(num_blocks, generator=generator)])
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


def pretrain(config: PretrainConfig, out_dir: str | Path, *, progress: bool = True) -> PretrainRecord:
    """Build the corpus, train the tokenizer, pretrain the MoE, evaluate it and save everything under ``out_dir``.

    Args:
        config: the validated :class:`~chronovisor.eval.pretrain_config.PretrainConfig`.
        out_dir: the run directory (see the module docstring).
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    summary = build_corpus(out_dir / "corpus", max_sources_per_kind=config.max_sources_per_kind)
    corpus = load_corpus(out_dir / "corpus")
    model_dir = out_dir / "model"
    tokenizer = train_tokenizer(list(corpus["train"]["text"]), config.vocab_size, model_dir)
    blocks = corpus_blocks(corpus, tokenizer, config.train.seq_len)
    train_ids, _ = blocks_with_labels(blocks, "train")
    model = build_mixtral(config, len(tokenizer), tokenizer.eos_token_id)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay,
                                  betas=(0.9, 0.95))
    curve_every = max(config.train.steps // 100, 1)
    ce_values, aux_values = [], []
    train_started = time.perf_counter()
    for step, indices in enumerate(tqdm(block_order(len(train_ids), config.train.batch_size, config.train.steps,
                                                    config.seed), desc="pretrain", disable=not progress)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        batch = train_ids[indices]
        output = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        aux = float(output.aux_loss.detach())
        ce_values.append(float(output.loss.detach()) - config.model.router_aux_loss_coef * aux)
        aux_values.append(aux)
    train_seconds = time.perf_counter() - train_started
    model.eval()
    model.save_pretrained(str(model_dir))
    heldout = [domain_perplexity(model, blocks[domain, "train"], blocks[domain, "heldout"], len(tokenizer),
                                 tokenizer.eos_token_id) for domain in DOMAINS]
    tail = max(len(ce_values) // 10, 1)
    record = PretrainRecord(
        config=config.to_dict(), corpus=summary.to_dict(),
        tokens=[SplitTokens(d, s, blocks[d, s].documents, blocks[d, s].tokens, len(blocks[d, s].ids))
                for d in DOMAINS for s in SPLITS],
        parameters=sum(p.numel() for p in model.parameters()), threads=config.threads,
        wall_time_s=time.perf_counter() - started, train_seconds=train_seconds,
        final_train_ce=sum(ce_values[-tail:]) / tail, final_aux_loss=sum(aux_values[-tail:]) / tail,
        curve_every=curve_every, curve=ce_values[::curve_every], heldout=heldout, state_hash=state_hash(model))
    (out_dir / RECORD_FILE).write_text(json.dumps(record.to_dict(), indent=1) + "\n")
    return record


def domain_perplexity(model: torch.nn.Module, train: DomainBlocks, heldout: DomainBlocks, vocab_size: int,
                      pad_token_id: int) -> DomainPerplexity:
    """The model's held-out loss on one domain next to unigram and count-bigram models fit on its training blocks."""
    loss = block_loss(model, heldout.ids, EVAL_BATCH_SIZE)
    ngram = ngram_baselines(train.as_batch(pad_token_id), heldout.as_batch(pad_token_id), vocab_size)
    return DomainPerplexity(heldout.domain, heldout.ids.shape[0] * (heldout.ids.shape[1] - 1), loss, math.exp(loss),
                            ngram.unigram, math.exp(ngram.unigram), ngram.bigram, math.exp(ngram.bigram))
