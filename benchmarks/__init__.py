"""Chronovisor performance benchmarks: ratios measured side by side in one run, never timed tests.

    python -m benchmarks                      # every CPU benchmark, ~3-5 minutes on 2 cores
    python -m benchmarks --quick              # smoke run, small shapes, well under a minute
    python -m benchmarks --only forward_overhead controller_step
    python -m benchmarks --device cuda --dtype bfloat16 --only forward_overhead controller_step

Each benchmark is a module of this package with ``NAME`` and ``run(ctx) -> dict``; the dict has
``rows`` (the lines of the summary table) plus whatever detail the benchmark measured. The entry
point writes ``benchmarks/results/<prefix><name>.json`` per benchmark (``prefix`` is ``gpu_`` on
CUDA, ``quick_`` for ``--quick``) and ``<prefix>summary.md`` with the table, which it also prints.

These are measurements, not tests: nothing here asserts a timing. Targets are reported as met or
not, with the numbers. Timings on a shared or busy machine are noisy; every JSON records the load
average before and after, and forward-time ratios come from *interleaved* runs (arms alternate
within each round, in rotating order), so slow drift cancels in the pairwise ratios.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Benchmark modules in run order.
BENCHMARKS = ("forward_overhead", "controller_step", "training_step", "sweep_batched", "compile_speedup",
              "sweep_workers", "train_compile", "mixtral_layer")


@dataclass
class Context:
    """What every benchmark gets: where to run, how long, and a place to share measurements."""

    device: torch.device
    dtype: torch.dtype
    threads: int
    quick: bool
    command: str
    seed: int = 0
    #: measurements one benchmark leaves for another (e.g. the plain forward time for step costs).
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(ctx: Context) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(ctx.device),
        "dtype": ctx.dtype_name(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if ctx.is_cuda:
        info["gpu"] = torch.cuda.get_device_name(ctx.device)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> float:
    """Seconds per call of ``fn`` (mean over ``repeats`` back-to-back calls), device work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def interleaved(arms: dict[str, Callable[[], Any]], device: torch.device, rounds: int, warmup: int = 2,
                repeats: int = 1) -> dict[str, list[float]]:
    """Time every arm once per round, the arms in a rotated order each round; returns seconds per arm.

    Rotation puts each arm first equally often, so neither cache warmth nor drift favours one.
    ``warmup`` rounds run first and are discarded.
    """
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(arms[name], device, repeats))
    return times


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median / min / mean / stdev in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "mean_ms": statistics.fmean(ms),
        "stdev_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0,
        "n": len(ms),
    }


def ratio_stats(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Ratio of medians, median of the per-round (pairwise) ratios, and the ratio of minima."""
    pairwise = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {
        "ratio_of_medians": statistics.median(numerator) / statistics.median(denominator),
        "median_pairwise_ratio": statistics.median(pairwise),
        "ratio_of_minima": min(numerator) / min(denominator),
        "pairwise_ratios": pairwise,
    }


# ----------------------------------------------------------------------------------- models
def build_model(name: str, ctx: Context, seed: int | None = None) -> torch.nn.Module:
    """A toy preset on the context's device and dtype (eval mode, seeded init)."""
    from chronovisor.wrappers import build_toy

    model = build_toy(name, seed=ctx.seed if seed is None else seed)
    return model.to(device=ctx.device, dtype=ctx.dtype).eval()


def token_batch(batch: int, length: int, vocab: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


# ------------------------------------------------------------------------------------ rows
def row(benchmark: str, metric: str, value: float | str, unit: str = "", target: str = "",
        met: bool | None = None, note: str = "") -> dict[str, Any]:
    return {"benchmark": benchmark, "metric": metric, "value": value, "unit": unit, "target": target,
            "met": met, "note": note}


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.001 <= abs(value) < 10000:
            return f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | metric | value | target | met | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = format_value(r["value"]) + (f" {r['unit']}" if r["unit"] else "")
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['benchmark']} | {r['metric']} | {value} | {r['target']} | {met} | {r['note']} |")
    return "\n".join(lines)


def write_json(path: Path | str, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (torch.device, torch.dtype, Path)):
        return str(value)
    return repr(value)
