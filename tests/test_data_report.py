"""`data inspect`, `data stats` and `data check` through the Python API."""
from __future__ import annotations

import copy
import json

import pytest

from tunesmith.config import load_config
from tunesmith.data.report import check_data, data_stats, inspect_examples, token_texts

from helpers import write_jsonl

@pytest.fixture
def tokenizer(tokenizer):
    """A private copy: data.chat_template overrides set the template on the tokenizer they are given."""
    return copy.deepcopy(tokenizer)


NO_END_MARKER = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
NO_ROLES = "{% for m in messages %}{{ m['content'] }}<|im_end|>\n{% endfor %}"


def recipe(tmp_path, rows, **data):
    write_jsonl(tmp_path / "d.jsonl", rows)
    return load_config({"data": {"train": str(tmp_path / "d.jsonl"), "eval_split": 0.0, **data}})


ROWS = [
    {"messages": [{"role": "user", "content": "头痛怎么办?"}, {"role": "assistant", "content": "多喝水，休息。"}]},
    {"instruction": "Say hi", "output": "Hi!"},
]


def test_token_texts_concatenate_to_the_decoded_text(tokenizer):
    ids = tokenizer("头痛怎么办? ok", add_special_tokens=False)["input_ids"]
    texts = token_texts(tokenizer, ids)
    assert "".join(texts) == "头痛怎么办? ok"
    assert "\ufffd" not in "".join(texts)


def test_inspect_marks_the_answer_and_its_end_of_turn(tmp_path, tokenizer):
    cfg = recipe(tmp_path, ROWS[:1])
    [ex] = inspect_examples(cfg, tokenizer, n=5)
    supervised = "".join(t["text"] for t in ex["tokens"] if t["loss"])
    assert supervised == "多喝水，休息。<|im_end|>"
    whys = {t["why"] for t in ex["tokens"] if t["loss"]}
    assert whys == {"assistant", "end_of_turn"}
    assert {t["why"] for t in ex["tokens"] if not t["loss"]} >= {"template", "user"}


def test_stats_count_tokens_and_drops(tmp_path, tokenizer):
    long_row = {"instruction": "word " * 300, "output": "ok"}
    cfg = recipe(tmp_path, ROWS + [long_row], format="auto", max_length=128)
    stats = data_stats(cfg, tokenizer)["train"]
    assert stats["rows"] == 3 and stats["examples"] == 2 and stats["dropped_too_long"] == 1
    assert 0 < stats["supervised_share"] < 1
    assert stats["length_max"] <= 128


def test_truncate_keeps_examples_with_supervised_tokens(tmp_path, tokenizer):
    long_answer = {"instruction": "Count", "output": "one two three " * 100}
    cfg = recipe(tmp_path, [long_answer], max_length=96, truncation="truncate")
    stats = data_stats(cfg, tokenizer)["train"]
    assert stats["examples"] == 1 and stats["truncated"] == 1 and stats["length_max"] == 96
    findings = check_data(cfg, tokenizer)
    assert any(f.level == "error" and "end-of-turn" in f.message and "truncated" in f.message for f in findings)


def test_check_passes_good_data_and_explains_pad_eos(tmp_path, tokenizer):
    findings = check_data(recipe(tmp_path, ROWS), tokenizer)
    assert not [f for f in findings if f.level == "error"]
    assert any(f.level == "info" and "pad token == eos token" in f.message for f in findings)


def test_check_fails_when_the_end_of_turn_carries_no_loss(tmp_path, tokenizer):
    findings = check_data(recipe(tmp_path, ROWS, chat_template=NO_END_MARKER), tokenizer)
    errors = [f for f in findings if f.level == "error"]
    assert errors and all("end-of-turn" in f.message for f in errors)
    assert errors[0].where.endswith("d.jsonl:1")


def test_check_fails_on_a_template_that_does_not_mark_roles(tmp_path, tokenizer):
    findings = check_data(recipe(tmp_path, ROWS, chat_template=NO_ROLES), tokenizer)
    assert any(f.level == "error" and "cannot tell who speaks" in f.message for f in findings)


def test_check_reports_unparsable_rows_with_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[1]) + "\n{not json\n", encoding="utf-8")
    cfg = load_config({"data": {"train": str(path)}})
    findings = check_data(cfg, tokenizer)
    assert any(f.level == "error" and f"{path}:2" in f.message for f in findings)


def test_check_reports_examples_with_no_supervised_token(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}]
    cfg = recipe(tmp_path, rows, chat_template="{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    findings = check_data(cfg, tokenizer)
    assert any(f.level == "error" and "no token carries loss" in f.message for f in findings)
