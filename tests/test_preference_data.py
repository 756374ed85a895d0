"""Preference rows in every supported format -> (prompt, chosen, rejected), masking of both replies across
template families, and the errors a bad row gives (with its file and line).

Expected supervised texts are written out by hand from each family's documented format (as in test_masking.py).
"""
from __future__ import annotations

import json

import pytest

from tunesmith.config import load_config
from tunesmith.data.assemble import prepare_data
from tunesmith.data.loading import Row
from tunesmith.data.masking import IGNORE_INDEX
from tunesmith.data.preference import PreferencePair, to_preference_pair, tokenize_pair
from tunesmith.errors import TunesmithError

from helpers import write_jsonl
from test_masking import ALL, FAMILIES, _family_tokenizer

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731

EXPECTED = PreferencePair([U("What is 2+2?")], A("4."), A("Five, I think."), "f.jsonl:1")

ROWS = {
    "trl explicit, strings": {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "Five, I think."},
    "trl explicit, messages": {"prompt": [U("What is 2+2?")], "chosen": [A("4.")], "rejected": [A("Five, I think.")]},
    "trl implicit prompt": {"chosen": [U("What is 2+2?"), A("4.")], "rejected": [U("What is 2+2?"), A("Five, I think.")]},
    "ultrafeedback binarized": {"prompt": "What is 2+2?", "chosen": [U("What is 2+2?"), A("4.")],
                                "rejected": [U("What is 2+2?"), A("Five, I think.")], "score_chosen": 9.0,
                                "score_rejected": 2.0},
    "ultrafeedback raw": {"instruction": "What is 2+2?", "completions": [
        {"response": "Maybe 3.", "overall_score": 3}, {"response": "4.", "overall_score": 9.5},
        {"response": "Five, I think.", "overall_score": 1}]},
    "alpaca": {"instruction": "What is 2+2?", "input": "", "chosen": "4.", "rejected": "Five, I think."},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is 2+2?"}], "chosen": {"from": "gpt", "value": "4."},
                 "rejected": {"from": "gpt", "value": "Five, I think."}},
}


@pytest.mark.parametrize("name", ROWS)
def test_every_format_gives_the_same_pair(name):
    assert to_preference_pair(Row(ROWS[name], "f.jsonl:1")) == EXPECTED


def test_multi_turn_prompt_and_system_prompt():
    row = {"chosen": [U("Hi"), A("Hello."), U("What is 2+2?"), A("4.")],
           "rejected": [U("Hi"), A("Hello."), U("What is 2+2?"), A("5.")]}
    pair = to_preference_pair(Row(row, "f.jsonl:3"), system_prompt="Be brief.")
    assert pair.prompt == [S("Be brief."), U("Hi"), A("Hello."), U("What is 2+2?")]
    assert (pair.chosen, pair.rejected) == (A("4."), A("5."))


def test_alpaca_input_and_history_become_the_prompt():
    row = {"instruction": "Add", "input": "2 and 2", "history": [["Hi", "Hello."]], "chosen": "4", "rejected": "5"}
    assert to_preference_pair(Row(row, "f:1")).prompt == [U("Hi"), A("Hello."), U("Add\n\n2 and 2")]


BAD_ROWS = [
    ({"prompt": "Q", "rejected": "no"}, "f.jsonl:7: missing field 'chosen'"),
    ({"prompt": "Q", "chosen": "yes"}, "f.jsonl:7: missing field 'rejected'"),
    ({"prompt": "Q", "chosen": None, "rejected": "no"}, "f.jsonl:7: missing field 'chosen'"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "f.jsonl:7: chosen and rejected are identical"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "f.jsonl:7: the prompt is empty"),
    ({"prompt": "Q", "chosen": "", "rejected": "b"}, "f.jsonl:7: the chosen reply is empty"),
    ({"chosen": [U("Q1"), A("a")], "rejected": [U("Q2"), A("b")]}, "f.jsonl:7: the chosen and rejected conversations differ"),
    ({"chosen": "a", "rejected": "b"}, "f.jsonl:7: 'chosen' and 'rejected' are text but there is no 'prompt'"),
    ({"prompt": "Q", "chosen": [A("a"), A("b")], "rejected": "c"}, "f.jsonl:7: 'chosen' must be one assistant reply"),
    ({"prompt": [U("Q"), A("a")], "chosen": "b", "rejected": "c"}, "f.jsonl:7: the prompt ends with an assistant message"),
    ({"prompt": "Q", "chosen": 3, "rejected": "c"}, "f.jsonl:7: 'chosen' must be text or a list"),
    ({"instruction": "Q", "completions": [{"response": "a", "overall_score": 2}, {"response": "b", "overall_score": 2}]},
     "f.jsonl:7: every completion has overall_score 2, so none is preferred"),
    ({"instruction": "Q", "completions": [{"response": "a"}, {"response": "b", "overall_score": 2}]},
     "f.jsonl:7: completions[0] must be an object with 'response' and a numeric 'overall_score'"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS, ids=[m.split(": ", 1)[1][:40] for _, m in BAD_ROWS])
def test_bad_rows_name_the_row(row, message):
    with pytest.raises(TunesmithError) as err:
        to_preference_pair(Row(row, "f.jsonl:7"))
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


# Only the reply and the end-of-turn marker the template writes after it carry log-probs (hand-written per family).
END = {family: spec["end"] for family, spec in FAMILIES.items()}


@pytest.fixture(scope="module")
def family_tokenizers(tokenizer):
    return {family: _family_tokenizer(tokenizer, family) for family in ALL}


def supervised_text(tok, ex):
    return tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX], skip_special_tokens=False)


@pytest.mark.parametrize("family", ALL)
def test_only_reply_tokens_are_supervised(family_tokenizers, family):
    tok = family_tokenizers[family]
    pair = PreferencePair([U("Hi"), A("Hello."), U("What is 2+2?")], A("4."), A("Five, I think."), "f:1")
    ex = tokenize_pair(tok, pair)
    assert supervised_text(tok, ex.chosen) == "4." + END[family]
    assert supervised_text(tok, ex.rejected) == "Five, I think." + END[family]
    # Everything before the first supervised token is the prompt, token for token the same in both.
    first = [ex.chosen.labels.index(next(x for x in ex.chosen.labels if x != IGNORE_INDEX)),
             ex.rejected.labels.index(next(x for x in ex.rejected.labels if x != IGNORE_INDEX))]
    assert first[0] == first[1]
    assert ex.chosen.input_ids[: first[0]] == ex.rejected.input_ids[: first[1]]
    for side in (ex.chosen, ex.rejected):  # labels are the token ids where supervised, nothing else
        assert all(label in (IGNORE_INDEX, t) for t, label in zip(side.input_ids, side.labels))


def test_chatml_prompt_tokens_are_the_rendered_prompt(family_tokenizers):
    tok = family_tokenizers["chatml"]
    ex = tokenize_pair(tok, EXPECTED)
    prompt_ids = [t for t, label in zip(ex.chosen.input_ids, ex.chosen.labels) if label == IGNORE_INDEX]
    assert tok.decode(prompt_ids, skip_special_tokens=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        "\n"  # the newline the template writes after the end of turn: never supervised
    )


def _recipe(tmp_path, tiny_model_dir, rows, **data):
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    return load_config({"model": str(tiny_model_dir), "data": {"train": str(tmp_path / "pairs.jsonl"), "eval_split": 0.25,
                                                             **data},
                        "train": {"objective": "dpo"}, "output_dir": str(tmp_path / "run")})


def test_prepare_data_gives_pairs_and_stats(tmp_path, tiny_model_dir, tokenizer):
    rows = [{"prompt": f"What is {i}+{i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."} for i in range(8)]
    data = prepare_data(_recipe(tmp_path, tiny_model_dir, rows), tokenizer)
    assert (len(data.train), len(data.eval)) == (6, 2)
    stats = data.stats()["train"]
    assert stats["rows"] == stats["examples"] == 6
    assert stats["tokens"] == sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in data.train)
    assert stats["supervised_tokens"] == sum(p.chosen.num_supervised + p.rejected.num_supervised for p in data.train)


def test_a_bad_row_in_a_file_names_its_line(tmp_path, tiny_model_dir, tokenizer):
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "same", "rejected": "same"}]
    config = _recipe(tmp_path, tiny_model_dir, rows)
    with pytest.raises(TunesmithError, match=r"pairs\.jsonl:2: chosen and rejected are identical"):
        prepare_data(config, tokenizer)


def test_too_long_pairs_are_dropped_and_counted(tmp_path, tiny_model_dir, tokenizer):
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "Q", "chosen": "word " * 80, "rejected": "b"}]
    data = prepare_data(_recipe(tmp_path, tiny_model_dir, rows, max_length=48, eval_split=0.0), tokenizer)
    assert (len(data.train), data.train_stats.dropped_too_long) == (3, 1)


@pytest.mark.parametrize(("section", "message"), [
    ({"train": {"objective": "sft"}, "preference": {"beta": 0.2}},
     "preference.beta cannot be used with train.objective=sft; it applies to dpo, orpo, simpo"),
    ({"train": {"objective": "orpo"}, "preference": {"gamma": 1.0}}, "preference.gamma cannot be used with train.objective=orpo"),
    ({"train": {"objective": "simpo"}, "preference": {"label_smoothing": 0.1}},
     "preference.label_smoothing cannot be used with train.objective=simpo; it applies to dpo"),
    ({"train": {"objective": "dpo"}, "preference": {"loss": "ipo", "label_smoothing": 0.1}},
     "preference.label_smoothing applies to preference.loss: sigmoid"),
    ({"train": {"objective": "dpo"}, "preference": {"label_smoothing": 0.5}}, "preference.label_smoothing"),
    ({"train": {"objective": "dpo"}, "preference": {"beta": 0}}, "preference.beta"),
    ({"train": {"objective": "kto"}}, "train.objective"),
    ({"train": {"objective": "dpo"}, "regularize": {"replay": {"ratio": 0.1}}},
     "regularize.replay: not supported with train.objective=dpo"),
    ({"train": {"objective": "simpo"}, "data": {"train": "x.jsonl", "format": "alpaca"}},
     "data.format: not supported with train.objective=simpo"),
])
def test_bad_preference_config(section, message):
    with pytest.raises(TunesmithError) as err:
        load_config({"data": {"train": "x.jsonl"}, **section})
    assert message in str(err.value), str(err.value)


def test_json_rows_name_their_index(tmp_path, tiny_model_dir, tokenizer):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "", "chosen": "a", "rejected": "b"}]))
    config = load_config({"model": str(tiny_model_dir), "data": {"train": str(path)}, "train": {"objective": "orpo"}})
    with pytest.raises(TunesmithError, match=r"pairs\.json\[1\]: the prompt is empty"):
        prepare_data(config, tokenizer)


def test_eval_scores_held_out_prompts_against_the_chosen_reply(tmp_path, tiny_model_dir):
    from tunesmith.data.assemble import eval_conversations

    rows = [{"prompt": f"What is {i}+{i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."} for i in range(8)]
    held = eval_conversations(_recipe(tmp_path, tiny_model_dir, rows))
    assert len(held) == 2
    for conversation, where in held:
        i = int(where.rsplit(":", 1)[1]) - 1
        assert conversation == [U(f"What is {i}+{i}?"), A(f"{2 * i}.")]
