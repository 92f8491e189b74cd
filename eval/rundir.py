"""The run directory of a sweep: its layout, atomic writes, the manifest and which cells are finished.

    RUN_DIR/manifest.json                 config, its hash, cell ids, versions, git commit, times
    RUN_DIR/config.yaml                   the resolved config
    RUN_DIR/cells/<cell_id>.json          one per finished cell (written last, atomically: the marker)
    RUN_DIR/cells/<cell_id>.routing.npz   held-out routing of that cell (for routing preservation)
    RUN_DIR/bases/                        pretrained frozen bases (frozen / controller_only)
    RUN_DIR/claims/<cell_id>.claim        a stack being run now (locked by the process running it)
    RUN_DIR/summary.md, RUN_DIR/plots/    the report
    RUN_DIR/tables/<name>.csv             every table of summary.md as CSV

:class:`RunDir` is the only code that knows these paths; the sweep writes through it and the
report reads through it.

Several processes may work on one directory at once (the worker pool of one sweep, two sweeps
started on the same ``--out``, the trials of the Ray engine on several machines over shared
storage): a process runs a stack only while it holds that stack's *claim*, an exclusive
``flock`` on ``claims/<first cell id>.claim`` (:meth:`RunDir.try_claim`). The kernel drops the
lock when its process dies, however it dies, so a claim is never left held by a dead process;
the file it leaves behind, and the temporary files of writes it did not finish, are removed by
:meth:`RunDir.clean_stale` at the start of the next run. ``flock`` excludes processes on one
machine; across machines it needs a shared file system that implements it (NFSv4, Lustre,
GPFS, CephFS do; Linux NFS clients map it to POSIX byte-range locks).
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml

from chronovisor.eval.errors import RunDirError
from chronovisor.eval.record import ArmResult, CellRecord
from chronovisor.eval.specs import stable_hash
from chronovisor.json_file import read_json_object

MANIFEST = "manifest.json"
RESOLVED_CONFIG = "config.yaml"
CELLS_DIR = "cells"
ROUTING_SUFFIX = ".routing.npz"
BASES_DIR = "bases"
SUMMARY = "summary.md"
PLOTS_DIR = "plots"
TABLES_DIR = "tables"
CLAIMS_DIR = "claims"
CLAIM_SUFFIX = ".claim"
MANIFEST_FORMAT = 1
#: A temporary file or staging directory this old was left by a write that will never finish
#: (one atomic write takes seconds), whichever machine started it.
STALE_AGE_S = 3600.0
#: What a cell id looks like (:attr:`~chronovisor.eval.specs.CellSpec.cell_id`): a plain file name,
#: so that no manifest can make the report read outside ``cells/``.
CELL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: Manifest keys the report reads, and their JSON types.
_MANIFEST_KEYS = {"name": str, "config": dict, "config_hash": str, "cells": list, "versions": dict}


# ------------------------------------------------------------------------------ atomic writes
def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write via a temporary file in the same directory and ``os.replace`` it into place.

    Args:
        path: the final file (its directory is created).
        write: called with the open binary handle of the temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON (numpy scalars and arrays as numbers and lists), written atomically."""
    atomic_write(path, lambda handle: handle.write((json.dumps(value, indent=2, default=_json_default) + "\n").encode()))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


_HOST = socket.gethostname().replace(".", "-")


def temporary_path(path: Path, pid: int | None = None) -> Path:
    """Where process ``pid`` (default: this one) of this machine writes ``path`` before renaming it:
    ``.<name>.<host>.<pid>.tmp`` beside it, so that :meth:`RunDir.clean_stale` can tell whose it is."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid() if pid is None else pid}.tmp")


def _temporary_writer(name: str) -> tuple[str, int] | None:
    """(host, pid) of the process that is writing the temporary file ``name`` (None if not one)."""
    parts = name.split(".")
    if len(parts) < 5 or parts[0] or parts[-1] != "tmp" or not parts[-2].isdigit():
        return None
    return parts[-3], int(parts[-2])


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


# ------------------------------------------------------------------------------ claims
class Claim:
    """An exclusive hold on one stack of cells (see :meth:`RunDir.try_claim`); release it when done.

    Args:
        path: the claim file.
        descriptor: the open descriptor that holds the ``flock``.
    """

    def __init__(self, path: Path, descriptor: int):
        self.path, self._descriptor = path, descriptor

    def release(self) -> None:
        """Remove the claim file, then drop the lock (in this order, see :meth:`RunDir.try_claim`)."""
        if self._descriptor < 0:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._descriptor)
        self._descriptor = -1

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _lock(path: Path) -> int | None:
    """A descriptor holding an exclusive ``flock`` on the file at ``path`` (created if missing), or
    None when another open file description holds it.

    A holder removes the file before it unlocks, so a lock taken on a file that is no longer at
    ``path`` is worthless: then try again with the file now there.
    """
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            return descriptor
        os.close(descriptor)


# ------------------------------------------------------------------------------ the directory
class RunDir:
    """One sweep's run directory.

    Args:
        path: the directory (created on the first write).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of(cls, run_dir: RunDir | str | Path) -> RunDir:
        """``run_dir`` itself if it is a RunDir, else the RunDir at that path."""
        return run_dir if isinstance(run_dir, RunDir) else cls(run_dir)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- paths ---------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def cells_dir(self) -> Path:
        return self.path / CELLS_DIR

    def cell_path(self, cell_id: str) -> Path:
        """``cells/<cell_id>.json``; :class:`RunDirError` for an id that is not a plain file name."""
        if not isinstance(cell_id, str) or not CELL_ID.match(cell_id) or ".." in cell_id:
            raise RunDirError(f"{self.manifest_path}: cell id {cell_id!r} is not a cell file name "
                              f"(letters, digits, '.', '_', '+', '-'); the manifest is corrupt")
        return self.cells_dir / f"{cell_id}.json"

    def routing_path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}{ROUTING_SUFFIX}"

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def plots_dir(self) -> Path:
        return self.path / PLOTS_DIR

    @property
    def tables_dir(self) -> Path:
        return self.path / TABLES_DIR

    @property
    def claims_dir(self) -> Path:
        return self.path / CLAIMS_DIR

    def base_dir(self, name: str) -> Path:
        """The directory of the cached pretrained base ``name`` (see :mod:`.bases`)."""
        return self.path / BASES_DIR / name

    # -- cells ---------------------------------------------------------------------------------
    def is_finished(self, cell_id: str) -> bool:
        """True if the cell's JSON exists and is a complete record of this cell."""
        try:
            record = json.loads(self.cell_path(cell_id).read_text())
        except (OSError, ValueError):
            return False
        return record.get("cell_id") == cell_id and self.routing_path(cell_id).is_file()

    def save_cell(self, result: ArmResult) -> None:
        """Routing first, then the JSON record (whose presence marks the cell finished); both atomic."""
        cell_id = result.record.cell_id
        atomic_write(self.routing_path(cell_id), lambda handle: np.savez_compressed(
            handle, layer_names=np.asarray(list(result.routing)),
            **{f"layer{i}": ids for i, ids in enumerate(result.routing.values())}))
        write_json(self.cell_path(cell_id), result.record.to_dict())

    def read_record(self, cell_id: str) -> CellRecord | None:
        """The record of a finished cell (None if its JSON is not there).

        Raises:
            RunDirError: naming the file: see :func:`read_record_file`; or a spec that does not
                hash to its cell id (an edited record).
        """
        path = self.cell_path(cell_id)
        if not path.is_file():
            return None
        record = read_record_file(path)
        if not cell_id.endswith("_" + stable_hash(record.spec)[:8]):
            raise RunDirError(f"{path}: its spec does not match the settings its cell id was made from (an edited "
                              f"record); delete it and resume the sweep to re-run the cell")
        return record

    def read_routing(self, cell_id: str) -> dict[str, np.ndarray]:
        """The held-out routing of a cell: ``[N_real, k]`` expert ids per layer name.

        Raises:
            RunDirError: the file is missing, truncated or not a routing file (naming it).
        """
        path = self.routing_path(cell_id)
        try:
            with np.load(path, allow_pickle=False) as stored:
                names = [str(name) for name in stored["layer_names"]]
                return {name: stored[f"layer{i}"] for i, name in enumerate(names)}
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
            raise RunDirError(f"{path}: not a readable routing file ({type(error).__name__}: {error}); delete it and "
                              f"its cell JSON and resume the sweep to re-run the cell") from None

    # -- claims --------------------------------------------------------------------------------
    def try_claim(self, name: str) -> Claim | None:
        """Claim the stack ``name`` (its first cell id) for this process, or None if another holds it.

        The claim lasts until :meth:`Claim.release` or the end of the process. Claims exclude
        each other across processes (and across open calls within one process).

        Args:
            name: the stack's name; the same name from every process.
        """
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        path = self.claims_dir / f"{name}{CLAIM_SUFFIX}"
        descriptor = _lock(path)
        if descriptor is None:
            return None
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(owner) + "\n").encode(), 0)
        return Claim(path, descriptor)

    def clean_stale(self) -> list[Path]:
        """Remove what dead processes left: claim files no process holds, temporary files of
        unfinished atomic writes (this machine's whose process is gone, or any older than
        :data:`STALE_AGE_S`), and base staging directories older than that. Returns what it removed.

        Safe while other processes work on the directory: a held claim stays, a live writer's
        temporary file stays.
        """
        removed: list[Path] = []
        for path in sorted(self.claims_dir.glob(f"*{CLAIM_SUFFIX}")):
            descriptor = _lock(path)
            if descriptor is not None:
                path.unlink(missing_ok=True)
                os.close(descriptor)
                removed.append(path)
        now = time.time()
        for directory in (self.path, self.cells_dir, self.path / BASES_DIR):
            for path in sorted(directory.glob(".*.tmp")):
                writer = _temporary_writer(path.name)
                try:
                    age = now - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                dead = writer is not None and writer[0] == _HOST and not _process_alive(writer[1])
                if dead or age > STALE_AGE_S:
                    path.unlink(missing_ok=True)
                    removed.append(path)
        for path in sorted((self.path / BASES_DIR).glob(".*")):
            if path.is_dir() and now - path.stat().st_mtime > STALE_AGE_S:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    # -- the manifest --------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        """The manifest; :class:`RunDirError` naming the file if there is none, or it is not JSON, not
        an object, lacks a key the report reads, or lists a cell id that is not a file name."""
        path = self.manifest_path
        if not path.is_file():
            raise RunDirError(f"{self.path} is not a sweep run directory: {MANIFEST} is missing")
        manifest = read_json_object(path, RunDirError)
        for key, kind in _MANIFEST_KEYS.items():
            if not isinstance(manifest.get(key), kind):
                raise RunDirError(f"{path}: key {key!r} is missing or not a {kind.__name__}")
        for cell_id in manifest["cells"]:
            self.cell_path(cell_id)
        return manifest

    def manifest_for(self, config_hash: str) -> dict[str, Any] | None:
        """The existing manifest (None if there is none), after checking it belongs to the config
        with ``config_hash``; :class:`RunDirError` if it holds another config's run."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path}: exists and is not a directory; a run directory must be a directory")
        if not self.manifest_path.is_file():
            return None
        manifest = self.read_manifest()
        if manifest.get("config_hash") != config_hash:
            raise RunDirError(
                f"{self.path} holds a sweep of another config (hash {str(manifest.get('config_hash'))[:12]}, this one "
                f"{config_hash[:12]}); resume with the same config and --set values, or use another --out")
        return manifest

    def start(self, *, name: str, resolved: dict[str, Any], config_hash: str, cell_ids: list[str],
              command: list[str], num_processes: int, stack_size: int) -> None:
        """Write (or, on a resume, update) the manifest and the resolved config.

        Args:
            name, resolved, config_hash: the sweep config's label, resolved values and hash.
            cell_ids: every cell of the sweep, in order.
            command: the command line that started this process.
            num_processes, stack_size: how the cells are run (recorded, not hashed; the latter as
                the config key ``batch_configs``).
        """
        previous = self.manifest_for(config_hash)
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "config": resolved,
            "config_hash": config_hash,
            "cells": cell_ids,
            "versions": library_versions(),
            "git": git_commit(),
            "command": command,
            "num_processes": num_processes,
            "batch_configs": stack_size,
            "started": (previous or {}).get("started") or _now(),
            "resumed": (previous or {}).get("resumed", []) + ([_now()] if previous else []),
            "finished": None,
        }
        write_json(self.manifest_path, manifest)
        atomic_write(self.path / RESOLVED_CONFIG, lambda handle: handle.write(
            yaml.safe_dump(resolved, sort_keys=False).encode()))

    def mark_finished(self) -> None:
        """Stamp the manifest with the time the last cell finished (once)."""
        manifest = self.read_manifest()
        if manifest.get("finished") is None:
            manifest["finished"] = _now()
            write_json(self.manifest_path, manifest)


def read_record_file(path: Path) -> CellRecord:
    """The :class:`CellRecord` in a cell file, checked to be the record of the cell its file name says.

    Raises:
        RunDirError: naming the file: not JSON, not a cell record (e.g. a missing key), or a
            record of another cell (its ``cell_id`` is not the file name).
    """
    data = read_json_object(path, RunDirError)
    try:
        record = CellRecord.from_dict(data)
    except (TypeError, KeyError, AttributeError, ValueError) as error:
        problem = f"missing key {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
        raise RunDirError(f"{path}: not a cell record ({problem})") from None
    if record.cell_id != path.stem:
        raise RunDirError(f"{path}: records cell {record.cell_id!r}, not the cell its file name says")
    return record


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("chronovisor", "torch", "transformers", "accelerate", "numpy", "scipy", "pyyaml"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit() -> dict[str, Any] | None:
    """Commit of the source tree this package runs from (None outside a git checkout)."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True,
                                timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=source, capture_output=True, text=True,
                                check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def file_slug(text: str) -> str:
    """``text`` as a file name of the report: η spelt ``eta``, anything but letters, digits and ``-._`` as ``-``."""
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in text.replace("η", "eta"))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
