"""`chronovisor pretrain` on the tiny config: the checkpoint beside its tokenizer, perplexities, determinism."""

import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from chronovisor.eval.corpus import DOMAINS
from chronovisor.eval.errors import ConfigError
from chronovisor.eval.pretrain import pretrain
from chronovisor.eval.pretrain_config import load_pretrain_config

TINY = Path(__file__).parent.parent / "configs" / "realtext" / "tiny.yaml"


def test_tiny_pretraining_saves_a_mixtral_beside_its_tokenizer_that_from_pretrained_loads(tiny_realtext_run):
    out, record = tiny_realtext_run
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(out / "model"))
    assert model.config.model_type == "mixtral"
    assert model.config.num_local_experts == 4
    assert model.config.vocab_size == len(tokenizer) == 512
    assert (out / "pretrain.json").is_file()
    assert record.parameters == sum(p.numel() for p in model.parameters())


def test_tiny_pretraining_reports_held_out_perplexity_per_domain_beside_unigram_and_bigram(tiny_realtext_run):
    _, record = tiny_realtext_run
    assert [row.domain for row in record.heldout] == list(DOMAINS)
    for row in record.heldout:
        assert math.isfinite(row.perplexity) and row.perplexity > 1
        assert row.bigram_perplexity < row.unigram_perplexity
        assert row.perplexity == pytest.approx(math.exp(row.loss))
    assert record.final_aux_loss > 0  # Mixtral's load-balancing loss was part of the objective
    assert all(count.tokens > 0 for count in record.tokens)


def test_pretraining_twice_with_the_same_seed_gives_bit_identical_weights(tiny_realtext_run, tmp_path):
    _, record = tiny_realtext_run
    again = pretrain(load_pretrain_config(TINY), tmp_path, progress=False)
    assert again.state_hash == record.state_hash


def test_a_pretrain_config_with_an_unknown_key_is_rejected_naming_the_file_and_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.stepz: unknown key"):
        load_pretrain_config(path)


def test_the_shipped_real_text_configs_validate_with_their_loaders():
    from chronovisor.eval.study_config import load_study_config

    configs = TINY.parent
    assert load_pretrain_config(configs / "pretrain.yaml").model.num_local_experts == 8
    assert load_pretrain_config(configs / "tiny.yaml").max_sources_per_kind == 4
    assert load_study_config(configs / "study.yaml").base == "runs/realtext"
