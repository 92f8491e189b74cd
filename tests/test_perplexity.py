"""Held-out perplexity with the controller on and off (``compare_perplexity`` and ``chronovisor eval``)."""

import json
import math

import pytest
import torch

import chronovisor
from chronovisor import PTConfig
from chronovisor.cli import main
from chronovisor.eval.perplexity import compare_perplexity, sequence_nll
from chronovisor.eval.text_datasets import as_conversation_batch, load_lm_dataset
from chronovisor.wrappers import build_toy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def heldout(text_corpus, word_tokenizer_dir):
    dataset = load_lm_dataset(text_corpus[0], word_tokenizer_dir, max_length=24)
    return as_conversation_batch(dataset, pad_token_id=0)


def _steering_controller() -> chronovisor.ChronovisorModel:
    model = chronovisor.wrap(build_toy("mixtral-tiny", seed=0), PTConfig(learnable=True), step_mode="manual")
    with torch.no_grad():
        model.controller.pressure_offset.copy_(torch.linspace(-2, 2, 8).expand(2, 8))
    return model


def test_sequence_nll_sums_each_rows_scored_targets_only():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, -100], [-100, -100, -100]])
    total, count = sequence_nll(logits, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, :2], targets[0, :2], reduction="sum")
    torch.testing.assert_close(total[0], expected)
    assert count.tolist() == [2, 0] and float(total[1]) == 0.0


def test_frozen_controller_perplexity_matches_the_models_own_loss_and_leaves_the_controller_unchanged(heldout):
    model = _steering_controller()
    before = {name: tensor.clone() for name, tensor in model.controller.state_dict().items()}
    result = compare_perplexity(model, heldout, batch_size=5)
    assert result.sequences == len(heldout) and result.tokens == int((heldout.lengths - 1).sum())
    assert result.perplexity_on != result.perplexity_off and not result.online
    assert model.controller.ticks == 0
    for name, tensor in model.controller.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, equal_nan=True, msg=name)
    with torch.no_grad():
        on = model(input_ids=heldout.input_ids, attention_mask=heldout.attention_mask, labels=heldout.labels).loss
        with model.disable_controller():
            off = model(input_ids=heldout.input_ids, attention_mask=heldout.attention_mask, labels=heldout.labels).loss
    assert math.isclose(result.nll_on, float(on), rel_tol=1e-4) and math.isclose(result.nll_off, float(off), rel_tol=1e-4)
    assert math.isclose(result.perplexity_on, math.exp(float(on)), rel_tol=1e-4)
    delta = result.delta_nll
    assert delta.n == len(heldout) and delta.low < delta.mean < delta.high


def test_online_evaluation_steps_the_controller_once_per_batch(heldout):
    model = chronovisor.wrap(build_toy("mixtral-tiny", seed=0), PTConfig(update_every=1), step_mode="manual")
    result = compare_perplexity(model, heldout, batch_size=4, online=True)
    assert result.online and model.controller.ticks == 4
    assert "online" in result.line()


def test_chronovisor_eval_prints_json_and_one_table_line_for_a_saved_controller(tmp_path, capsys, text_corpus,
                                                                               mixtral_tiny_with_tokenizer):
    _steering_controller().save_pretrained(tmp_path / "controller")
    out = tmp_path / "ppl.json"
    assert main(["eval", str(mixtral_tiny_with_tokenizer), "--controller", str(tmp_path / "controller"),
                 "--data", str(text_corpus[1]), "--batch-size", "4", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("| ppl on ") and "frozen" in lines[0]
    record = json.loads(out.read_text())
    assert record["controller"] == str(tmp_path / "controller") and record["sequences"] == 16
    assert record["delta_nll"]["n"] == 16 and record["perplexity_on"] != record["perplexity_off"]


def test_chronovisor_eval_rejects_a_toy_preset_without_a_tokenizer_in_one_line(capsys, text_corpus):
    assert main(["eval", "mixtral-tiny", "--data", str(text_corpus[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chronovisor eval: error: --tokenizer mixtral-tiny: not a local tokenizer directory")
    assert err.count("\n") == 1


def test_chronovisor_eval_without_a_controller_steps_a_fresh_one_online(capsys, text_corpus,
                                                                       mixtral_tiny_with_tokenizer):
    assert main(["eval", str(mixtral_tiny_with_tokenizer), "--data", str(text_corpus[0]), "--batch-size", "4",
                 "--set", "update_every=1"]) == 0
    *json_lines, line = capsys.readouterr().out.strip().splitlines()
    record = json.loads("\n".join(json_lines))
    assert record["controller"] is None and record["online"] is True and line.endswith("| online |")
    assert record["perplexity_on"] != record["perplexity_off"]   # the fields moved after the first batch
