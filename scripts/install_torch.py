"""Install torch into the running interpreter's environment when it is missing: the CPU build on a
machine without CUDA.

    python scripts/install_torch.py "torch==2.13.0" [--index URL] [--dry-run]

* torch importable already: nothing is installed (install the build you want first, e.g. a CUDA one).
* an NVIDIA driver present (``nvidia-smi`` on PATH): plain ``pip install SPEC``, the CUDA build.
* otherwise PyTorch's CPU wheel index (``--index``) when it answers within 5 s, else plain pip
  (whatever the configured index holds; on PyPI for Linux that is the multi-GB CUDA build).

The first line printed says which of these happened. Only the standard library is used: this runs
before anything else is installed (``make env``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def index_reachable(index: str, timeout: float = 5.0) -> bool:
    """Whether ``index`` serves a torch project page (``INDEX/torch/``) within ``timeout`` seconds.

    Args:
        index: a PEP 503 simple index URL.
        timeout: seconds to wait for the answer.
    """
    try:
        with urllib.request.urlopen(f"{index.rstrip('/')}/torch/", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def plan(spec: str, index: str) -> tuple[str, list[str] | None]:
    """(what happens, in one line; the pip arguments, or None when nothing is to be installed).

    Args:
        spec: the torch requirement, e.g. ``torch==2.13.0``.
        index: PyTorch's CPU wheel index.
    """
    if importlib.util.find_spec("torch") is not None:
        return f"torch: {importlib.metadata.version('torch')} already installed, nothing to do", None
    if shutil.which("nvidia-smi"):
        return (f"torch: NVIDIA driver found (nvidia-smi): installing {spec} with plain pip (the CUDA build)",
                [spec])
    if index_reachable(index):
        return (f"torch: no CUDA on this machine: installing the CPU build of {spec} from PyTorch's CPU index "
                f"{index}", ["--index-url", index, spec])
    return (f"torch: no CUDA on this machine and PyTorch's CPU index {index} is not reachable: installing {spec} "
            "with plain pip from the configured index", [spec])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="the torch requirement, e.g. torch==2.13.0")
    parser.add_argument("--index", default=CPU_INDEX, help=f"PyTorch's CPU wheel index (default {CPU_INDEX})")
    parser.add_argument("--dry-run", action="store_true", help="print the pip command instead of running it")
    args = parser.parse_args(argv)
    message, pip_args = plan(args.spec, args.index)
    print(message, flush=True)
    if pip_args is None:
        return 0
    command = [sys.executable, "-m", "pip", "install", "-q", *pip_args]
    if args.dry_run:
        print(" ".join(command))
        return 0
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
