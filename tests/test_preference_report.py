"""`data inspect|stats|check` on preference data: both replies shown, counted and checked, bad rows by line."""
from __future__ import annotations

import json

import pytest

from helpers import fails, invoke, ok, write_jsonl

GOOD = [{"prompt": f"What is {i}+{i}?", "chosen": f"{2 * i}.", "rejected": f"Maybe {2 * i + 1}."} for i in range(4)]


@pytest.fixture
def recipe(tmp_path, tiny_model_dir):
    def make(rows, **train):
        write_jsonl(tmp_path / "pairs.jsonl", rows)
        path = tmp_path / "dpo.yaml"
        path.write_text(json.dumps({"model": str(tiny_model_dir), "data": {"train": str(tmp_path / "pairs.jsonl"),
                                    "eval_split": 0.0}, "train": {"objective": "dpo", **train}}))
        return path

    return make


def test_inspect_shows_chosen_and_rejected_with_only_the_replies_supervised(recipe):
    shown = json.loads(ok(invoke("data", "inspect", recipe(GOOD), "--n", "1", "--json")))["examples"]
    assert [e["index"] for e in shown] == [0, 0]
    supervised = ["".join(t["text"] for t in e["tokens"] if t["loss"]) for e in shown]
    assert supervised == ["0.<|im_end|>", "Maybe 1.<|im_end|>"]
    table = ok(invoke("data", "inspect", recipe(GOOD), "--n", "1"))
    assert "pairs.jsonl:1 chosen" in table and "pairs.jsonl:1 rejected" in table


def test_stats_count_both_replies(recipe, tokenizer):
    stats = json.loads(ok(invoke("data", "stats", recipe(GOOD), "--json")))["train"]
    assert stats["rows"] == stats["examples"] == 4
    # supervised: each reply's tokens plus its <|im_end|>, counted with the tokenizer directly
    expected = sum(len(tokenizer(r["chosen"] + "<|im_end|>")["input_ids"]) + len(tokenizer(r["rejected"] + "<|im_end|>")["input_ids"])
                   for r in GOOD)
    assert stats["supervised_tokens"] == expected


def test_check_passes_good_pairs_and_lists_every_bad_row(recipe):
    assert "check passed" in ok(invoke("data", "check", recipe(GOOD)))
    bad = GOOD + [{"prompt": "Q", "chosen": "same", "rejected": "same"}, {"prompt": "Q", "rejected": "x"}]
    result = invoke("data", "check", recipe(bad), "--json")
    assert result.exit_code == 1
    findings = json.loads(result.stdout)["findings"]
    assert [(f["level"], f["where"].rsplit("/", 1)[-1]) for f in findings] == [("error", "pairs.jsonl:5"), ("error", "pairs.jsonl:6")]
    assert "chosen and rejected are identical" in findings[0]["message"]
    assert "missing field 'chosen'" in findings[1]["message"]


def test_check_flags_cut_replies_and_too_long_pairs(recipe):
    long = [{"prompt": "Q", "chosen": "word " * 60, "rejected": "b"}]
    findings = json.loads(invoke("data", "check", recipe(GOOD + long), "--json", "--set", "data.max_length=56").stdout)["findings"]
    assert [f["level"] for f in findings] == ["warning"] and "1 of 5 pairs are longer" in findings[0]["message"]
    cut = invoke("data", "check", recipe(GOOD + long), "--json", "--set", "data.max_length=56", "--set", "data.truncation=truncate")
    messages = [f["message"] for f in json.loads(cut.stdout)["findings"]]
    assert cut.exit_code == 1 and any("chosen reply's end-of-turn token carries no log-prob" in m for m in messages)


def test_train_names_the_bad_row(recipe, tmp_path):
    bad = GOOD + [{"prompt": " ", "chosen": "a", "rejected": "b"}]
    fails(invoke("train", recipe(bad), "--output-dir", tmp_path / "out"), "pairs.jsonl:5: the prompt is empty")
    assert not (tmp_path / "out").exists()
