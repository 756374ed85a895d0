"""Self-Instruct: its filter and parsing rules on fixed strings (expected values from the released pipeline's
rules, by hand), and the whole step against a scripted endpoint: output loadable by tunesmith's data loader,
provenance on every row, and a run that dies mid-way continued by a rerun with nothing duplicated or lost."""
from __future__ import annotations

import hashlib
import itertools
import json
import re

import pytest
from datagen_endpoint import ScriptedEndpoint
from helpers import fails, invoke, ok, write_jsonl

from tunesmith.data.formats import to_conversation
from tunesmith.data.loading import load_rows
from tunesmith.datagen import rules
from tunesmith.datagen.report import StepReport
from tunesmith.datagen.self_instruct import SelfInstructOptions, parse_tasks, self_instruct, tasks_prompt
from tunesmith.datagen.teacher import Reply
from tunesmith.datagen.teachers import TeacherSpec, make_teacher
from tunesmith.errors import TunesmithError

SEEDS = [{"instruction": f"Name a famous {w} and say why it matters.", "output": "..."}
         for w in ("painter", "bridge", "river", "novel", "scientist", "mountain", "composer", "city", "battle")]


def test_numbered_list_split_and_instruction_rules():
    reply = "9. Explain  why the sky is blue.\n10. Draw a map of France.\n11. Write a program that sorts a list.\n" \
            "12. Hi there\n13. \"Quote this sentence back to me please.\n14. Ünïcode first word of a task here."
    assert rules.split_numbered_list(reply) == [
        "Explain why the sky is blue.", "Draw a map of France.", "Write a program that sorts a list.", "Hi there",
        "\"Quote this sentence back to me please.", "Ünïcode first word of a task here."]
    problems = [rules.instruction_problem(rules.capitalize_instruction(i)) for i in rules.split_numbered_list(reply)]
    assert problems[0] is None
    assert problems[1].startswith("keyword")  # "draw" and "map"
    assert problems[2] == "starts with 'Write a program'"
    assert problems[3] == "instruction of 3 words or fewer"
    assert problems[4] == "starts with punctuation"
    assert problems[5] == "starts with a non-ASCII character"
    assert rules.instruction_problem("Describe the graphics card market in detail.") is None  # whole words only
    assert rules.instruction_problem(" ".join(["word"] * 151)) == "instruction over 150 words"


def test_reply_cut_by_length_is_dropped_whole():
    report = StepReport("self-instruct", "x")
    assert parse_tasks(Reply("Explain why the sky is blue.\n10. Give three", "length"), report) == []
    assert report.dropped == {"list reply cut by the length limit": 1}


def test_prompt_is_a_numbered_list_to_continue():
    assert tasks_prompt(["A b c d.", "E f g h."]).endswith("1. A b c d.\n2. E f g h.\n3.")


def test_instance_parsing_and_postprocessing_rules():
    gen = "Example 1\nInput: 2 + 2\nOutput: 4\nExample 2\nInput: 3 + 3\nOutput: 6\nExample 3\nInput: 1 +"
    assert rules.parse_generation_instances(gen, cut=False)[:2] == [("2 + 2", "4"), ("3 + 3", "6")]
    assert rules.parse_generation_instances(gen, cut=True) == [("2 + 2", "4"), ("3 + 3", "6")]
    assert rules.parse_generation_instances("Output: just this", cut=False) == [("", "just this")]
    assert rules.parse_generation_instances("no labels at all", cut=False) == []
    clf = "Class label: Positive\nInput: Great food.\nClass label: Negative\nInput: Cold soup."
    assert rules.parse_classification_instances(clf, cut=False) == [("Great food.", "Positive"), ("Cold soup.", "Negative")]
    assert rules.instance_problem("same", "same") == "instance input equals output"
    assert rules.instance_problem("x", "") == "instance with empty output"
    assert rules.instance_problem("Sentence:", "y") == "instance ending with ':' (incomplete)"
    assert rules.instance_problem("x", "y") is None
    assert rules.conflicting_outputs([("a", "1"), ("a", "2")])
    assert not rules.conflicting_outputs([("", "1"), ("", "2"), ("a", "1"), ("a", "1")])
    assert rules.unique_pairs([("a", "1"), ("a", "1"), ("b", "2")]) == [("a", "1"), ("b", "2")]


def _scripted_answers():
    """New, mutually dissimilar instructions for list prompts; instances in the asked-for format."""
    counter = itertools.count()

    def answer(text: str, body: dict) -> str:
        if text.startswith("Come up with a series of tasks"):
            nxt = int(re.search(r"(\d+)\.$", text).group(1))
            items = []
            for _ in range(3):
                k = next(counter)
                items.append(f"Describe the q{k} z{k}a of x{k}b using w{k}c and v{k}d.")
            items.append("Draw a picture of a cat on a mat.")  # dropped by the keyword rule
            return "\n".join(f"{nxt + i}. {it}" for i, it in enumerate(items))
        if "Is it classification?" in text:
            return "Yes" if "q1 " in text.split("Task:")[-1] else "No"
        if text.startswith("Given a classification task"):
            return "Class label: Good\nInput: first\nClass label: Bad\nInput: second"
        task = text.split("Task:")[-1].strip()
        if task.startswith("Describe the q2 "):  # one input, two outputs: the task is ill-defined
            return "Example 1\nInput: same\nOutput: one\nExample 2\nInput: same\nOutput: two"
        return f"Example 1\nInput: about {task[:20]}\nOutput: answer one\nExample 2\nInput: other\nOutput: answer two"
    return answer


def _hash(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _teacher(url):
    return make_teacher(TeacherSpec(url, model="m", backoff=0.001, retries=1, concurrency=2))


def test_self_instruct_end_to_end_output_loads_and_has_provenance(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", SEEDS)
    before = _hash(seeds)
    out = tmp_path / "gen.jsonl"
    with ScriptedEndpoint(_scripted_answers()) as ep:
        # one list prompt per batch: which reply the scripted counter numbers first does not depend on threads
        report = self_instruct(seeds, out, _teacher(ep.url), SelfInstructOptions(n=5, batch=1))
    assert _hash(seeds) == before
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["instruction"] for r in rows}) == 5 == report.extra["instructions"]
    assert len({r["id"] for r in rows}) == len(rows) == report.rows_out
    assert all(r["provenance"]["step"] == "self-instruct" and len(r["provenance"]["source_ids"]) == 8 for r in rows)
    clf = [r for r in rows if r["classification"]]
    assert clf and {r["output"] for r in clf} == {"Good", "Bad"}  # output-first: the label is the output
    assert report.dropped["keyword a text model cannot serve (image, file, draw, ...)"] >= 1
    assert report.dropped["conflicting outputs for one input"] == 2
    assert not any(r["instruction"].startswith("Describe the q2 ") for r in rows)
    for row in load_rows(str(out)):  # tunesmith's own loader takes the file as alpaca rows
        assert to_conversation(row, "auto")[-1]["role"] == "assistant"
    lists = [r["messages"][0]["content"] for r in ep.chat_requests() if "series of tasks" in r["messages"][0]["content"]]
    assert lists[0].count("Name a famous") == 8  # no generated instruction yet: 8 seeds
    assert lists[-1].count("Name a famous") == 6 and lists[-1].count("Describe the q") == 2  # then 6 + 2
    first = ep.chat_requests()[0]
    assert first["temperature"] == 0.7 and first["top_p"] == 0.5 and "seed" in first
    assert first["max_tokens"] == 256 and first["stop"] == ["\n\n", "\n16."]  # 8 listed: 9..15 are new


def test_a_run_that_dies_is_continued_without_duplicates_or_losses(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", SEEDS)
    out = tmp_path / "gen.jsonl"
    with ScriptedEndpoint(_scripted_answers()) as ep:
        ep.fail_after = 15  # the endpoint breaks part-way through (the first batch takes 14 requests)
        with pytest.raises(TunesmithError, match="rerun"):
            self_instruct(seeds, out, _teacher(ep.url), SelfInstructOptions(n=8, batch=2))
        partial = out.read_text()
        assert partial and partial.endswith("\n")
        with out.open("a") as fh:
            fh.write('{"id": "cut-by-a-ki')  # what a kill in the middle of a write leaves
        ep.fail_after = None
        report = self_instruct(seeds, out, _teacher(ep.url), SelfInstructOptions(n=8, batch=2))
    text = out.read_text()
    assert text.startswith(partial)  # earlier rows untouched, the cut line gone
    rows = [json.loads(line) for line in text.splitlines()]
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["instruction"] for r in rows}) == 8
    assert report.resumed == len(partial.splitlines())


def test_bad_inputs_are_one_line_errors(tmp_path):
    no_instruction = write_jsonl(tmp_path / "seeds.jsonl", [{"prompt": "x", "completion": "y"}])
    fails(invoke("datagen", "self-instruct", no_instruction, "--n", 2, "--out", tmp_path / "o.jsonl",
                 "--teacher", "http://127.0.0.1:9/v1", "--model", "m"), "seeds.jsonl:1", "no 'instruction'")
    seeds = write_jsonl(tmp_path / "good.jsonl", SEEDS)
    before = _hash(seeds)
    fails(invoke("datagen", "self-instruct", seeds, "--out", seeds, "--teacher", "http://127.0.0.1:9/v1",
                 "--model", "m"), "is the input file")
    assert _hash(seeds) == before
    fails(invoke("datagen", "self-instruct", seeds, "--out", tmp_path / "o.txt"), "must end in .jsonl")
    fails(invoke("datagen", "self-instruct", seeds, "--n", 0, "--out", tmp_path / "o.jsonl"), "--n must be at least 1")
    for step, source in (("self-instruct", seeds), ("evol", seeds), ("augment", seeds)):
        for bad in (0, -5, 40000):
            fails(invoke("datagen", step, source, "--out", tmp_path / "o.jsonl", "--teacher", "http://127.0.0.1:9/v1",
                         "--model", "m", "--max-tokens", bad), "--max-tokens must be between 1 and 32768", f"got {bad}")
    assert invoke("datagen", "evol", seeds, "--out", tmp_path / "o.jsonl", "--max-tokens", "many").exit_code == 2
    foreign = write_jsonl(tmp_path / "foreign.jsonl", [{"instruction": "a", "output": "b"}])
    fails(invoke("datagen", "self-instruct", seeds, "--out", foreign, "--teacher", "http://127.0.0.1:9/v1",
                 "--model", "m"), "not a row written by `tunesmith datagen self-instruct`")
    fails(invoke("datagen", "self-instruct", seeds, "--out", tmp_path / "o.jsonl", "--teacher",
                 "http://127.0.0.1:9/v1", "--model", "m", "--key-env", "TS_SURELY_UNSET_KEY"), "TS_SURELY_UNSET_KEY is not set")
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_runs_and_reports(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", SEEDS)
    with ScriptedEndpoint(_scripted_answers()) as ep:
        stdout = ok(invoke("datagen", "self-instruct", seeds, "--n", 3, "--out", tmp_path / "g.jsonl", "--teacher",
                           ep.url, "--model", "m", "--max-tokens", 77, "--json"))
        assert {r["max_tokens"] for r in ep.chat_requests()} == {77, 8}  # every reply but the yes/no verdicts
    report = json.loads(stdout)
    assert report["step"] == "self-instruct" and report["teacher"]["requests"] >= 3 and report["rows_out"] >= 3
    assert json.loads((tmp_path / "g.jsonl.report.json").read_text())["rows_out"] == report["rows_out"]
