"""``python -m benchmarks``: run the benchmarks, write JSON per benchmark and a markdown summary.

    python -m benchmarks [--quick] [--only NAME ...] [--threads N] [--device cpu|cuda]
                         [--dtype float32|bfloat16] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
import traceback

import torch

from benchmarks import BENCHMARKS, RESULTS_DIR, Context, environment, markdown_table, row, write_json

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
CUDA_DEFAULT = ("forward_overhead", "controller_step", "training_step", "sweep_batched", "mixtral_layer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only these ({', '.join(BENCHMARKS)})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: os.cpu_count())")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--out", default=None, help=f"output directory (default {RESULTS_DIR})")
    parser.add_argument("--prefix", default=None, help="file name prefix (default: gpu_ on CUDA, quick_ for --quick)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    dtype = DTYPES[args.dtype]
    names = args.only or (CUDA_DEFAULT if device.type == "cuda" else BENCHMARKS)
    command = "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:])
    ctx = Context(device=device, dtype=dtype, threads=threads, quick=args.quick, command=command.strip())
    out_dir = os.path.abspath(args.out) if args.out else str(RESULTS_DIR)
    prefix = args.prefix if args.prefix is not None else (
        ("gpu_" if device.type == "cuda" else "") + ("quick_" if args.quick else "")
        + (f"{args.dtype}_" if dtype != torch.float32 else ""))

    all_rows, started = [], time.perf_counter()
    print(f"# {command.strip()}  ({threads} threads, {device}, {args.dtype})", flush=True)
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        env_before = environment(ctx)
        start = time.perf_counter()
        try:
            result = module.run(ctx)
        except Exception as error:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {error}",
                      "rows": [row(name, "FAILED", f"{type(error).__name__}: {str(error).splitlines()[0][:160]}",
                                   met=False)]}
        result.update(benchmark=name, command=ctx.command, wall_s=time.perf_counter() - start,
                      environment=env_before, loadavg_after=list(os.getloadavg()))
        write_json(os.path.join(out_dir, f"{prefix}{name}.json"), result)
        print(markdown_table(result["rows"]), f"\n({name}: {result['wall_s']:.1f} s)\n", flush=True)
        all_rows += result["rows"]

    env = environment(ctx)
    header = (f"Command: `{ctx.command}` — {env['cpu']} ({env['cpu_count']} CPUs), {threads} torch threads, "
              f"torch {env['torch']}, transformers {env['transformers']}, device {device}"
              + (f" ({env.get('gpu')})" if device.type == "cuda" else "") + f", dtype {args.dtype}, "
              f"load average at the end {env['loadavg'][0]:.2f}; total {time.perf_counter() - started:.0f} s")
    table = markdown_table(all_rows)
    summary_path = os.path.join(out_dir, f"{prefix}summary.md")
    os.makedirs(out_dir, exist_ok=True)
    with open(summary_path, "w") as handle:
        handle.write(header + "\n\n" + table + "\n")
    print(header + "\n\n" + table)
    print(f"\nwritten: {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
