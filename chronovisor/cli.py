"""The ``chronovisor`` command line.

Each subcommand has one ``_add_<name>`` function that declares its arguments and points
``func`` at the code that runs it; the heavy imports (torch, transformers) happen inside the
``_run_<name>`` functions, so that ``chronovisor --help`` imports neither.

Error policy: every failure the user can cause (a bad argument, file, config key or model) exits
with status 2 and one line on stderr, ``chronovisor COMMAND: error: ...``, naming the argument,
file or key and what is wrong. Anything else is a bug and shows its traceback; ``--debug`` shows
the traceback of a user error too.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Exit status of every failure the user can cause (argparse's own status for a bad argument).
USAGE_ERROR = 2
#: Seeds are torch and numpy generator seeds: non-negative and below 2**63.
SEED_LIMIT = 2**63


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line naming the command (and pointing at --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="chronovisor",
        description="Steer MoE routing with a P×T controller, and measure it honestly.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of an error")
    return parser


# ------------------------------------------------------------------ argument types
def _argument_type(convert: Callable[[str], Any], accept: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the text, then ``accept`` the value, else "expected <expected>".

    Args:
        convert: ``int`` or ``float``.
        accept: the range check.
        expected: what a valid value is, for the message.
    """

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _argument_type(int, lambda value: value >= 1, "a positive integer")
_seed = _argument_type(int, lambda value: 0 <= value < SEED_LIMIT, "a seed in [0, 2**63)")
_positive_float = _argument_type(float, lambda value: math.isfinite(value) and value > 0, "a finite number > 0")


# ------------------------------------------------------------------ shared arguments
def _add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("model", nargs=None if required else "?", help="a toy preset name (see `chronovisor inspect --presets`), a local model "
                                      "directory, or a hub id")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of a toy preset's weights (default 0)")
    parser.add_argument("--device-map", default=None, help='accelerate device map, e.g. "auto" (default: none)')
    parser.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                        help='per-device memory budget for device_map, e.g. "0=20GiB,cpu=60GiB"')
    parser.add_argument("--offload-folder", default=None, help="where accelerate offloads layers to disk")
    parser.add_argument("--dtype", default=None, help="torch dtype to load in, e.g. bfloat16")


def _parse_max_memory(text: str | None) -> dict | None:
    if not text:
        return None
    budget: dict = {}
    for item in text.split(","):
        device, sep, size = item.partition("=")
        if not sep or not size:
            raise ValueError(f"--max-memory: expected DEVICE=SIZE items, got {item!r}")
        budget[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size
    return budget


def _load_kwargs(args: argparse.Namespace) -> dict:
    return dict(seed=args.seed, device_map=args.device_map, max_memory=_parse_max_memory(args.max_memory),
                offload_folder=args.offload_folder, torch_dtype=args.dtype)


def _add_controller_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eta", type=float, default=0.015, help="geological rate η (default 0.015)")
    parser.add_argument("--pressure-scale", type=float, default=0.5, help="pressure scale P (default 0.5)")
    parser.add_argument("--mode", default="pt", help="off | pressure | temperature | pt (default pt)")
    parser.add_argument("--dynamics", default="reference", help="reference | paper | delayed | loss_free")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="any other PTConfig field, e.g. --set usage=ema (repeatable)")


def _controller_config(args: argparse.Namespace, **fixed):
    from chronovisor.controllers import PTConfig
    from chronovisor.eval.overrides import parse_assignment

    values = dict(eta=args.eta, pressure_scale=args.pressure_scale, mode=args.mode, dynamics=args.dynamics,
                  seed=args.seed)
    for item in args.set:
        name, value = parse_assignment(item, placeholder="FIELD", example="usage=ema")
        values[name] = value
    values.update(fixed)
    try:
        return PTConfig.from_dict(values)
    except ValueError as error:
        raise ValueError(f"invalid controller config: {error}") from None


def _add_log_with(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-with", default=None, choices=("tensorboard", "trackio"),
                        help="log to this accelerate tracker (TensorBoard: under --out/logs; trackio: its local "
                             "database); default: no tracking")


# ------------------------------------------------------------------ inspect
def _add_inspect(sub) -> None:
    parser = sub.add_parser("inspect", help="show a model's MoE routers, experts, top-k and parameters")
    _add_model_arguments(parser, required=False)
    parser.add_argument("--presets", action="store_true", help="list the toy presets instead")
    parser.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from chronovisor.model import load_base_model
    from chronovisor.wrappers import TOY_PRESETS, describe

    if args.presets:
        for name, preset in TOY_PRESETS.items():
            print(f"{name:18s} {preset.description}")
        return 0
    if args.model is None:
        raise ValueError("name a model (or pass --presets)")
    model = load_base_model(args.model, **_load_kwargs(args))
    info = describe(model)
    print(info.summary())
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"parameters: {total:,} total, {trainable:,} trainable (base model, before wrapping)")
    print(f"controller: {info.num_layers}x{info.num_experts} fields; learnable offsets would add "
          f"{2 * info.num_layers * info.num_experts:,} parameters")
    return 0


# ------------------------------------------------------------------ train
def _add_train(sub) -> None:
    parser = sub.add_parser("train", help="train the controller only (base frozen) and save it")
    _add_model_arguments(parser)
    _add_controller_arguments(parser)
    parser.add_argument("--out", required=True, help="directory for the trained controller (save_pretrained)")
    parser.add_argument("--data", default=None, help='JSONL conversations ({"turns": [...]} per line); '
                                                     "default: the synthetic conversation generator")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer directory for --data "
                                                          "(default: the model directory)")
    parser.add_argument("--conversations", type=_positive_int, default=32,
                        help="synthetic conversations (default 32)")
    parser.add_argument("--max-length", type=_positive_int, default=512, help="tokens per conversation (default 512)")
    parser.add_argument("--batch-size", type=_positive_int, default=4)
    parser.add_argument("--steps", type=_positive_int, default=200)
    parser.add_argument("--lr", type=_positive_float, default=0.05)
    parser.add_argument("--log-every", type=_positive_int, default=10)
    _add_log_with(parser)
    parser.set_defaults(func=_run_train)


def _check_train_inputs(args: argparse.Namespace) -> None:
    """Everything ``train`` can check before loading a model: --out, --data and its tokenizer."""
    from chronovisor.eval.jsonl import read_conversations
    from chronovisor.wrappers.toy import TOY_PRESETS

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory; name a new or existing directory")
    if args.data is None:
        return
    read_conversations(args.data)
    if args.tokenizer is None and args.model in TOY_PRESETS:
        raise ValueError(f"--data needs --tokenizer DIR with the toy preset {args.model} (a preset has no "
                         f"tokenizer of its own)")


def _training_batches(args: argparse.Namespace, model) -> list[dict]:
    from chronovisor.eval.data import iterate_batches
    from chronovisor.eval.jsonl import load_jsonl
    from chronovisor.eval.synthetic import ConversationConfig, ConversationGenerator

    if args.data is not None:
        tokenizer = args.tokenizer or args.model
        conversations = load_jsonl(args.data, tokenizer, max_length=args.max_length)
    else:
        vocab_size = model.config.vocab_size
        config = ConversationConfig(vocab_size=vocab_size, world_seed=args.seed,
                                    phase_vocab_size=min(200, (vocab_size - 1) // 2),
                                    topic_vocab_size=min(100, (vocab_size - 1) // 4))
        conversations = ConversationGenerator(config, seed=args.seed, split="train").sample(args.conversations)
    batches = []
    for batch in iterate_batches(conversations, args.batch_size, shuffle_seed=args.seed):
        length = min(args.max_length, batch.input_ids.shape[1])
        batches.append({"input_ids": batch.input_ids[:, :length], "attention_mask": batch.attention_mask[:, :length],
                        "labels": batch.labels[:, :length]})
    return batches


def _run_train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import chronovisor
    from chronovisor.eval.tracking import tracking_accelerator
    from chronovisor.training import TrainConfig, train_controller

    _check_train_inputs(args)
    train_config = TrainConfig(steps=args.steps, learning_rate=args.lr, log_every=args.log_every)
    config = _controller_config(args, learnable=True)
    model = chronovisor.load(args.model, config, freeze_base=True, **_load_kwargs(args))
    if getattr(model.config, "is_encoder_decoder", False) and args.data is None:
        raise ValueError("the synthetic data is for decoder-only models; pass --data for an encoder-decoder model")
    model.print_trainable_parameters()
    batches = _training_batches(args, model)
    accelerator = tracking_accelerator(args.log_with, Path(args.out) / "logs", "chronovisor-train",
                                       {"model": args.model, "steps": args.steps, "lr": args.lr, **config.to_dict()})
    log = train_controller(model, batches, train_config, accelerator=accelerator)
    accelerator.end_training()
    out = model.save_pretrained(args.out)
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"loss {log[0]['loss']:.4f} -> {log[-1]['loss']:.4f}; controller saved to {out} ({size / 1024:.1f} KiB)")
    return 0


# ------------------------------------------------------------------ sweep
def _add_sweep(sub) -> None:
    parser = sub.add_parser(
        "sweep", help="run a paired η × P × seed sweep from a YAML config (resumable, shardable)",
        description="Run every cell of a sweep config, one atomic JSON per cell; re-running resumes. "
                    "Shard over N processes with `accelerate launch --num_processes N -m chronovisor.cli sweep ...` "
                    "(on a CPU-only machine add --multi_gpu: accelerate's torchrun path).")
    parser.add_argument("config", help="YAML sweep config (see configs/ and chronovisor.eval.config)")
    parser.add_argument("--out", required=True, help="run directory (created; resumed if it exists)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key before validation, e.g. --set train.steps=20 "
                             "--set model=/path/to/model (value parsed as YAML; repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the cells (done/todo), run nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                        help="local engine: worker processes of cores/N torch threads each, cells handed out as "
                             "workers free up (default: one per usable core; 1 under accelerate launch)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: worker processes on this machine (default); ray: one Ray Tune trial per "
                             "stack of cells on a Ray cluster (pip install 'chronovisor[ray]'; --out on storage "
                             "every node mounts)")
    parser.add_argument("--address", default=None, metavar="HOST:PORT",
                        help="--engine ray: the cluster's head (default: RAY_ADDRESS, else a local Ray started here)")
    parser.add_argument("--gpus-per-cell", type=float, default=0.0, metavar="FRACTION",
                        help="--engine ray: GPUs each trial declares, e.g. 0.25 puts four cells on one GPU (default 0)")
    _add_log_with(parser)
    parser.set_defaults(func=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from chronovisor.eval.config import load_config
    from chronovisor.eval.rundir import RunDir
    from chronovisor.eval.sweep import describe_cells, distributed_shard, run_sweep, usable_cores

    config = load_config(args.config, args.set)
    run_dir = RunDir(args.out)
    if args.dry_run:
        run_dir.manifest_for(config.config_hash)
        print(describe_cells(config, run_dir if run_dir.path.is_dir() else None))
        return 0
    on_cell = None
    if args.log_with is not None:
        from chronovisor.eval.tracking import log_cell, tracking_accelerator

        accelerator = tracking_accelerator(args.log_with, run_dir.path / "logs", f"chronovisor-sweep-{config.name}",
                                           {"config_hash": config.config_hash, "cells": len(config.cells())})
        finished: list = []

        def on_cell(record) -> None:
            log_cell(accelerator, record, len(finished))
            finished.append(record.cell_id)

    if args.engine == "ray":
        from chronovisor.eval.ray_engine import run_sweep_ray

        if args.log_with is not None:
            raise ValueError("--log-with works with the local engine only; log a Ray sweep with Ray Tune's own "
                             "loggers, or drop --log-with")
        label = "ray"
        outcome = run_sweep_ray(config, run_dir, address=args.address, gpus_per_cell=args.gpus_per_cell,
                                progress=not args.no_progress, command=sys.argv)
    else:
        process_index, num_processes, device = distributed_shard()
        label = f"{process_index + 1}/{num_processes}"
        workers = args.workers or (1 if num_processes > 1 else usable_cores())
        outcome = run_sweep(config, run_dir, workers=workers, process_index=process_index,
                            num_processes=num_processes, device=device, progress=not args.no_progress,
                            command=sys.argv, on_cell=on_cell)
    if args.log_with is not None:
        accelerator.end_training()
    print(f"[{label}] ran {len(outcome.ran)} cells, skipped {len(outcome.skipped)} finished; run "
          f"{'complete' if outcome.complete else 'incomplete'} ({outcome.total_cells} cells) in {outcome.run_dir}",
          file=sys.stderr)
    return 0


# ------------------------------------------------------------------ eval
def _add_eval(sub) -> None:
    parser = sub.add_parser(
        "eval", help="held-out perplexity with the controller on and off on the same tokens",
        description="Perplexity of MODEL on --data with the controller on and off (same tokens, same batches), and "
                    "the per-sequence paired difference of the mean NLL per token with a t-interval. The controller "
                    "from --controller is frozen (no step) unless --online; without --controller a fresh one "
                    "(--eta, --pressure-scale, ...) steps after every batch. Prints the JSON (or writes --out) "
                    "and one table line.")
    _add_model_arguments(parser)
    _add_controller_arguments(parser)
    parser.add_argument("--controller", default=None, metavar="DIR",
                        help="a saved controller (save_pretrained); its saved config wins over --eta etc.")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help='held-out data: JSON lines {"turns": [...]} (.jsonl/.json) or plain text, one '
                             "sequence per line (loaded with datasets, local files only)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="local tokenizer directory (default: the model directory)")
    parser.add_argument("--max-length", type=_positive_int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per forward (default 8)")
    parser.add_argument("--online", action="store_true",
                        help="step the controller after every batch (default for a fresh controller)")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the JSON here instead of printing it")
    parser.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    import chronovisor
    from chronovisor.eval.perplexity import compare_perplexity
    from chronovisor.eval.text_datasets import as_conversation_batch, load_lm_dataset, local_tokenizer

    tokenizer_dir = args.tokenizer or args.model
    if not Path(tokenizer_dir).is_dir():
        raise ValueError(f"--tokenizer {tokenizer_dir}: not a local tokenizer directory "
                         f"(a toy preset has no tokenizer: pass --tokenizer DIR)")
    tokenizer = local_tokenizer(tokenizer_dir)
    dataset = load_lm_dataset(args.data, tokenizer, max_length=args.max_length)
    if args.controller is None:
        model = chronovisor.load(args.model, _controller_config(args), **_load_kwargs(args))
    else:
        model = chronovisor.load(args.model, controller_dir=args.controller, **_load_kwargs(args))
    vocab_size = model.get_input_embeddings().num_embeddings
    if max(max(ids) for ids in dataset["input_ids"]) >= vocab_size:
        raise ValueError(f"--tokenizer {tokenizer_dir} produces ids beyond the model's vocabulary "
                         f"({vocab_size}); use the model's own tokenizer")
    online = args.online or args.controller is None
    device = model.model.device if model.model.device.type != "meta" else "cpu"
    comparison = compare_perplexity(model, as_conversation_batch(dataset, tokenizer.pad_token_id),
                                    batch_size=args.batch_size, online=online, device=device)
    record = {"model": args.model, "controller": args.controller, "data": str(args.data),
              "tokenizer": str(tokenizer_dir), **dataclasses.asdict(comparison)}
    text = json.dumps(record, indent=2, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    print(comparison.line())
    return 0


# ------------------------------------------------------------------ report
def _add_report(sub) -> None:
    parser = sub.add_parser("report", help="summarise a sweep run: summary.md, heatmaps, trajectories")
    parser.add_argument("run_dir", help="a run directory written by `chronovisor sweep`")
    parser.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from chronovisor.eval.report import write_report

    report = write_report(args.run_dir)
    print(report.table)
    print(f"\nsummary: {report.summary_path}")
    for path in report.plots:
        print(f"plot:    {path}")
    return 0


# ------------------------------------------------------------------ reproduce
def _add_reproduce(sub) -> None:
    parser = sub.add_parser(
        "reproduce", help="re-run some cells of a published run here and compare them with it",
        description="Re-run N on-arm cells of a published run directory (each with its paired off arm) by the "
                    "sweep's own code into a scratch directory, and compare: bit-identical (same numerics, "
                    "equal loss, per-conversation losses and routing), else inside the published arm's 95% "
                    "prediction interval for a new seed, else not reproduced (exit status 1). The published "
                    "directory is only read.")
    parser.add_argument("run_dir", help="a published run directory (config.yaml, manifest.json, cells/)")
    parser.add_argument("--cells", type=_positive_int, required=True, metavar="N",
                        help="on-arm cells to re-run (their off arms come on top); more than published: all")
    parser.add_argument("--out", default=None, metavar="SCRATCH_DIR",
                        help="new or empty directory for the re-run cells (default: a fresh temporary directory)")
    parser.add_argument("--device", default=None,
                        help="where the cells run (default: the published device if this machine has it, else cpu)")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="torch intra-op threads for the re-run (default: the published cells' count when they "
                             "agree on one, so that a bit-identical check is possible; else torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_reproduce)


def _run_reproduce(args: argparse.Namespace) -> int:
    import torch

    from chronovisor.eval.reproduce import (
        describe_commit,
        describe_numerics,
        plan_reproduction,
        run_reproduction,
    )
    from chronovisor.eval.rundir import git_commit

    plan = plan_reproduction(args.run_dir, args.cells, out=args.out, device=args.device)
    published = plan.published
    threads = args.threads or plan.published_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    where = f"{plan.scratch.path} (a fresh temporary directory)" if plan.scratch_is_temporary else f"{plan.scratch.path}"
    print(f"reproducing {len(plan.chosen)} on-arm cells of {published.run_dir.path} (+ off arms: "
          f"{len(plan.rerun_cells)} cells re-run) into {where}")
    print(f"published: {describe_commit(published.manifest.get('git'))}; numerics "
          + " | ".join(describe_numerics(values) for values in plan.published_numerics()))
    print(f"here:      {describe_commit(git_commit())}; numerics {describe_numerics(plan.current_numerics())}", flush=True)
    result = run_reproduction(plan, progress=not args.no_progress, command=sys.argv)
    for check in result.checks:
        print(check.line())
    print(result.summary_line())
    print(f"re-run cells: {plan.scratch.path}")
    return 0 if result.ok else 1


# ------------------------------------------------------------------ real text: corpus, pretrain, study
def _add_run_arguments(parser: argparse.ArgumentParser, example_config: str, out_help: str, example_set: str) -> None:
    """CONFIG, --out, --set and --no-progress of the real-text commands."""
    parser.add_argument("config", help=f"YAML config, e.g. {example_config}")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example_set} (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_corpus(sub) -> None:
    """``chronovisor corpus``: build the real two-domain corpus (docs/real_text.md)."""
    parser = sub.add_parser("corpus", help="build the real-text corpus (stdlib prose + code), checked against "
                                           "its recorded hashes")
    parser.add_argument("--out", required=True, help="corpus directory (train.jsonl, heldout.jsonl, corpus.json)")
    parser.add_argument("--max-sources-per-kind", type=_positive_int, default=None, metavar="N",
                        help="a slice: the first N recorded sources of each kind (default: all)")

    def run(args: argparse.Namespace) -> int:
        from chronovisor.eval.corpus import build_corpus

        summary = build_corpus(args.out, max_sources_per_kind=args.max_sources_per_kind)
        for count in summary.counts:
            print(f"{count.domain:6s} {count.split:8s} {count.documents:5d} documents {count.characters:10,d} characters")
        for name, digest in summary.files.items():
            print(f"sha256 {digest}  {args.out}/{name}")
        return 0

    parser.set_defaults(func=run)


def _add_pretrain(sub) -> None:
    """``chronovisor pretrain``: train the Mixtral MoE from scratch on the corpus, beside its BPE tokenizer."""
    parser = sub.add_parser("pretrain", help="pretrain a Mixtral MoE from scratch on the real-text corpus")
    _add_run_arguments(parser, "configs/realtext/pretrain.yaml", "run directory (corpus/, model/, pretrain.json)",
                       "train.steps=20")

    def run(args: argparse.Namespace) -> int:
        from chronovisor.eval.pretrain import pretrain
        from chronovisor.eval.pretrain_config import load_pretrain_config

        record = pretrain(load_pretrain_config(args.config, args.set), args.out, progress=not args.no_progress)
        print(f"pretrained {record.parameters:,} parameters in {record.wall_time_s:.0f} s "
              f"({record.threads} threads); model: {args.out}/model")
        for row in record.heldout:
            print(f"held-out {row.domain:6s} ppl {row.perplexity:8.2f} | bigram {row.bigram_perplexity:8.2f} | "
                  f"unigram {row.unigram_perplexity:8.2f}")
        return 0

    parser.set_defaults(func=run)


def _add_study(sub) -> None:
    """``chronovisor study``: the frozen real-text study (arms x streams x seeds) and its report."""
    parser = sub.add_parser("study", help="run the frozen real-text study on a pretrained checkpoint (resumable)")
    _add_run_arguments(parser, "configs/realtext/study.yaml", "study directory (study.json, cells/, report.md)",
                       "seeds=5")
    parser.add_argument("--report-only", action="store_true", help="only write report.md from the finished cells")

    def run(args: argparse.Namespace) -> int:
        from chronovisor.eval.study import run_study
        from chronovisor.eval.study_config import load_study_config
        from chronovisor.eval.study_report import render_report

        if not args.report_only:
            run_study(load_study_config(args.config, args.set), args.out, progress=not args.no_progress)
        print(render_report(args.out))
        return 0

    parser.set_defaults(func=run)


_SUBCOMMANDS: list = [_add_inspect, _add_train, _add_sweep, _add_report, _add_reproduce, _add_eval, _add_corpus,
                      _add_pretrain, _add_study]


def _user_error(error: BaseException) -> BaseException | None:
    """The user-caused error behind ``error`` (itself or a cause it wraps), else None (a bug)."""
    from chronovisor.eval.errors import EvalError

    while error is not None:
        if isinstance(error, (EvalError, ValueError, OSError)):  # WrapperError is a ValueError
            return error
        error = error.__cause__
    return None


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status.

    Bad input (an unsupported model, a missing or corrupt file, an invalid config, argument or
    value, a directory that is not a run) exits with status 2 and one line on stderr naming the
    problem; ``--debug`` raises it with its traceback instead. Other errors propagate (bugs).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as error:
        cause = _user_error(error)
        if cause is None or args.debug:
            raise
        text = str(error) if cause is error or str(cause) in str(error) else f"{error}: {cause}"
        print(f"chronovisor {args.command}: error: {_one_line(text)}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
