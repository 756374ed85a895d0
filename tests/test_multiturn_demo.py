"""The multi-turn task (tunesmith.demo.recall): ShareGPT with a system prompt whose last answer depends on the
first user turn; deterministic, disjoint, shipped; masked so only assistant turns carry loss (ChatML and
Llama-3); scored by `tunesmith eval` on the last answer with every earlier turn in the prompt."""
from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from helpers import invoke, ok, write_jsonl

from tunesmith.config import load_config
from tunesmith.data.formats import to_conversation
from tunesmith.data.loading import Row
from tunesmith.data.masking import IGNORE_INDEX, tokenize_conversation
from tunesmith.data.templates import apply_template_override
from tunesmith.demo import recall

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).parent / "templates"
LLAMA3_SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                  "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}


def turns(row: dict, who: str) -> list[str]:
    return [t["value"] for t in row["conversations"] if t["from"] == who]


def test_generator_is_deterministic_and_disjoint():
    train, held = recall.generate(n_train=400, n_eval=100, seed=0)
    assert len(train) == 400 and len(held) == 100
    key = lambda r: json.dumps(r["conversations"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert recall.generate(n_train=400, n_eval=100, seed=0) == (train, held)
    assert recall.generate(n_train=400, n_eval=100, seed=1) != (train, held)


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    recall.write(tmp_path)
    for name in ("recall-train.jsonl", "recall-eval.jsonl"):
        assert (tmp_path / name).read_text() == (REPO / "recipes" / "data" / name).read_text()


def test_rows_are_sharegpt_with_a_system_prompt_and_two_or_three_exchanges():
    train, held = recall.generate(n_train=400, n_eval=100, seed=0)
    lengths = set()
    for i, row in enumerate(train + held):
        conv = to_conversation(Row(row, f"row {i}"), "sharegpt")
        assert conv[0] == {"role": "system", "content": recall.SYSTEM}
        assert [m["role"] for m in conv[1:]] == ["user", "assistant"] * ((len(conv) - 1) // 2)
        lengths.add(len(conv))
    assert lengths == {5, 7}  # the question right after the fact, or one unrelated exchange between them


def test_the_last_answer_needs_the_first_turn():
    train, _ = recall.generate(n_train=400, n_eval=100, seed=0)
    answers_by_question = defaultdict(set)
    for row in train:
        fact, question, answer = turns(row, "human")[0], turns(row, "human")[-1], turns(row, "gpt")[-1]
        answers_by_question[question].add(answer)
        if question.startswith("Which city"):
            assert answer in fact and answer not in question
        if question.startswith("Sign this note"):
            assert answer.split()[-1] in fact and answer.split()[-1] not in question
        # Hand-written: what a vegetarian and someone allergic to nuts may not eat, from the dish names alone.
        if "vegetarian" in fact or "vegan" in fact:
            assert answer not in {"beef stew", "chicken curry", "pork dumplings", "salmon salad", "tuna pasta"}
        if "allergic to nuts" in fact:
            assert answer not in {"peanut noodles", "almond cake", "pesto pasta"}
        if "Pick one dish" in question or "should I order" in question:
            assert answer in question
    # The same last question gets different answers: only the earlier turn tells which.
    assert sum(len(a) > 1 for a in answers_by_question.values()) >= 4


def test_score_is_exact_match_of_the_last_answer():
    assert recall.SCORER == "exact_match"
    assert recall.score("  vegetable soup ", "vegetable soup") == 1.0
    assert recall.score("Vegetable soup.", "vegetable soup") == 0.0
    assert recall.score("6", "5") == 0.0
    assert recall.score("beef stew, then vegetable soup", "vegetable soup") == 0.0


@pytest.fixture(scope="module")
def templates(tokenizer):
    """The built-in ChatML tokenizer, and a copy with Meta's Llama-3 template and control tokens."""
    llama3 = copy.deepcopy(tokenizer)
    apply_template_override(llama3, str(TEMPLATES / "llama3.jinja"))
    llama3.add_special_tokens(dict(LLAMA3_SPECIAL))
    llama3.pad_token = llama3.eos_token
    return {"chatml": (tokenizer, "<|im_end|>"), "llama3": (llama3, "<|eot_id|>")}


@pytest.mark.parametrize("family", ["chatml", "llama3"])
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_only_assistant_turns_carry_loss(templates, family, train_on):
    tok, end = templates[family]
    train, _ = recall.generate(n_train=12, n_eval=1, seed=0)
    for i, row in enumerate(train):
        answers = turns(row, "gpt") if train_on == "all_assistant" else turns(row, "gpt")[-1:]
        ex = tokenize_conversation(tok, to_conversation(Row(row, f"row {i}"), "sharegpt"), train_on)
        supervised = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
        assert tok.decode(supervised, skip_special_tokens=False) == "".join(a + end for a in answers)


def test_eval_scores_the_last_answer_with_the_earlier_turns_in_the_prompt(tmp_path, tiny_model_dir, monkeypatch):
    """`tunesmith eval` on recipes/multiturn.yaml (its model and data shrunk): scripted answers (right for even
    rows, a wrong value for odd ones) give a hand-counted exact-match score."""
    from tunesmith.evaluation import run

    train, held = recall.generate(n_train=4, n_eval=6, seed=3)
    recipe = yaml.safe_load((REPO / "recipes" / "multiturn.yaml").read_text())
    recipe.update(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"))
    recipe["data"].update(train=str(write_jsonl(tmp_path / "train.jsonl", train)),
                          eval=str(write_jsonl(tmp_path / "eval.jsonl", held)))
    (tmp_path / "multiturn.yaml").write_text(yaml.safe_dump(recipe))
    assert load_config(tmp_path / "multiturn.yaml").eval.scorer == "exact_match"
    prompts = []

    def generate(model, tokenizer, batch, max_new_tokens, batch_size, on_batch=None):
        prompts.extend(batch)
        start = len(prompts) - len(batch)
        return [turns(held[start + j], "gpt")[-1] if (start + j) % 2 == 0 else "wrong" for j in range(len(batch))]

    monkeypatch.setattr(run, "generate_answers", generate)
    report = json.loads(ok(invoke("eval", tmp_path / "multiturn.yaml", "--base", "--json")))
    assert report["scorer"] == "exact_match" and report["examples"] == 6 and report["score"] == 0.5
    assert [s["reference"] for s in report["samples"]] == [turns(r, "gpt")[-1] for r in held[:5]]
    for prompt, row in zip(prompts, held):
        last_question, first_fact = turns(row, "human")[-1], turns(row, "human")[0]
        assert recall.SYSTEM in prompt and first_fact in prompt
        assert prompt.endswith(f"{last_question}<|im_end|>\n<|im_start|>assistant\n")


def test_the_tiny_model_trains_on_the_recipe(tmp_path, tiny_model_dir):
    """recipes/multiturn.yaml, shrunk to the tiny model and a few steps, trains on multi-turn rows and lowers
    the loss on them (the supervised tokens are the assistant turns)."""
    from tunesmith.training.run import train

    rows, held = recall.generate(n_train=16, n_eval=4, seed=2)
    sets = [f"model={tiny_model_dir}", f"data.train={write_jsonl(tmp_path / 'train.jsonl', rows)}",
            f"data.eval={write_jsonl(tmp_path / 'eval.jsonl', held)}", f"output_dir={tmp_path / 'run'}",
            "train.max_steps=6", "train.batch_size=4", "train.lr=1e-2", "train.bf16=false", "train.logging_steps=1"]
    result = train(load_config(REPO / "recipes" / "multiturn.yaml", sets), progress=False)
    losses = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [m["loss"] for m in losses if "loss" in m]
    assert result.summary["steps"] == 6 and train_losses[-1] < train_losses[0]
