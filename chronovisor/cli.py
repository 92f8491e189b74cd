"""The ``chronovisor`` command line.

Each subcommand has one ``_add_<name>`` function that declares its arguments and points
``func`` at the code that runs it; the heavy imports happen inside those functions so that
``chronovisor --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chronovisor",
        description="Steer MoE routing with a P×T controller, and measure it honestly.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


# ------------------------------------------------------------------ shared arguments
def _add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("model", nargs=None if required else "?", help="a toy preset name (see `chronovisor inspect --presets`), a local model "
                                      "directory, or a hub id")
    parser.add_argument("--seed", type=int, default=0, help="seed of a toy preset's weights (default 0)")
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
            raise SystemExit(f"--max-memory: expected DEVICE=SIZE items, got {item!r}")
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
        raise SystemExit(f"invalid controller config: {error}") from None


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
        raise SystemExit("chronovisor inspect: name a model (or pass --presets)")
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
    parser.add_argument("--conversations", type=int, default=32, help="synthetic conversations (default 32)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per conversation (default 512)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--log-every", type=int, default=10)
    parser.set_defaults(func=_run_train)


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

    import chronovisor
    from chronovisor.training import TrainConfig, train_controller

    config = _controller_config(args, learnable=True)
    model = chronovisor.load(args.model, config, freeze_base=True, **_load_kwargs(args))
    if getattr(model.config, "is_encoder_decoder", False) and args.data is None:
        raise SystemExit("chronovisor train: the synthetic data is for decoder-only models; "
                         "pass --data for an encoder-decoder model")
    model.print_trainable_parameters()
    batches = _training_batches(args, model)
    log = train_controller(model, batches, TrainConfig(steps=args.steps, learning_rate=args.lr,
                                                       log_every=args.log_every))
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
    if args.engine == "ray":
        from chronovisor.eval.ray_engine import run_sweep_ray

        label = "ray"
        outcome = run_sweep_ray(config, run_dir, address=args.address, gpus_per_cell=args.gpus_per_cell,
                                progress=not args.no_progress, command=sys.argv)
    else:
        process_index, num_processes, device = distributed_shard()
        label = f"{process_index + 1}/{num_processes}"
        workers = args.workers or (1 if num_processes > 1 else usable_cores())
        outcome = run_sweep(config, run_dir, workers=workers, process_index=process_index,
                            num_processes=num_processes, device=device, progress=not args.no_progress,
                            command=sys.argv)
    print(f"[{label}] ran {len(outcome.ran)} cells, skipped {len(outcome.skipped)} finished; run "
          f"{'complete' if outcome.complete else 'incomplete'} ({outcome.total_cells} cells) in {outcome.run_dir}",
          file=sys.stderr)
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
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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


_SUBCOMMANDS: list = [_add_inspect, _add_train, _add_sweep, _add_report, _add_reproduce]


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Bad input (an unsupported model, a missing file, an invalid config or
    value, a directory that is not a run) exits with status 1 and a one-line message naming the
    problem (no traceback)."""
    from chronovisor.eval.errors import EvalError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (EvalError, ValueError, FileNotFoundError) as error:  # WrapperError is a ValueError
        raise SystemExit(f"chronovisor {args.command}: error: {error}") from None


if __name__ == "__main__":
    sys.exit(main())
