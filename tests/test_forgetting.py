"""`eval --forgetting`: the general corpus split, general perplexity against a plain-PyTorch reference, base vs
fine-tuned (adapters switched off in place equals the base loaded alone), the report, R / ACC / BWT, and the CLI.

One tiny run (2 steps) is shared; its lora_B weights are then set to random values so the adapter visibly
changes the model.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunesmith.config import load_config
from tunesmith.data.general import general_blocks, general_text, general_topics
from tunesmith.evaluation.forgetting import general_perplexity, sequence_metrics

from helpers import write_jsonl
from oracle import read_rows, right_json, script_answers, wrong_json


def test_general_corpus_split_is_disjoint_and_deterministic():
    from pydoc_data.topics import topics

    held, train = general_topics("heldout"), general_topics("train")
    assert not set(held) & set(train)
    assert sorted(held + train) == sorted(topics)
    assert 0.15 < len(held) / len(topics) < 0.25
    assert general_topics("heldout") == held  # deterministic
    assert topics[held[0]].strip()[:200] in general_text("heldout")
    assert topics[held[0]].strip()[:200] not in general_text("train")
    with pytest.raises(ValueError):
        general_topics("test")


def test_general_blocks_budget_and_spacing(tokenizer):
    every = general_blocks(tokenizer, "heldout", block_tokens=256)
    assert len(every) > 50 and all(len(b) == 256 for b in every)
    some = general_blocks(tokenizer, "heldout", block_tokens=256, max_tokens=1024)
    assert len(some) == 4
    assert some[0] == every[0] and some[-1] != every[-1] and some[1] == every[len(every) // 4]  # spread, not a prefix


def test_general_perplexity_matches_plain_pytorch(tiny_model_dir, tokenizer):
    from tunesmith.models import load_model

    model = load_model(str(tiny_model_dir)).eval()
    blocks = general_blocks(tokenizer, "heldout", block_tokens=32, max_tokens=96)
    got = general_perplexity(model, blocks, batch_size=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in blocks:  # one block at a time, log_softmax + gather
            ids = torch.tensor([b])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
            n += len(b) - 1
    assert got["tokens"] == n == 3 * 31
    assert got["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_sequence_metrics_by_hand():
    R = [[0.9, 0.1, 0.0],
         [0.6, 0.8, 0.2],
         [0.5, 0.7, 0.9]]
    m = sequence_metrics(R)
    assert m["average_accuracy"] == pytest.approx((0.5 + 0.7 + 0.9) / 3, abs=1e-4)
    assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2, abs=1e-4)
    assert sequence_metrics([[0.4]]) == {"average_accuracy": 0.4, "bwt": 0.0}


@pytest.fixture(scope="module")
def perturbed_run(tmp_path_factory, tiny_model_dir):
    """A 2-step LoRA run on booking data whose lora_B weights are then randomised."""
    from tunesmith.demo.booking import generate
    from tunesmith.training.run import train

    tmp = tmp_path_factory.mktemp("forgetting")
    rows, held = generate(n_train=8, n_eval=2, seed=3)
    write_jsonl(tmp / "train.jsonl", rows)
    write_jsonl(tmp / "eval.jsonl", held)
    recipe = {
        "model": str(tiny_model_dir),
        "data": {"train": str(tmp / "train.jsonl"), "eval": str(tmp / "eval.jsonl"), "max_length": 256},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "bf16": False, "eval_each_epoch": False},
        "eval": {"scorer": "json_match", "max_new_tokens": 4, "batch_size": 2, "general_tokens": 256},
        "output_dir": str(tmp / "run"),
    }
    run = train(load_config(recipe), progress=False).output_dir
    path = run / "adapter_model.safetensors"
    weights = load_file(path)
    g = torch.Generator().manual_seed(0)
    weights = {k: (torch.randn(v.shape, generator=g) * 0.5 if "lora_B" in k else v) for k, v in weights.items()}
    save_file(weights, path)
    return run


@pytest.mark.slow
def test_forgetting_report_base_vs_finetuned(perturbed_run, tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    from tunesmith.evaluation import general_questions as gq
    from tunesmith.evaluation.forgetting import forgetting_report
    from tunesmith.models import load_model

    monkeypatch.setattr(gq, "tunesmith_home", lambda: tmp_path)
    script_answers(monkeypatch, read_rows(perturbed_run.parent / "eval.jsonl"), lambda model, i, row: right_json(row))
    report = forgetting_report(str(perturbed_run), limit=2, progress=False)
    g = report["general"]
    assert g["tokens"] == 255  # eval.general_tokens = 256: one block
    # The base side (adapters switched off in place) equals the base model loaded on its own.
    blocks = general_blocks(tokenizer, "heldout", 256, 256)
    alone = general_perplexity(load_model(str(tiny_model_dir)).eval(), blocks)["perplexity"]
    assert g["base_perplexity"] == pytest.approx(alone, rel=1e-4)
    assert abs(g["perplexity"] - g["base_perplexity"]) > 1.0  # the randomised adapter changes the model
    assert g["relative_change"] == pytest.approx((g["perplexity"] - g["base_perplexity"]) / g["base_perplexity"], abs=1e-3)
    assert report["task"]["examples"] == 2 and report["task"]["scorer"] == "json_match"
    assert report["task"]["score"] == 1.0  # scripted answers (tests/oracle.py), every one right
    assert "sequence" not in report

    # General questions: the base's greedy answers are cached, and scored under the base loaded on its own.
    q = report["general_questions"]
    [cached] = (tmp_path / "general-answers").glob("*.json")
    answers = json.loads(cached.read_text())["answers"]
    base = load_model(str(tiny_model_dir)).eval()
    assert answers == gq.answer_questions(base, tokenizer)
    alone = gq.answer_perplexity(base, tokenizer, gq.QUESTIONS, answers)["perplexity"]
    assert q["questions"] == len(gq.QUESTIONS) and q["base_answer_perplexity"] == pytest.approx(alone, rel=1e-4)
    from tunesmith.inference import load_for_inference

    tuned = load_for_inference(str(perturbed_run)).model
    assert q["answer_perplexity"] == pytest.approx(gq.answer_perplexity(tuned, tokenizer, gq.QUESTIONS, answers)["perplexity"], rel=1e-4)
    assert q["answer_perplexity"] != pytest.approx(q["base_answer_perplexity"], rel=1e-4)  # the adapter changes them
    assert 0.0 <= q["same_answers"] < 1.0


def test_base_answers_are_generated_once(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    from tunesmith.evaluation import general_questions as gq
    from tunesmith.models import load_model

    monkeypatch.setattr(gq, "tunesmith_home", lambda: tmp_path)
    questions = gq.QUESTIONS[:3]
    first = gq.base_answers(load_model(str(tiny_model_dir)).eval(), tokenizer, "tiny", questions)

    class Unusable:  # a second call must read the cache, never generate
        def parameters(self):
            raise AssertionError("generated again")

    assert gq.base_answers(Unusable(), tokenizer, "tiny", questions) == first
    assert gq.cache_path("tiny", tokenizer, questions) != gq.cache_path("other base", tokenizer, questions)


def test_same_answer_share_by_hand():
    from tunesmith.evaluation.general_questions import same_answer_share

    assert same_answer_share(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5


@pytest.mark.slow
def test_forgetting_sequence_and_cli(perturbed_run, capsys, monkeypatch):
    """The same run twice as a 'sequence' gives a 2x2 R with equal rows; the CLI prints it as JSON.

    Scripted answers (tests/oracle.py): the first eval row right, the second one guest off, so every score is 0.5.
    """
    from typer.testing import CliRunner

    from tunesmith.cli import app

    script_answers(monkeypatch, read_rows(perturbed_run.parent / "eval.jsonl"),
                   lambda model, i, row: wrong_json(row) if i else right_json(row))

    result = CliRunner().invoke(app, ["eval", str(perturbed_run), "--forgetting", "--previous", str(perturbed_run),
                                      "--limit", "2", "--general-tokens", "128", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["general"]["tokens"] == 127
    seq = report["sequence"]
    assert seq["runs"] == [str(perturbed_run)] * 2
    assert report["task"]["score"] == 0.5
    assert seq["R"] == [[0.5, 0.5], [0.5, 0.5]]
    assert seq["average_accuracy"] == 0.5 and seq["bwt"] == 0.0

    from tunesmith.cli import _print_forgetting

    _print_forgetting(report)  # the human-readable form of the same report
    text = capsys.readouterr().out
    assert "general perplexity (127 tokens" in text and "base" in text and "accuracy matrix R" in text
    assert "backward transfer (BWT)" in text and "general questions" in text
    assert "json_match 50.0% on 2 examples" in text and "average accuracy 50.0%" in text
