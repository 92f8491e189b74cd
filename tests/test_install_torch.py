"""scripts/install_torch.py: which torch `make env` installs, and that it says so."""

import functools
import http.server
import socket
import subprocess
import sys
import threading
import venv
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_torch.py"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """The interpreter of a fresh virtual environment without torch (and without pip)."""
    root = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=False).create(root)
    return str(root / "bin" / "python")


@pytest.fixture(scope="module")
def cpu_index(tmp_path_factory):
    """A local simple index with a ``torch/`` page, served over HTTP for the module."""
    root = tmp_path_factory.mktemp("index")
    (root / "torch").mkdir()
    (root / "torch" / "index.html").write_text("<html><body></body></html>")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/"


def run(python: str, *args: str) -> list[str]:
    """The script's output lines, run with an empty PATH: no ``nvidia-smi``, so a CPU-only machine."""
    done = subprocess.run([python, str(SCRIPT), "torch==2.13.0", "--dry-run", *args], capture_output=True,
                          text=True, check=True, timeout=60, env={"PATH": ""})
    return done.stdout.splitlines()


def test_an_environment_that_already_has_torch_installs_nothing_and_says_so():
    lines = run(sys.executable)
    assert len(lines) == 1
    assert lines[0].startswith("torch: ") and lines[0].endswith(" already installed, nothing to do")


def test_without_cuda_the_cpu_build_comes_from_pytorchs_cpu_index_when_it_answers(bare_python, cpu_index):
    message, command = run(bare_python, "--index", cpu_index)
    assert message == (f"torch: no CUDA on this machine: installing the CPU build of torch==2.13.0 from PyTorch's "
                       f"CPU index {cpu_index}")
    assert command.endswith(f"-m pip install -q --index-url {cpu_index} torch==2.13.0")


def test_without_cuda_and_an_unreachable_cpu_index_plain_pip_is_used_and_said(bare_python):
    url = closed_port_url()
    message, command = run(bare_python, "--index", url)
    assert message == (f"torch: no CUDA on this machine and PyTorch's CPU index {url} is not reachable: installing "
                       "torch==2.13.0 with plain pip from the configured index")
    assert command.endswith("-m pip install -q torch==2.13.0")
