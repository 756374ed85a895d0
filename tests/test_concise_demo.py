"""The concise-answer preference task (tunesmith.demo.concise): deterministic, disjoint, what recipes/data ships,
and a scorer that tells a concise answer from a verbose one."""
from __future__ import annotations

from pathlib import Path

from tunesmith.data.loading import Row
from tunesmith.data.preference import to_preference_pair
from tunesmith.demo import concise

REPO = Path(__file__).resolve().parent.parent


def test_generator_is_deterministic_and_disjoint():
    train, held = concise.generate(n_train=400, n_eval=100, seed=0)
    assert len(train) == 400 and len(held) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert concise.generate(n_train=400, n_eval=100, seed=0) == (train, held)
    assert concise.generate(n_train=400, n_eval=100, seed=1) != (train, held)


def test_every_pair_differs_only_in_length_and_reads_as_a_preference_pair():
    train, held = concise.generate(n_train=400, n_eval=100, seed=0)
    for i, row in enumerate(train + held):
        assert len(row["chosen"].split()) <= concise.MAX_WORDS < 25 <= len(row["rejected"].split())
        assert concise.score(row["chosen"], row["answer"]) == 1.0 and row["answer"].lower() in row["rejected"].lower()
        pair = to_preference_pair(Row(row, f"row {i}"))
        assert pair.prompt == [{"role": "user", "content": row["prompt"]}]
        assert (pair.chosen["content"], pair.rejected["content"]) == (row["chosen"], row["rejected"])


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    concise.write(tmp_path)
    for name in ("concise-pref-train.jsonl", "concise-pref-eval.jsonl"):
        assert (tmp_path / name).read_text() == (REPO / "recipes" / "data" / name).read_text()


def test_score_wants_the_answer_in_at_most_max_words():
    assert concise.MAX_WORDS == 8
    assert concise.score("56.", "56") == 1.0
    assert concise.score("The capital of France is paris.", "Paris") == 1.0  # 6 words, case aside
    assert concise.score("one two three four five six seven Paris", "Paris") == 1.0  # exactly 8 words
    assert concise.score("one two three four five six seven eight Paris", "Paris") == 0.0  # 9 words
    assert concise.score("Lyon.", "Paris") == 0.0
    assert concise.score("", "Paris") == 0.0
