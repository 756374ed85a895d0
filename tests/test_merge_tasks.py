"""The second demo task (shopping lists) that bench/merge_tasks.py trains beside the booking one."""
from __future__ import annotations

import json

from tunesmith.demo import shopping


def test_shopping_generator_is_seeded_and_disjoint(tmp_path):
    train, held_out = shopping.generate(n_train=200, n_eval=50, seed=3)
    assert (train, held_out) == shopping.generate(n_train=200, n_eval=50, seed=3)
    assert len(train) == 200 and len(held_out) == 50
    assert not {r["input"] for r in train} & {r["input"] for r in held_out}
    paths = shopping.write(tmp_path, n_train=5, n_eval=2)
    rows = [json.loads(line) for line in paths[0].read_text().splitlines()]
    assert len(rows) == 5 and set(rows[0]) == {"instruction", "input", "output"}


def test_answers_list_every_item_in_order_with_digit_quantities():
    train, _ = shopping.generate(n_train=100, n_eval=0, seed=0)
    for row in train:
        lines = row["output"].split("\n")
        assert 2 <= len(lines) <= 4
        for line in lines:
            item, qty = line.split(": ")
            assert qty.isdigit() and item in row["input"]
        positions = [row["input"].index(line.split(": ")[0]) for line in lines]
        assert positions == sorted(positions)


def test_scorer_is_exact_match_up_to_whitespace():
    assert shopping.SCORER == "exact_match"
    assert shopping.score("eggs: 12\nrice: 1", "eggs: 12\nrice: 1") == 1.0
    assert shopping.score("  eggs: 12 \n rice: 1 ", "eggs: 12\nrice: 1") == 1.0
    assert shopping.score("rice: 1\neggs: 12", "eggs: 12\nrice: 1") == 0.0
    assert shopping.score('{"eggs": 12, "rice": 1}', "eggs: 12\nrice: 1") == 0.0
