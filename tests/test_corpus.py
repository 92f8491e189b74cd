"""The real-text corpus: recorded sources, the build on a slice, the split by document, datasets loading."""

import json
import shutil

import pytest

from chronovisor.eval.corpus import (
    DOMAINS,
    SPLITS,
    CorpusError,
    build_corpus,
    load_corpus,
    load_sources,
    read_source,
    stdlib_root,
)
from chronovisor.eval.metrics import mutual_information


def test_every_recorded_source_is_present_in_this_python_with_its_recorded_hash():
    sources = load_sources()
    texts = [read_source(stdlib_root(), source) for source in sources]  # raises on a missing or changed file
    assert sum(len(text) for text in texts) > 7_000_000
    assert {source.domain for source in sources} == set(DOMAINS)


def test_a_module_gives_either_its_docstrings_or_its_code_but_never_both():
    paths = [source.path for source in load_sources()]
    assert len(paths) == len(set(paths))


def test_a_corpus_slice_builds_both_domains_and_splits_and_loads_with_datasets_from_local_files(tmp_path):
    summary = build_corpus(tmp_path, max_sources_per_kind=6)
    corpus = load_corpus(tmp_path)
    assert set(corpus) == set(SPLITS)
    for split in SPLITS:
        assert set(corpus[split]["domain"]) == set(DOMAINS)
    counted = {(c.domain, c.split): c.documents for c in summary.counts}
    assert counted == {(d, s): corpus[s]["domain"].count(d) for d in DOMAINS for s in SPLITS}
    assert json.loads((tmp_path / "corpus.json").read_text())["files"] == summary.files


def test_the_split_is_by_document_and_a_slice_splits_its_documents_as_a_larger_build_does(tmp_path):
    build_corpus(tmp_path / "small", max_sources_per_kind=3)
    build_corpus(tmp_path / "large", max_sources_per_kind=6)
    small, large = load_corpus(tmp_path / "small"), load_corpus(tmp_path / "large")
    for split in SPLITS:
        assert set(small[split]["id"]) <= set(large[split]["id"])
    assert not set(large["train"]["id"]) & set(large["heldout"]["id"])


def test_building_twice_writes_byte_identical_files(tmp_path):
    first = build_corpus(tmp_path / "a", max_sources_per_kind=3)
    second = build_corpus(tmp_path / "b", max_sources_per_kind=3)
    assert first.files == second.files


def test_a_source_that_differs_from_its_recorded_hash_stops_the_build_naming_the_file(tmp_path):
    sources = load_sources()[:2]
    root = tmp_path / "stdlib"
    for source in sources:
        (root / source.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stdlib_root() / source.path, root / source.path)
    (root / sources[1].path).write_text("edited\n")
    with pytest.raises(CorpusError, match=sources[1].path.replace(".", r"\.")):
        build_corpus(tmp_path / "out", root=root, max_sources_per_kind=1)


def test_loading_a_directory_without_a_built_corpus_says_how_to_build_it(tmp_path):
    with pytest.raises(CorpusError, match="chronovisor corpus --out"):
        load_corpus(tmp_path)


def test_mutual_information_is_one_bit_when_each_domain_has_its_own_experts_and_zero_when_routing_ignores_it():
    labels = [0, 0, 1, 1]
    separated = [[0, 1], [0, 1], [2, 3], [2, 3]]
    ignored = [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert mutual_information(separated, labels, 4) == pytest.approx(1.0)
    assert mutual_information(ignored, labels, 4) == pytest.approx(0.0)
