"""A second demo task, beside the booking one: turn a shopping request into an item list.

Each example is a sentence asking for a few items with quantities written as words or digits; the
answer lists them in the order mentioned, one `item: quantity` line each, quantities as digits:

    user:      Write the shopping list, one `item: quantity` line per item, in the order mentioned.

               Could you pick up three lemons, a bag of rice and 12 eggs?
    assistant: lemons: 3
               rice: 1
               eggs: 12

The output is plain lines, not JSON, so a model that learned only the booking task does not solve it
(and the other way round); this is what `bench/merge_tasks.py` merges. Scorer: `exact_match`
(whitespace-normalised), which `SCORER` names for recipes and `score` applies.
"""
from __future__ import annotations

import random
from pathlib import Path

from ..evaluation.scorers import exact_match
from .files import unique_splits, write_task

INSTRUCTION = "Write the shopping list, one `item: quantity` line per item, in the order mentioned."
SCORER = "exact_match"

ITEMS = ["apples", "bananas", "lemons", "onions", "tomatoes", "carrots", "potatoes", "eggs", "oranges", "peppers",
         "avocados", "limes", "pears", "cucumbers", "mangoes", "peaches", "plums", "bagels", "muffins", "candles",
         "batteries", "lightbulbs", "sponges", "napkins"]
UNITS = {"rice": "a bag of rice", "milk": "a carton of milk", "bread": "a loaf of bread", "butter": "a pack of butter",
         "coffee": "a jar of coffee", "flour": "a bag of flour", "cheese": "a block of cheese", "honey": "a jar of honey"}
WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten",
         11: "eleven", 12: "twelve"}
OPENERS = [
    "Could you pick up {items}?",
    "Please buy {items}.",
    "We need {items} for the weekend.",
    "On your way home, grab {items}.",
    "Add {items} to the order.",
    "I'm out of everything: {items}, please.",
    "For the party we still need {items}.",
    "Shopping today: {items}.",
]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_example(rng: random.Random) -> dict:
    count = rng.randrange(2, 5)
    names = rng.sample(ITEMS + list(UNITS), count)
    phrases, lines = [], []
    for name in names:
        if name in UNITS:
            phrases.append(UNITS[name])
            lines.append(f"{name}: 1")
            continue
        qty = rng.randrange(2, 13)
        said = WORDS[qty] if rng.random() < 0.6 else str(qty)
        phrases.append(f"{said} {name}")
        lines.append(f"{name}: {qty}")
    sentence = rng.choice(OPENERS).format(items=_join(phrases))
    return {"instruction": INSTRUCTION, "input": sentence, "output": "\n".join(lines)}


def generate(n_train: int = 600, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out sets (no sentence appears in both)."""
    return unique_splits(make_example, n_train, n_eval, seed)


def score(prediction: str, reference: str) -> float:
    """1.0 when the list is exactly right (items, order, quantities), whitespace aside."""
    return exact_match(prediction, reference)


def write(out_dir: str | Path, n_train: int = 600, n_eval: int = 100, seed: int = 0) -> tuple[Path, Path]:
    return write_task(out_dir, "shopping", *generate(n_train, n_eval, seed))


if __name__ == "__main__":
    import sys

    for p in write(sys.argv[1] if len(sys.argv) > 1 else "recipes/data"):
        print(p)
