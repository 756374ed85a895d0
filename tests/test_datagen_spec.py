"""`tunesmith datagen run SPEC.yaml`: one step per spec, its keys the command's options, validated like a recipe
(one line naming the spec, the key and the fix), and the same output as the step's own command."""
from __future__ import annotations

import hashlib
import json

import pytest
from datagen_endpoint import ScriptedEndpoint
from helpers import fails, invoke, ok, write_jsonl

ROWS = [{"id": "a", "instruction": "Name a famous painter and say why.", "output": "Monet, for light."},
        {"id": "b", "instruction": "name a famous painter and say why!", "output": "Monet, for light."},
        {"id": "c", "instruction": "List two prime numbers below ten.", "output": "Two and seven."}]


def _spec(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_dedup_spec_runs_like_the_command_with_input_next_to_the_spec(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    write_jsonl(tmp_path / "specs" / "data.jsonl", ROWS)
    spec = _spec(tmp_path / "specs" / "dedup.yaml", "step: dedup\ninput: data.jsonl\nout: clean.jsonl\nthreshold: 0.9\n")
    monkeypatch.chdir(tmp_path)  # `out` is relative to the working folder, like a recipe's output_dir
    report = json.loads(ok(invoke("datagen", "run", spec, "--json")))
    assert report["step"] == "dedup" and report["rows_in"] == 3 and report["rows_out"] == 2
    assert [json.loads(line)["id"] for line in (tmp_path / "clean.jsonl").read_text().splitlines()] == ["a", "c"]
    ok(invoke("datagen", "run", spec, "--set", "out=again.jsonl", "--set", "shingle=1"))
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "clean.jsonl").read_text()


def test_generating_spec_sends_its_options_to_the_teacher(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", ROWS)
    def answer(text: str, body: dict) -> str:
        if "Prompt:\n" in text:
            return text.split("Prompt:\n", 1)[1] + " Answer in French."
        return "Not Equal" if text.startswith("Are these two instructions equal") else "Un peintre: Monet."
    with ScriptedEndpoint(answer) as ep:
        spec = _spec(tmp_path / "evol.yaml", f"step: evol\ninput: {seeds}\nout: {tmp_path / 'e.jsonl'}\nrounds: 2\n"
                                             f"teacher: {ep.url}\nmodel: m\nmax_tokens: 64\nseed: 5\n")
        ok(invoke("datagen", "run", spec))
        sent = ep.chat_requests()
    assert {r["max_tokens"] for r in sent} == {64, 8} and {r["model"] for r in sent} == {"m"}
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert {r["provenance"]["round"] for r in rows} == {1, 2} and len(rows) == 6


@pytest.mark.parametrize("text, fragments", [
    ("step: dedup\ninput: d.jsonl\nout: o.jsonl\ntreshold: 0.9\n", ["unknown key 'treshold'", "did you mean 'threshold'"]),
    ("step: dedup\ninput: d.jsonl\nout: o.jsonl\nrounds: 2\n", ["unknown key 'rounds'", "an option of evol, not of dedup"]),
    ("step: dedup\ninput: d.jsonl\nout: o.jsonl\nthreshold: 1.5\n", ["threshold = 1.5 is invalid", "less than or equal to 1"]),
    ("step: evol\ninput: d.jsonl\nout: o.jsonl\nmax_tokens: 0\n", ["max_tokens = 0 is invalid", "greater than or equal to 1"]),
    ("step: augment\ninput: d.jsonl\nout: o.jsonl\nops: [shout]\n", ["ops[0] = 'shout' is invalid", "'paraphrase'"]),
    ("step: select\ninput: d.jsonl\nout: o.jsonl\nn: many\n", ["n = 'many' is invalid", "integer"]),
    ("step: dedup\ninput: d.jsonl\n", ["out is required"]),
    ("input: d.jsonl\nout: o.jsonl\n", ["has no 'step'", "use one of self-instruct, evol, augment, dedup, filter, select"]),
    ("step: grow\ninput: d.jsonl\nout: o.jsonl\n", ["step = 'grow' is invalid", "use one of self-instruct"]),
    ("- step: dedup\n", ["the top level must be a mapping"]),
    ("step: dedup\nstep: evol\n", ["duplicate key 'step'"]),
])
def test_bad_specs_are_one_line_naming_the_key(tmp_path, text, fragments):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    before = hashlib.sha256(data.read_bytes()).hexdigest()
    spec = _spec(tmp_path / "spec.yaml", text)
    fails(invoke("datagen", "run", spec), str(spec), *fragments)
    assert not (tmp_path / "o.jsonl").exists() and hashlib.sha256(data.read_bytes()).hexdigest() == before


def test_bad_set_and_missing_spec(tmp_path):
    spec = _spec(tmp_path / "spec.yaml", "step: dedup\ninput: d.jsonl\nout: o.jsonl\n")
    fails(invoke("datagen", "run", spec, "--set", "shingle=0"), "--set shingle=0", "shingle = 0 is invalid")
    fails(invoke("datagen", "run", spec, "--set", "step=nope"), "step = 'nope' is invalid")
    fails(invoke("datagen", "run", tmp_path / "none.yaml"), "datagen spec", "does not exist")
    fails(invoke("datagen", "run", spec), "input file", "d.jsonl' does not exist")
