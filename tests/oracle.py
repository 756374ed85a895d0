"""A stand-in for greedy generation in eval tests, so a task score can be checked against a hand count.

Tiny random models answer garbage, so every task score they get is 0, and a scorer called with its arguments
swapped, references paired with the wrong prompts or a transposed accuracy matrix would all still read 0.
`script_answers` replaces the generation step of `tunesmith.evaluation.run`: it finds the eval row each prompt
was rendered from (the one row whose input text the prompt contains) and returns the answer the test scripts
for that row, so the test knows in advance which examples are right.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

Answer = Callable[[object, int, dict], str]  # (model, row index, row) -> the generated answer


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def row_of(rows: list[dict], prompt: str) -> int:
    """The index of the one row whose input the prompt contains; the prompt must stop before that row's answer."""
    hits = [i for i, r in enumerate(rows) if r["input"] in prompt]
    assert len(hits) == 1, f"prompt matches rows {hits}: {prompt!r}"
    assert rows[hits[0]]["output"] not in prompt, f"the prompt contains the reference answer: {prompt!r}"
    return hits[0]


def script_answers(monkeypatch, rows: list[dict], answer: Answer) -> list[int]:
    """Answer each eval prompt with answer(model, i, rows[i]); returns the row indices asked, in order."""
    from tunesmith.evaluation import run

    asked: list[int] = []

    def generate(model, tokenizer, prompts, max_new_tokens, batch_size, on_batch=None):
        indices = [row_of(rows, p) for p in prompts]
        asked.extend(indices)
        return [answer(model, i, rows[i]) for i in indices]

    monkeypatch.setattr(run, "generate_answers", generate)
    return asked


def right_json(row: dict) -> str:
    """The row's JSON reference as a chatty model gives it: keys reversed, inside a sentence.

    json_match scores it 1; with its arguments swapped it would parse the sentence as the reference and fail.
    """
    obj = json.loads(row["output"])
    return f"Here is the booking: {json.dumps(dict(reversed(obj.items())))} Hope this helps!"


def wrong_json(row: dict) -> str:
    """Valid JSON one guest off the reference."""
    obj = json.loads(row["output"])
    return json.dumps({**obj, "guests": obj["guests"] + 1})
