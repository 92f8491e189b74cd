"""A real two-domain corpus built offline from CPython 3.11.7's standard library: English prose and Python code.

Every source file is listed with its SHA-256 in ``corpus_sources.json`` (beside this module), so the
corpus is byte-identical on every machine with that Python; a file that differs stops the build
with a message naming it. Provenance and licence: ``docs/real_text.md`` (all PSF License v2).

Domains and documents:

``prose``
    Each topic of the language reference shipped as ``pydoc_data/topics.py`` (the text ``help()``
    shows), IDLE's plain-text documents (``idlelib/*.txt``), ``LICENSE.txt`` and
    ``email/architecture.rst``, and the docstrings (module, class, function) of one third of the
    stdlib modules, one document per module.
``code``
    The source of the other two thirds of the stdlib modules, one document per file. A module is in
    exactly one domain (chosen by a hash of its path), so no docstring is in both.

The held-out split is by document: a document is held out when the SHA-256 of its id, modulo
:data:`HELDOUT_MODULUS`, is 0, whatever else is in the corpus, so a slice splits as the whole does.

    chronovisor corpus --out runs/corpus            # the whole corpus
    load_corpus("runs/corpus")                      # a datasets.DatasetDict: train / heldout
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

from chronovisor.eval.errors import EvalError

#: The recorded source files (path relative to the stdlib directory, kind, sha256).
SOURCES_FILE = Path(__file__).with_name("corpus_sources.json")
#: The Python whose stdlib the sources were recorded from.
PYTHON_VERSION = "3.11.7"
DOMAINS = ("prose", "code")
SPLITS = ("train", "heldout")
#: A document is held out when int(sha256(id)) % HELDOUT_MODULUS == 0 (about one in ten).
HELDOUT_MODULUS = 10
#: How a source file becomes documents, and the domain of its documents.
KIND_DOMAINS = {"topics": "prose", "text": "prose", "docstrings": "prose", "code": "code"}
SUMMARY_FILE = "corpus.json"

# Selection rule (see :func:`select_sources`): stdlib modules outside tests, codecs tables and
# pydoc_data, at most 300 kB; a third of them (by path hash) give their docstrings, the rest their code.
_EXCLUDED_PREFIXES = ("test/", "site-packages/", "encodings/", "pydoc_data/", "__phello__/", "config-3.11")
_EXCLUDED_PARTS = ("/test/", "/tests/", "/idle_test/")
_MAX_MODULE_BYTES = 300_000
_TEXT_FILES = ("LICENSE.txt", "email/architecture.rst", "idlelib/CREDITS.txt", "idlelib/HISTORY.txt",
               "idlelib/NEWS.txt", "idlelib/NEWS2x.txt", "idlelib/README.txt", "idlelib/TODO.txt",
               "idlelib/extend.txt")
_TOPICS_FILE = "pydoc_data/topics.py"


class CorpusError(EvalError):
    """A corpus source is missing or differs from its recorded hash, or a corpus directory is incomplete."""


@dataclass(frozen=True)
class Source:
    """One recorded source file.

    Attributes:
        path: relative to the stdlib directory (``sysconfig.get_paths()["stdlib"]``).
        kind: ``topics``, ``text``, ``docstrings`` or ``code`` (see :data:`KIND_DOMAINS`).
        sha256: the file's recorded hash.
    """

    path: str
    kind: str
    sha256: str

    @property
    def domain(self) -> str:
        return KIND_DOMAINS[self.kind]


@dataclass(frozen=True)
class Document:
    """One document of the corpus: ``id`` (``<domain>/<source path>[#topic]``), domain, source path, text."""

    id: str
    domain: str
    source: str
    text: str

    @property
    def split(self) -> str:
        """``heldout`` or ``train``, from the id alone (see :data:`HELDOUT_MODULUS`)."""
        digest = int(hashlib.sha256(self.id.encode()).hexdigest(), 16)
        return "heldout" if digest % HELDOUT_MODULUS == 0 else "train"


@dataclass(frozen=True)
class SplitCount:
    """Documents and characters of one (domain, split)."""

    domain: str
    split: str
    documents: int
    characters: int


@dataclass(frozen=True)
class CorpusSummary:
    """What :func:`build_corpus` wrote: the counts and the SHA-256 of each output file.

    Attributes:
        python: the Python version the sources were recorded from.
        sources_sha256: hash of ``corpus_sources.json`` (the recorded list).
        num_sources: source files read (all of them unless the build was a slice).
        counts: one :class:`SplitCount` per (domain, split).
        files: output file name -> its SHA-256.
    """

    python: str
    sources_sha256: str
    num_sources: int
    counts: tuple[SplitCount, ...]
    files: dict[str, str]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CorpusSummary:
        return cls(data["python"], data["sources_sha256"], data["num_sources"],
                   tuple(SplitCount(**count) for count in data["counts"]), dict(data["files"]))


def stdlib_root() -> Path:
    """The directory of this Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ sources
def load_sources() -> list[Source]:
    """The recorded sources, in their recorded order."""
    recorded = json.loads(SOURCES_FILE.read_text())
    return [Source(**item) for item in recorded["sources"]]


def select_sources(root: Path) -> list[Source]:
    """Apply the selection rule to a stdlib directory and hash the files (how ``corpus_sources.json`` was made).

    Args:
        root: a stdlib directory (CPython 3.11.7's for the recorded list).
    """
    sources = [Source(_TOPICS_FILE, "topics", sha256_file(root / _TOPICS_FILE))]
    sources += [Source(name, "text", sha256_file(root / name)) for name in _TEXT_FILES]
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(_EXCLUDED_PREFIXES) or any(part in f"/{relative}" for part in _EXCLUDED_PARTS):
            continue
        if path.stat().st_size > _MAX_MODULE_BYTES:
            continue
        kind = "docstrings" if int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16) % 3 == 0 else "code"
        sources.append(Source(relative, kind, sha256_file(path)))
    return sources


def record_sources(root: Path, destination: Path = SOURCES_FILE) -> None:
    """Write the selected sources of ``root`` to ``destination`` (a maintainer's step, after a Python upgrade).

    Args:
        root: the stdlib directory of the Python to pin.
        destination: the JSON file to write.
    """
    python = ".".join(map(str, sys.version_info[:3]))
    payload = {"python": python, "root": "sysconfig stdlib", "sources": [asdict(s) for s in select_sources(root)]}
    destination.write_text(json.dumps(payload, indent=1) + "\n")


def read_source(root: Path, source: Source) -> str:
    """The text of ``source`` under ``root``, after checking its hash.

    Raises:
        CorpusError: the file is missing or differs from its recorded hash (names the file and the fix).
    """
    path = root / source.path
    if not path.is_file():
        raise CorpusError(f"corpus source {path} is missing; the corpus is recorded from CPython {PYTHON_VERSION}'s "
                          f"stdlib: build it with that Python (e.g. pyenv install {PYTHON_VERSION})")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.sha256:
        here = ".".join(map(str, sys.version_info[:3]))
        raise CorpusError(f"corpus source {path} has sha256 {digest[:16]}…, recorded {source.sha256[:16]}… "
                          f"(CPython {PYTHON_VERSION}; this is {here}): build the corpus with CPython "
                          f"{PYTHON_VERSION} so it is identical everywhere")
    return data.decode("utf-8")


# ---------------------------------------------------------------------------- documents
def documents_of(source: Source, text: str) -> list[Document]:
    """The documents of one source file (see the module docstring)."""
    domain = source.domain
    if source.kind == "topics":
        topics = _topics(text, source.path)
        return [Document(f"{domain}/{source.path}#{name}", domain, source.path, body.strip() + "\n")
                for name, body in sorted(topics.items()) if body.strip()]
    if source.kind == "docstrings":
        body = "\n\n".join(_docstrings(text, source.path))
        return [Document(f"{domain}/{source.path}", domain, source.path, body + "\n")] if body else []
    return [Document(f"{domain}/{source.path}", domain, source.path, text)] if text.strip() else []


def _topics(text: str, path: str) -> dict[str, str]:
    """The ``topics`` dict of pydoc_data/topics.py, read without importing it."""
    for node in ast.parse(text, filename=path).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return ast.literal_eval(node.value)
    raise CorpusError(f"{path}: no `topics = {{...}}` assignment (not pydoc_data/topics.py?)")


def _docstrings(text: str, path: str) -> list[str]:
    """Module, class and function docstrings of a module, in source order, indentation cleaned."""
    found = []
    for node in ast.walk(ast.parse(text, filename=path)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring and docstring.strip():
                found.append((getattr(node, "lineno", 0), inspect.cleandoc(docstring)))
    return [docstring for _, docstring in sorted(found, key=lambda item: item[0])]


# ------------------------------------------------------------------------------- build
def build_corpus(out_dir: str | Path, *, root: str | Path | None = None,
                 max_sources_per_kind: int | None = None) -> CorpusSummary:
    """Check every recorded source and write ``train.jsonl`` / ``heldout.jsonl`` and ``corpus.json``.

    Args:
        out_dir: the corpus directory (created).
        root: the stdlib directory to read (default: this Python's).
        max_sources_per_kind: a slice for tests: only the first N recorded sources of each kind.

    Returns:
        The :class:`CorpusSummary` (also written to ``out_dir/corpus.json``).

    Raises:
        CorpusError: a source is missing or differs from its recorded hash.
    """
    out_dir = Path(out_dir)
    root = Path(root) if root is not None else stdlib_root()
    sources = load_sources()
    if max_sources_per_kind is not None:
        taken: dict[str, int] = {}
        sliced = []
        for source in sources:
            if taken.get(source.kind, 0) < max_sources_per_kind:
                taken[source.kind] = taken.get(source.kind, 0) + 1
                sliced.append(source)
        sources = sliced
    documents = [doc for source in sources for doc in documents_of(source, read_source(root, source))]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in SPLITS:
        name = f"{split}.jsonl"
        lines = [json.dumps(asdict(doc), ensure_ascii=False) for doc in documents if doc.split == split]
        (out_dir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        files[name] = sha256_file(out_dir / name)
    counts = tuple(
        SplitCount(domain, split, sum(1 for d in documents if d.domain == domain and d.split == split),
                   sum(len(d.text) for d in documents if d.domain == domain and d.split == split))
        for domain in DOMAINS for split in SPLITS)
    summary = CorpusSummary(PYTHON_VERSION, sha256_file(SOURCES_FILE), len(sources), counts, files)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=1) + "\n")
    return summary


def read_summary(corpus_dir: str | Path) -> CorpusSummary:
    """The :class:`CorpusSummary` of a built corpus; CorpusError with the build command if there is none."""
    path = Path(corpus_dir) / SUMMARY_FILE
    if not path.is_file():
        raise CorpusError(f"{corpus_dir} holds no built corpus ({SUMMARY_FILE} missing); build it with "
                          f"`chronovisor corpus --out {corpus_dir}`")
    return CorpusSummary.from_dict(json.loads(path.read_text()))


def load_corpus(corpus_dir: str | Path):
    """The built corpus as a ``datasets.DatasetDict`` with splits ``train`` and ``heldout``.

    Columns ``id``, ``domain``, ``source``, ``text``; read from the local JSONL files (no hub), after
    checking them against the hashes in ``corpus.json``.

    Args:
        corpus_dir: a directory written by :func:`build_corpus`.
    """
    import datasets

    corpus_dir = Path(corpus_dir)
    summary = read_summary(corpus_dir)
    for name, digest in summary.files.items():
        if sha256_file(corpus_dir / name) != digest:
            raise CorpusError(f"{corpus_dir / name} differs from the hash in {SUMMARY_FILE}; rebuild it with "
                              f"`chronovisor corpus --out {corpus_dir}`")
    data_files = {split: str(corpus_dir / f"{split}.jsonl") for split in SPLITS}
    return datasets.load_dataset("json", data_files=data_files, cache_dir=str(corpus_dir / ".hf_cache"))
