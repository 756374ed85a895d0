"""Reading data files into conversations, the train/eval split, model references and run folders.

Every user-facing error is asserted by its text: the message must say where the problem is and how
to fix it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunesmith.config import load_config
from tunesmith.data.dataset import load_conversations, split_conversations
from tunesmith.data.formats import detect_format, to_conversation
from tunesmith.data.loading import Row, load_rows
from tunesmith.errors import TunesmithError
from tunesmith.models import resolve_model
from tunesmith.outdir import check_target
from tunesmith.rundir import resume_checkpoint

SYS = {"role": "system", "content": "Be brief."}


def U(text: str) -> dict:
    return {"role": "user", "content": text}


def A(text: str) -> dict:
    return {"role": "assistant", "content": text}


def conv(data: dict, fmt: str = "auto", system_prompt: str | None = None, where: str = "data.jsonl:1"):
    return to_conversation(Row(data, where), fmt, system_prompt)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- formats --------------------------------------------------------------------------------------


def test_alpaca_without_input():
    assert conv({"instruction": "Say hi", "output": "Hi!"}, "alpaca") == [U("Say hi"), A("Hi!")]


def test_alpaca_input_is_joined_to_the_instruction_by_a_blank_line():
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert conv(row, "alpaca") == [U("Translate to French.\n\nGood morning"), A("Bonjour")]


@pytest.mark.parametrize("empty", ["", "   ", None])
def test_alpaca_empty_input_is_ignored(empty):
    row = {"instruction": "Say hi", "input": empty, "output": "Hi!"}
    assert conv(row, "alpaca") == [U("Say hi"), A("Hi!")]


def test_alpaca_with_system_and_history():
    row = {
        "system": "Be brief.",
        "history": [["What is 2+2?", "4"], ["And 3+3?", "6"]],
        "instruction": "And 4+4?",
        "input": "",
        "output": "8",
    }
    assert conv(row, "alpaca") == [SYS, U("What is 2+2?"), A("4"), U("And 3+3?"), A("6"), U("And 4+4?"), A("8")]


def test_alpaca_numbers_become_text():
    assert conv({"instruction": "2+2?", "output": 4}, "alpaca") == [U("2+2?"), A("4")]


def test_alpaca_bad_history_pair():
    with pytest.raises(TunesmithError) as info:
        conv({"instruction": "q", "output": "a", "history": [["only one"]]}, "alpaca")
    assert str(info.value) == "data.jsonl:1: history[0] must be a [question, answer] pair"


def test_alpaca_non_text_field():
    with pytest.raises(TunesmithError, match=re.escape("data.jsonl:1: field 'output' must be text, got dict")):
        conv({"instruction": "q", "output": {"a": 1}}, "alpaca")


def test_sharegpt_from_value():
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert conv(row, "sharegpt") == [U("Hi"), A("Hello")]


def test_sharegpt_with_system_key():
    row = {
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    }
    assert conv(row, "sharegpt") == [SYS, U("Hi"), A("Hello")]


def test_sharegpt_with_system_turn_and_multiple_turns():
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "Human", "value": "Hi"},  # speaker names are case-insensitive
            {"from": "gpt", "value": "Hello"},
            {"from": "user", "value": "Bye"},
            {"from": "assistant", "value": "Bye!"},
        ]
    }
    assert conv(row, "sharegpt") == [SYS, U("Hi"), A("Hello"), U("Bye"), A("Bye!")]


def test_messages_format():
    row = {"messages": [SYS, U("Hi"), A("Hello"), U("Bye"), A("Bye!")]}
    assert conv(row, "messages") == [SYS, U("Hi"), A("Hello"), U("Bye"), A("Bye!")]


def test_messages_extra_keys_are_dropped():
    row = {"messages": [{"role": "user", "content": "Hi", "name": "x"}, {"role": "assistant", "content": "Yo"}]}
    assert conv(row, "messages") == [U("Hi"), A("Yo")]


def test_messages_entry_without_content():
    with pytest.raises(TunesmithError) as info:
        conv({"messages": [{"role": "user"}, A("a")]}, "messages")
    assert str(info.value) == "data.jsonl:1: messages[0] must be an object with 'role' and 'content'"


def test_messages_not_a_list():
    with pytest.raises(TunesmithError, match=re.escape("'messages' must be a list of {role, content} objects")):
        conv({"messages": "hello"}, "messages")


def test_prompt_completion_plain():
    assert conv({"prompt": "2+2=", "completion": "4"}, "prompt_completion") == [U("2+2="), A("4")]


def test_prompt_completion_conversational():
    row = {"prompt": [SYS, U("Hi")], "completion": [A("Hello")]}
    assert conv(row, "prompt_completion") == [SYS, U("Hi"), A("Hello")]


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"messages": [U("a"), A("b")]}, "messages"),
        ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"prompt": [U("a")], "completion": [A("b")]}, "prompt_completion"),
    ],
)
def test_auto_detection(data, expected):
    assert detect_format(Row(data, "x")) == expected


def test_auto_converts_like_the_explicit_format():
    rows = [
        {"messages": [U("a"), A("b")]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"instruction": "a", "output": "b"},
        {"prompt": "a", "completion": "b"},
    ]
    for row in rows:
        assert conv(row, "auto") == [U("a"), A("b")]


def test_system_prompt_is_added_when_missing():
    assert conv({"instruction": "Hi", "output": "Hello"}, "alpaca", system_prompt="Be brief.") == [
        SYS,
        U("Hi"),
        A("Hello"),
    ]


def test_system_prompt_does_not_replace_an_existing_one():
    row = {"messages": [{"role": "system", "content": "Own system."}, U("Hi"), A("Hello")]}
    assert conv(row, "messages", system_prompt="Be brief.") == [
        {"role": "system", "content": "Own system."},
        U("Hi"),
        A("Hello"),
    ]


def test_system_prompt_from_config_applies_to_every_row(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"instruction": "a", "output": "b"}, {"messages": [SYS, U("c"), A("d")]}],
    )
    config = load_config({"data": {"train": str(path), "system_prompt": "Be brief."}})
    convs = load_conversations(config.data.train, config)
    assert convs == [
        ([SYS, U("a"), A("b")], f"{path}:1"),
        ([SYS, U("c"), A("d")], f"{path}:2"),
    ]


# --- format errors --------------------------------------------------------------------------------


def test_unknown_format_cannot_tell_from_keys():
    with pytest.raises(TunesmithError) as info:
        conv({"question": "q", "answer": "a"}, "auto")
    msg = str(info.value)
    assert msg.startswith("data.jsonl:1: cannot tell the data format from the keys ['answer', 'question']")
    assert "Rename the fields or set data.format" in msg


def test_unknown_format_name():
    with pytest.raises(TunesmithError, match=re.escape("data.format 'xml' is unknown; use one of auto, messages")):
        conv({"messages": [U("a"), A("b")]}, "xml")


def test_missing_field_for_explicit_format():
    with pytest.raises(TunesmithError) as info:
        conv({"instruction": "a", "answer": "b"}, "alpaca")
    assert str(info.value) == (
        "data.jsonl:1: missing field 'output' required by data.format=alpaca (row has ['answer', 'instruction'])"
    )


def test_missing_field_for_explicit_messages_format():
    with pytest.raises(TunesmithError, match=re.escape("missing field 'messages' required by data.format=messages")):
        conv({"instruction": "a", "output": "b"}, "messages")


def test_no_assistant_message():
    with pytest.raises(TunesmithError) as info:
        conv({"messages": [SYS, U("Hi")]}, "messages")
    assert str(info.value) == "data.jsonl:1: no assistant message, so nothing to learn from; add the answer"


def test_conversation_ending_with_user():
    with pytest.raises(TunesmithError) as info:
        conv({"messages": [U("Hi"), A("Hello"), U("Bye")]}, "messages")
    assert str(info.value) == (
        "data.jsonl:1: the last message is from 'user', not the assistant; end each example with the answer to learn"
    )


def test_unknown_role():
    with pytest.raises(TunesmithError) as info:
        conv({"messages": [{"role": "human", "content": "Hi"}, A("Hello")]}, "messages")
    assert str(info.value) == "data.jsonl:1: message 0 has role 'human'; use one of assistant, system, tool, user"


def test_unknown_sharegpt_speaker():
    row = {"conversations": [{"from": "alien", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    with pytest.raises(TunesmithError) as info:
        conv(row, "sharegpt")
    msg = str(info.value)
    assert msg.startswith("data.jsonl:1: conversations[0].from = 'alien' is not a known speaker; use one of ")
    assert "gpt" in msg and "human" in msg


def test_sharegpt_turn_without_value():
    with pytest.raises(TunesmithError, match=re.escape("conversations[1] must be an object with 'from' and 'value'")):
        conv({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]}, "sharegpt")


def test_empty_conversation():
    with pytest.raises(TunesmithError, match=re.escape("data.jsonl:1: the conversation is empty")):
        conv({"messages": []}, "messages")


def test_empty_conversation_with_system_prompt():
    # With a system prompt the conversation is [system] only, which has no assistant message.
    with pytest.raises(TunesmithError):
        conv({"messages": []}, "messages", system_prompt="Be brief.")


# --- files ----------------------------------------------------------------------------------------


ALPACA_ROWS = [
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"instruction": "Translate", "input": "Good morning", "output": "Bonjour"},
]
ALPACA_CONVS = [[U("Say hi"), A("Hi!")], [U("Translate\n\nGood morning"), A("Bonjour")]]


def _convs(rows):
    return [to_conversation(r, "auto") for r in rows]


def test_jsonl_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    rows = load_rows(str(path))
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:2"]
    assert _convs(rows) == ALPACA_CONVS


def test_jsonl_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(ALPACA_ROWS[0]) + "\n\n   \n" + json.dumps(ALPACA_ROWS[1]) + "\n\n", encoding="utf-8")
    rows = load_rows(str(path))
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:5"]
    assert _convs(rows) == ALPACA_CONVS


def test_json_list_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ALPACA_ROWS), encoding="utf-8")
    rows = load_rows(str(path))
    assert [r.where for r in rows] == [f"{path}[0]", f"{path}[1]"]
    assert _convs(rows) == ALPACA_CONVS


def test_json_object_holding_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"version": 1, "data": ALPACA_ROWS}), encoding="utf-8")
    assert _convs(load_rows(str(path))) == ALPACA_CONVS


def test_json_object_with_two_lists_is_ambiguous(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": ALPACA_ROWS, "test": ALPACA_ROWS}), encoding="utf-8")
    with pytest.raises(TunesmithError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}: expected a JSON list of objects (or an object holding one list)"


def test_json_list_item_not_an_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ALPACA_ROWS[0], "oops"]), encoding="utf-8")
    with pytest.raises(TunesmithError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}[1]: each item must be a JSON object, got str"


def test_invalid_json_file_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": oops}\n]\n', encoding="utf-8")
    with pytest.raises(TunesmithError, match=re.escape(f"{path}:3: not valid JSON")):
        load_rows(str(path))


def test_csv_file(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "d.csv"
    pd.DataFrame(ALPACA_ROWS).to_csv(path, index=False)
    rows = load_rows(str(path))
    # Line 1 is the header.
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:3"]
    assert _convs(rows) == ALPACA_CONVS


def test_csv_messages_column_holding_json(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "d.csv"
    pd.DataFrame([{"messages": json.dumps([U("Hi"), A("Hello")])}]).to_csv(path, index=False)
    assert _convs(load_rows(str(path))) == [[U("Hi"), A("Hello")]]


def test_csv_text_that_looks_like_a_list_stays_text(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "d.csv"
    pd.DataFrame([{"instruction": "List the first three numbers as JSON.", "output": "[1, 2, 3]"}]).to_csv(
        path, index=False
    )
    assert _convs(load_rows(str(path))) == [[U("List the first three numbers as JSON."), A("[1, 2, 3]")]]


def test_parquet_file(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    pd.DataFrame(ALPACA_ROWS).to_parquet(path)
    rows = load_rows(str(path))
    assert [r.where for r in rows] == [f"{path}[0]", f"{path}[1]"]
    assert _convs(rows) == ALPACA_CONVS


def test_parquet_nested_messages(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    pd.DataFrame([{"messages": [SYS, U("Hi"), A("Hello")]}, {"messages": [U("a"), A("b")]}]).to_parquet(path)
    assert _convs(load_rows(str(path))) == [[SYS, U("Hi"), A("Hello")], [U("a"), A("b")]]


def test_list_of_sources_keeps_order_and_mixes_formats(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"messages": [U("a"), A("b")]}])
    second = tmp_path / "b.json"
    second.write_text(json.dumps([{"prompt": "c", "completion": "d"}, {"instruction": "e", "output": "f"}]))
    rows = load_rows([str(first), str(second)])
    assert [r.where for r in rows] == [f"{first}:1", f"{second}[0]", f"{second}[1]"]
    assert _convs(rows) == [[U("a"), A("b")], [U("c"), A("d")], [U("e"), A("f")]]


def test_uppercase_suffix(tmp_path):
    path = write_jsonl(tmp_path / "D.JSONL", ALPACA_ROWS)
    assert len(load_rows(str(path))) == 2


# --- file errors ----------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(ALPACA_ROWS[0]) + "\n\n" + json.dumps(ALPACA_ROWS[1]) + "\n" + '{"instruction": "x", "output": \n',
        encoding="utf-8",
    )
    with pytest.raises(TunesmithError) as info:
        load_rows(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}:4: not valid JSON (")
    assert msg.endswith("; fix or remove this line")


def test_non_object_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA_ROWS[0]) + "\n" + "[1, 2]\n", encoding="utf-8")
    with pytest.raises(TunesmithError) as info:
        load_rows(str(path))
    assert str(info.value) == f"{path}:2: each line must be a JSON object, got list"


def test_empty_jsonl_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(TunesmithError) as info:
        load_rows(str(path))
    assert str(info.value) == f"data '{path}' has no rows: add examples to it"


def test_empty_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(TunesmithError, match="has no rows: add examples to it"):
        load_rows(str(path))


def test_all_empty_sources_list_every_source(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("")
    b.write_text("")
    with pytest.raises(TunesmithError) as info:
        load_rows([str(a), str(b)])
    assert str(info.value) == f"data '{a}, {b}' has no rows: add examples to it"


def test_header_only_csv_says_it_has_no_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\n", encoding="utf-8")
    with pytest.raises(TunesmithError, match="has no rows"):
        load_rows(str(path))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(TunesmithError) as info:
        load_rows(str(path))
    assert str(info.value) == f"data file '{path}' does not exist"


def test_missing_file_in_a_list(tmp_path):
    ok = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    missing = tmp_path / "nope.parquet"
    with pytest.raises(TunesmithError, match=re.escape(f"data file '{missing}' does not exist")):
        load_rows([str(ok), str(missing)])


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(TunesmithError) as info:
        load_rows(str(path))
    assert str(info.value) == (
        f"data file '{path}': unsupported file type '.txt'; use one of .jsonl, .json, .csv, .parquet"
    )


@pytest.fixture
def hub_offline(monkeypatch):
    """Make hub look-ups fail at once. The env var alone is read only when datasets is first imported."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


@pytest.mark.timeout(60)
def test_hub_id_without_network(hub_offline):
    with pytest.raises(TunesmithError) as info:
        load_rows("nonexistent-org/nonexistent-dataset-xyz")
    msg = str(info.value)
    assert msg.startswith("data 'nonexistent-org/nonexistent-dataset-xyz' is not a local file")
    assert "network" in msg
    assert "point data.train at the file" in msg


# --- split ----------------------------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint():
    items = [f"c{i}" for i in range(50)]
    train, held = split_conversations(items, 0.2, seed=7)
    again_train, again_held = split_conversations(items, 0.2, seed=7)
    assert (train, held) == (again_train, again_held)
    assert len(held) == 10 and len(train) == 40
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == sorted(items)
    # Both sides keep the original order.
    assert train == [c for c in items if c in set(train)]
    assert held == [c for c in items if c in set(held)]


def test_split_depends_on_seed():
    items = list(range(100))
    assert split_conversations(items, 0.2, seed=1)[1] != split_conversations(items, 0.2, seed=2)[1]


def test_split_holds_out_at_least_one():
    train, held = split_conversations(["a", "b", "c"], 0.01, seed=0)
    assert len(held) == 1 and len(train) == 2


@pytest.mark.parametrize("items, share", [(["a"], 0.5), (["a", "b", "c"], 0.0), ([], 0.1)])
def test_split_without_holding_out(items, share):
    assert split_conversations(items, share, seed=0) == (items, [])


# --- models.resolve_model -------------------------------------------------------------------------


def test_unknown_model_name():
    with pytest.raises(TunesmithError) as info:
        resolve_model("not-a-model")
    msg = str(info.value)
    assert msg.startswith("unknown model 'not-a-model': it is not a built-in name (smollm2-135m-instruct)")
    assert "`tunesmith models list`" in msg


def test_hub_like_id_resolves_to_the_hub_when_reachable(monkeypatch):
    import tunesmith.models as models

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: True)
    resolved = resolve_model("some-org/some-model")
    assert (resolved.kind, resolved.path, resolved.gguf_file) == ("hub", "some-org/some-model", None)


def test_hub_id_without_cache_or_network_says_so_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunesmithError, match="not in the local Hugging Face cache and the hub cannot be reached"):
        resolve_model("some-org/some-model")


def test_hub_id_in_the_local_cache_resolves_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--some-org--cached-model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--some-org--cached-model" / "refs").mkdir()
    (tmp_path / "models--some-org--cached-model" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("some-org/cached-model").kind == "hub"


def test_model_folder_without_config_json(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    with pytest.raises(TunesmithError) as info:
        resolve_model(str(folder))
    msg = str(info.value)
    assert msg.startswith(f"model: folder '{folder}' has no config.json")
    assert "tunesmith export" in msg


def test_model_folder_with_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    resolved = resolve_model(str(tmp_path))
    assert (resolved.kind, resolved.path) == ("folder", str(tmp_path))


def test_missing_gguf_file(tmp_path):
    path = tmp_path / "model.Q4.gguf"
    with pytest.raises(TunesmithError) as info:
        resolve_model(str(path))
    assert str(info.value) == f"model: GGUF file '{path}' does not exist"


def test_existing_gguf_file_resolves_without_loading(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"")
    resolved = resolve_model(str(path))
    assert (resolved.kind, resolved.path, resolved.gguf_file) == ("gguf", str(tmp_path), "model.gguf")


# --- outdir.check_target and rundir.resume_checkpoint ---------------------------------------------
TAKEN = "already exists and is not empty; pass --overwrite"


def check_output_dir(path, may_replace):
    check_target(path, [], may_replace=may_replace, flag="output_dir", example="runs/my-run", taken=TAKEN)


def test_output_dir_new_or_empty_is_fine(tmp_path):
    check_output_dir(tmp_path / "new", may_replace=False)
    check_output_dir(tmp_path, may_replace=False)


def test_output_dir_not_empty_is_refused_without_overwrite(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(TunesmithError) as info:
        check_output_dir(tmp_path, may_replace=False)
    assert str(info.value) == f"output_dir '{tmp_path}' {TAKEN}"


def test_output_dir_not_empty_with_overwrite(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    check_output_dir(tmp_path, may_replace=True)


def test_resume_without_checkpoint(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()  # incomplete: no trainer_state.json
    with pytest.raises(TunesmithError) as info:
        resume_checkpoint(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"--resume: no checkpoint in '{tmp_path}'")
    assert "checkpoint-N" in msg


def test_resume_without_output_dir(tmp_path):
    with pytest.raises(TunesmithError, match="no checkpoint"):
        resume_checkpoint(tmp_path / "missing")


def test_resume_picks_the_latest_complete_checkpoint(tmp_path):
    for step, complete in [(5, True), (20, True), (100, True), (200, False)]:
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        if complete:
            (ckpt / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-final").mkdir()
    assert resume_checkpoint(tmp_path) == tmp_path / "checkpoint-100"
