"""How long must a toy preset train on a synthetic world before it beats the count bigram?

Trains ``--model`` from its seeded init without a controller (AdamW, linear warm-up then a constant
learning rate, fresh conversations every step) and prints one JSON line every ``--every`` steps: the
held-out loss, the unigram and count-bigram baselines fit on the conversations seen so far, and the
seconds elapsed. The world's Bayes floor is printed first. This is how a study's training length is
chosen before the study runs (docs/calibration.md, section 5); it measures the off arm only.

    python scripts/learning_curve.py --vocab-size 256 --phase-vocab-size 64 --topic-vocab-size 32 \
        --batch-size 8 --lr 2e-3 --lr-warmup-steps 100 --steps 1000 --every 100
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from chronovisor.eval import baselines, synthetic
from chronovisor.eval.inputs import mean_loss, model_inputs
from chronovisor.eval.train_loop import lr_warmup_schedule
from chronovisor.model import load_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mixtral-2l8e")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--phase-vocab-size", type=int, default=200)
    parser.add_argument("--topic-vocab-size", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lr-warmup-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--num-heldout", type=int, default=16)
    args = parser.parse_args()

    world = synthetic.ConversationConfig(
        vocab_size=args.vocab_size, phase_vocab_size=args.phase_vocab_size, topic_vocab_size=args.topic_vocab_size,
        min_turn_length=20, max_turn_length=40, min_length=160, max_length=260, random_phase_order=True)
    train = synthetic.ConversationGenerator(world, seed=args.seed, split="train").sample(args.batch_size * args.steps)
    heldout_stream = synthetic.ConversationGenerator(world, seed=args.seed, split="heldout")
    heldout = heldout_stream.sample(args.num_heldout)
    floor = baselines.loss_floor(synthetic.ConversationGenerator(world, seed=args.seed, split="heldout"), heldout)
    print(json.dumps({"bayes": round(floor.bayes, 4), "uniform": round(floor.uniform, 4)}), flush=True)

    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    model = load_base_model(args.model, seed=args.seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = lr_warmup_schedule(optimizer, args.lr_warmup_steps)
    heldout_inputs = model_inputs(model, heldout, device)
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = train.select(range((step - 1) * args.batch_size, step * args.batch_size))
        loss = mean_loss(model, model_inputs(model, batch, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % args.every == 0:
            with torch.no_grad():
                model.eval()
                heldout_loss = float(mean_loss(model, heldout_inputs))
                model.train()
            ngram = baselines.ngram_baselines(train.select(range(step * args.batch_size)), heldout, args.vocab_size)
            print(json.dumps({"step": step, "heldout": round(heldout_loss, 4), "bigram": round(ngram.bigram, 4),
                              "unigram": round(ngram.unigram, 4), "seconds": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    main()
