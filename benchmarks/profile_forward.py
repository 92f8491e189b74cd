"""Where the wrapped forward's extra time goes (a diagnostic, not part of the default run).

    python -m benchmarks.profile_forward [--device cuda] [--dtype bfloat16] [--batch 8 --length 512]

For mixtral-2l8e: torch.profiler over a few plain and wrapped (``pt``, non-trivial fields)
forwards — wall time, aten operator calls and (on CUDA) kernel launches per forward, the ops the
wrapped forward adds — and cProfile of the wrapped forward's chronovisor functions (the Python
side of the hooks), plus the same for one controller ``step()``. Writes
``benchmarks/results/<prefix>profile_forward.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

import chronovisor
from benchmarks import RESULTS_DIR, Context, build_model, environment, synchronize, token_batch, write_json

MODEL = "mixtral-2l8e"


def _op_counts(fn, device: torch.device, calls: int) -> tuple[collections.Counter, int, float]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    ops: collections.Counter = collections.Counter()
    launches = 0
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            ops[event.key] += event.count
        if event.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"):
            launches += event.count
    cpu_us = sum(e.self_cpu_time_total for e in prof.key_averages()) / calls
    return ops, launches // calls, cpu_us


def _cprofile(fn, calls: int, top: int = 15) -> list[dict]:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        rows.append({"function": f"{os.path.relpath(filename) if filename.startswith('/') else filename}:{line}({name})",
                     "calls_per_forward": ncalls / calls, "tottime_us_per_forward": 1e6 * tottime / calls,
                     "cumtime_us_per_forward": 1e6 * cumtime / calls})
    ours = [r for r in rows if any(part in r["function"] for part in ("controllers/", "wrappers/", "chronovisor/"))]
    return sorted(ours, key=lambda r: -r["cumtime_us_per_forward"])[:top]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_forward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    ctx = Context(device=device, dtype=getattr(torch, args.dtype), threads=torch.get_num_threads(), quick=False,
                  command="python -m benchmarks.profile_forward")
    calls = 20 if device.type == "cuda" else 3

    plain = build_model(MODEL, ctx)
    cm = chronovisor.wrap(build_model(MODEL, ctx), chronovisor.PTConfig(mode="pt"), step_mode="manual")
    ids = token_batch(args.batch, args.length, plain.config.vocab_size, device)
    result: dict = {"environment": environment(ctx), "model": MODEL, "batch": args.batch, "length": args.length}
    with torch.inference_mode():
        for _ in range(10):
            cm(input_ids=ids, use_cache=False)
            cm.controller.step()

        def run_plain():
            plain(input_ids=ids, use_cache=False)

        def run_wrapped():
            cm(input_ids=ids, use_cache=False)

        def run_step():
            cm.controller.step()

        for name, fn in (("plain", run_plain), ("wrapped", run_wrapped), ("step", run_step)):
            for _ in range(5):
                fn()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            synchronize(device)
            ops, launches, cpu_us = _op_counts(fn, device, calls)
            result[name] = {"wall_ms": 1e3 * (time.perf_counter() - start) / calls,
                            "aten_calls": sum(ops.values()), "kernel_launches": launches,
                            "profiler_self_cpu_us": cpu_us, "ops": dict(ops.most_common())}
        added = collections.Counter(result["wrapped"]["ops"])
        added.subtract(result["plain"]["ops"])
        result["ops_added_by_wrapping"] = {k: v / calls for k, v in added.most_common() if v > 0}
        result["chronovisor_python_wrapped_forward"] = _cprofile(run_wrapped, calls)
        result["chronovisor_python_step"] = _cprofile(run_step, 5 * calls)

    prefix = ("gpu_" if device.type == "cuda" else "") + (f"{args.dtype}_" if args.dtype != "float32" else "")
    write_json(os.path.join(args.out, f"{prefix}profile_forward.json"), result)
    for name in ("plain", "wrapped", "step"):
        r = result[name]
        print(f"{name:8s} wall {r['wall_ms']:.3f} ms  aten calls {r['aten_calls'] / calls:.0f}  "
              f"kernel launches {r['kernel_launches']}  (per call)")
    print("ops added per wrapped forward:", dict(list(result["ops_added_by_wrapping"].items())[:25]))
    print("chronovisor Python, per wrapped forward (cumulative µs):")
    for r in result["chronovisor_python_wrapped_forward"][:12]:
        print(f"  {r['cumtime_us_per_forward']:8.1f} µs  x{r['calls_per_forward']:.0f}  {r['function']}")
    print("chronovisor Python, per step() (cumulative µs):")
    for r in result["chronovisor_python_step"][:8]:
        print(f"  {r['cumtime_us_per_forward']:8.1f} µs  x{r['calls_per_forward']:.1f}  {r['function']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
