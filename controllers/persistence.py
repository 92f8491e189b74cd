"""A saved controller directory: written atomically, read back only when it is whole and consistent.

    DIRECTORY/controller.safetensors     the state (every buffer and learnable offset, float32)
    DIRECTORY/controller_config.json     shape, ticks, config(s), family, the state's SHA-256, metadata

Writing: both files go into a fresh temporary directory next to ``DIRECTORY`` (other files already
in ``DIRECTORY`` are hard-linked into it), which then takes the place of ``DIRECTORY`` (an atomic
exchange on Linux). A failure at any point leaves the previous controller as it was.

Reading (:func:`read_saved`, :func:`check_state`): a missing file raises FileNotFoundError; a file
that is not what :func:`write_controller` writes (not JSON, a missing or mistyped key, a config
field left out, a state whose bytes differ from the recorded checksum, a tensor of another name or
shape, a non-finite or out-of-range value) raises :class:`ControllerFileError` naming the file and
the field.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chronovisor.controllers.config import PTConfig
from chronovisor.json_file import read_json_object

STATE_FILE = "controller.safetensors"
CONFIG_FILE = "controller_config.json"
FORMAT_VERSION = 1
#: Keys :meth:`PTController.describe` writes; ``save(metadata=...)`` may not overwrite them.
RESERVED_KEYS = ("format_version", "num_layers", "num_experts", "top_k", "ticks", "config", "configs", "family",
                 "state_sha256")
#: State tensors whose values must be > 0 (temperatures) or >= 0 (usage and counts).
_POSITIVE = ("_fast_temperature", "_temperature_local", "_effective_temperature", "_temperature_global")
_NON_NEGATIVE = ("_usage", "_tick_counts")
#: The one state tensor that holds NaN by design (ticks without a loss).
_NAN_ALLOWED = ("_loss_window",)


class ControllerFileError(ValueError):
    """A saved controller is corrupt or inconsistent; the message names the file and the field."""


# ------------------------------------------------------------------------------ writing
def write_controller(directory: str | Path, tensors: dict[str, torch.Tensor], description: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``description`` (plus the state's checksum) as one atomic replacement.

    Args:
        directory: the controller directory (created; an existing one is replaced as a whole,
            keeping its other files).
        tensors: the state, on the CPU and contiguous.
        description: the JSON-able shape, ticks, config and metadata.

    Returns:
        ``directory`` as a Path.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target}: exists and is not a directory; save the controller into a directory")
    final = target.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".saving", dir=final.parent))
    try:
        if final.is_dir():
            shutil.copytree(final, staging, symlinks=True, dirs_exist_ok=True, copy_function=_link_or_copy,
                            ignore=lambda where, names: [n for n in names if Path(where) == final
                                                         and n in (STATE_FILE, CONFIG_FILE)])
        save_file(tensors, str(staging / STATE_FILE), metadata={"format": "chronovisor-pt"})
        description = {**description, "state_sha256": _sha256(staging / STATE_FILE)}
        with open(staging / CONFIG_FILE, "w") as handle:
            handle.write(json.dumps(description, indent=2, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _swap_in(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _swap_in(staging: Path, final: Path) -> None:
    """Put ``staging`` at ``final``, removing the previous ``final``.

    Where the kernel can exchange two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``) that
    is used, so ``final`` is always a whole controller; elsewhere the previous directory is renamed
    aside first (for an instant ``final`` is missing, the old controller intact beside it).
    """
    if not final.exists():
        os.rename(staging, final)
        return
    if _exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".previous", dir=final.parent))
    os.rmdir(previous)
    os.rename(final, previous)
    try:
        os.rename(staging, final)
    except BaseException:
        os.rename(previous, final)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with ``renameat2(..., RENAME_EXCHANGE)``; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class SavedController:
    """What ``controller_config.json`` says, validated.

    Attributes:
        directory: where it was read from.
        num_layers, num_experts, top_k: the controller's shape.
        ticks: ticks run before it was saved.
        configs: one PTConfig, or one per group of a stacked controller (``stacked``).
        family: the model family it was attached to when saved (None: never attached).
        state_sha256: the checksum of ``controller.safetensors`` (None in files written before it existed).
        description: the whole JSON object (metadata included).
    """

    directory: Path
    num_layers: int
    num_experts: int
    top_k: int
    ticks: int
    configs: tuple[PTConfig, ...]
    stacked: bool
    family: str | None
    state_sha256: str | None
    description: dict[str, Any]

    @property
    def shape(self) -> dict[str, int]:
        """``num_layers``, ``num_experts`` and ``top_k``."""
        return {"num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k}


def read_saved(directory: str | Path) -> SavedController:
    """Read and validate ``controller_config.json`` (and check both files exist).

    Raises:
        FileNotFoundError: a file is missing (the message names it).
        ControllerFileError: the JSON is not what :func:`write_controller` writes.
    """
    directory = Path(directory)
    for name in (STATE_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no saved controller in {directory}: {name} is missing")
    path = directory / CONFIG_FILE
    description = read_json_object(path, ControllerFileError)

    def fail(key: str, problem: str) -> ControllerFileError:
        return ControllerFileError(f"{path}: field {key!r} {problem}")

    if description.get("format_version") != FORMAT_VERSION:
        raise fail("format_version", f"is {description.get('format_version')!r}, expected {FORMAT_VERSION}")
    numbers = {}
    for key, minimum in (("num_layers", 1), ("num_experts", 2), ("top_k", 1), ("ticks", 0)):
        if key not in description:
            raise fail(key, "is missing")
        value = description[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise fail(key, f"must be an integer >= {minimum}, got {value!r}")
        numbers[key] = value
    if numbers["top_k"] > numbers["num_experts"]:
        raise fail("top_k", f"({numbers['top_k']}) exceeds num_experts ({numbers['num_experts']})")
    stacked = "configs" in description
    if stacked == ("config" in description):
        raise fail("config", "must be given once: either 'config' (one controller) or 'configs' (stacked)")
    raw = description["configs"] if stacked else [description["config"]]
    if not isinstance(raw, list) or not raw:
        raise fail("configs", "must be a non-empty list of PTConfig objects")
    configs = tuple(_config(item, path, f"configs[{i}]" if stacked else "config") for i, item in enumerate(raw))
    family = description.get("family")
    if family is not None and not isinstance(family, str):
        raise fail("family", f"must be a string or null, got {family!r}")
    checksum = description.get("state_sha256")
    if checksum is not None and not isinstance(checksum, str):
        raise fail("state_sha256", f"must be a hex string, got {checksum!r}")
    return SavedController(directory, numbers["num_layers"], numbers["num_experts"], numbers["top_k"],
                           numbers["ticks"], configs, stacked, family, checksum, description)


def _config(value: Any, path: Path, key: str) -> PTConfig:
    if not isinstance(value, dict):
        raise ControllerFileError(f"{path}: field {key!r} must be an object of PTConfig fields, got {value!r}")
    missing = [f.name for f in dataclasses.fields(PTConfig) if f.name not in value]
    if missing:
        raise ControllerFileError(f"{path}: field {key!r} lacks {', '.join(missing)} (a saved controller records "
                                  f"every PTConfig field; re-save it, or restore the field)")
    try:
        return PTConfig.from_dict(value)
    except (TypeError, ValueError) as error:
        raise ControllerFileError(f"{path}: field {key!r}: {error}") from None


def read_state(saved: SavedController, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``controller.safetensors``, checked against the checksum and ``expected``.

    Args:
        saved: the validated description (its checksum is verified when it has one).
        expected: the receiving controller's ``state_dict()``: the names and shapes required.

    Raises:
        ControllerFileError: unreadable, corrupt (checksum), another set of tensors or shapes, a
            non-finite value (NaN is allowed only in the loss window), a temperature <= 0 or a
            negative usage; the message names the file and the tensor.
    """
    path = saved.directory / STATE_FILE
    if saved.state_sha256 is not None and _sha256(path) != saved.state_sha256:
        raise ControllerFileError(f"{path}: its bytes do not match the state_sha256 recorded in {CONFIG_FILE} "
                                  f"(the file is corrupt or was replaced); save the controller again")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ControllerFileError(f"{path}: not a readable safetensors file ({error})") from None
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ControllerFileError(f"{path}: tensors do not match this controller (missing: {', '.join(missing) or '-'}; "
                                  f"unexpected: {', '.join(extra) or '-'})")
    for name, tensor in tensors.items():
        problem = _tensor_problem(name, tensor, expected[name])
        if problem:
            raise ControllerFileError(f"{path}: tensor {name!r} {problem}")
    return tensors


def _tensor_problem(name: str, tensor: torch.Tensor, expected: torch.Tensor) -> str | None:
    if tuple(tensor.shape) != tuple(expected.shape):
        return f"has shape {tuple(tensor.shape)}, this controller needs {tuple(expected.shape)}"
    if not tensor.is_floating_point():
        return f"has dtype {tensor.dtype}, expected a floating-point tensor"
    values = tensor.double()
    bad = torch.isinf(values) if name in _NAN_ALLOWED else ~torch.isfinite(values)
    if bool(bad.any()):
        return "holds non-finite values (NaN or infinity)"
    if name in _POSITIVE and bool((values <= 0).any()):
        return "holds a temperature <= 0"
    if name in _NON_NEGATIVE and bool((values < 0).any()):
        return "holds a negative usage or count"
    if name == "_phases" and bool(((values < 0) | (values > 2 * math.pi)).any()):
        return "holds a phase outside [0, 2π]"
    return None
