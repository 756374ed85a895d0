"""A generated preference task: answer a short question in a few words, not a paragraph.

Each row is TRL's explicit-prompt format: a question with one short, certain answer (arithmetic, capitals,
opposites, the day after a day, colour mixing) in one of several phrasings; `chosen` is the answer in at most
`MAX_WORDS` words ("56."), `rejected` is the same answer wrapped in a chatty paragraph of 25 words or more:

    prompt:   What is 7 times 8?
    chosen:   56.
    rejected: Great question! Let's work through it together. 7 times 8 is 56. ... I hope this helps!

Both replies are correct, so what a preference objective can learn from the pair is only the length, and
`score` measures exactly that behaviour on held-out prompts: a reply of at most `MAX_WORDS` words that
contains the answer. The instruct base model answers in full sentences, so it scores low.
`bench/preference_experiment.py` trains on this task; `recipes/dpo.yaml` ships it.
"""
from __future__ import annotations

import random
from pathlib import Path

from .files import unique_splits, write_task

MAX_WORDS = 8

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Portugal": "Lisbon", "Kenya": "Nairobi", "Peru": "Lima", "Egypt": "Cairo", "Austria": "Vienna",
            "Ireland": "Dublin", "Norway": "Oslo", "Greece": "Athens", "Finland": "Helsinki", "Poland": "Warsaw",
            "Canada": "Ottawa", "Russia": "Moscow", "China": "Beijing", "Sweden": "Stockholm",
            "Denmark": "Copenhagen", "Hungary": "Budapest", "Belgium": "Brussels", "Thailand": "Bangkok",
            "Vietnam": "Hanoi", "Chile": "Santiago", "Cuba": "Havana", "Argentina": "Buenos Aires"}
OPPOSITES = {"hot": "cold", "up": "down", "fast": "slow", "big": "small", "early": "late", "happy": "sad",
             "light": "dark", "open": "closed", "wide": "narrow", "old": "new", "wet": "dry", "hard": "soft",
             "loud": "quiet", "rich": "poor", "strong": "weak", "thick": "thin", "high": "low", "first": "last"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple",
         ("red", "white"): "pink", ("black", "white"): "grey"}
ARITHMETIC = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}

OPENERS = ["Great question!", "Sure, I'd be happy to help with that.", "That's a really interesting thing to ask.",
           "Of course! Let me explain.", "Absolutely, here is the answer you are looking for."]
BRIDGES = ["Let's work through it together step by step.", "It is worth taking a moment to think it through.",
           "Many people wonder about this, so it is a good thing to check.",
           "To answer this properly, we should consider what the question is really asking."]
CLOSERS = ["I hope this helps! Let me know if you have any other questions.",
           "Feel free to ask if anything is unclear or if you would like more examples.",
           "If you have more questions like this one, I'm always happy to help you out.",
           "Let me know if you would like me to explain any part of this in more detail."]


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    op = rng.choice(list(ARITHMETIC))
    a, b = rng.randrange(2, 20), rng.randrange(2, 20)
    if op == "minus" and b > a:
        a, b = b, a
    answer = str(ARITHMETIC[op](a, b))
    question = rng.choice(["What is {a} {op} {b}?", "How much is {a} {op} {b}?", "Compute {a} {op} {b}.",
                           "Quick one: {a} {op} {b}?"]).format(a=a, op=op, b=b)
    return question, answer, f"{a} {op} {b} is {answer}."


def _capital(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(list(CAPITALS))
    question = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?",
                           "Name the capital of {c}.", "Tell me the capital city of {c}."]).format(c=country)
    return question, CAPITALS[country], f"The capital of {country} is {CAPITALS[country]}."


def _opposite(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(list(OPPOSITES))
    question = rng.choice(["What is the opposite of '{w}'?", "Give the opposite of the word '{w}'.",
                           "What word means the opposite of '{w}'?"]).format(w=word)
    return question, OPPOSITES[word].capitalize(), f"The opposite of '{word}' is '{OPPOSITES[word]}'."


def _next_day(rng: random.Random) -> tuple[str, str, str]:
    i = rng.randrange(7)
    question = rng.choice(["What day comes after {d}?", "Which day of the week follows {d}?",
                           "If today is {d}, what day is tomorrow?"]).format(d=DAYS[i])
    return question, DAYS[(i + 1) % 7], f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."


def _mix(rng: random.Random) -> tuple[str, str, str]:
    pair = rng.choice(list(MIXES))
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    question = rng.choice(["What colour do you get by mixing {a} and {b}?", "Mixing {a} paint with {b} paint "
                           "gives which colour?"]).format(a=a, b=b)
    return question, MIXES[pair].capitalize(), f"Mixing {a} and {b} gives {MIXES[pair]}."


# Arithmetic has by far the most distinct questions, so it is drawn most often; the rest keep the task varied.
KINDS = [_arithmetic] * 4 + [_capital, _opposite, _next_day, _mix]


def make_example(rng: random.Random) -> dict:
    question, answer, statement = rng.choice(KINDS)(rng)
    verbose = " ".join([rng.choice(OPENERS), rng.choice(BRIDGES), statement, rng.choice(CLOSERS)])
    # "input" is what unique_splits keeps distinct; "answer" is what `score` looks for.
    return {"prompt": question, "chosen": f"{answer}.", "rejected": verbose, "answer": answer, "input": question}


def _row(example: dict) -> dict:
    return {k: example[k] for k in ("prompt", "chosen", "rejected", "answer")}


def generate(n_train: int = 400, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out sets (no question appears in both)."""
    train, held_out = unique_splits(make_example, n_train, n_eval, seed)
    return [_row(e) for e in train], [_row(e) for e in held_out]


def word_count(text: str) -> int:
    return len(text.split())


def score(prediction: str, answer: str) -> float:
    """1.0 for a concise, correct reply: at most MAX_WORDS words, containing the answer (case aside)."""
    return float(word_count(prediction) <= MAX_WORDS and answer.lower() in prediction.lower())


def write(out_dir: str | Path, n_train: int = 400, n_eval: int = 100, seed: int = 0) -> tuple[Path, Path]:
    return write_task(out_dir, "concise-pref", *generate(n_train, n_eval, seed))


if __name__ == "__main__":
    import sys

    for p in write(sys.argv[1] if len(sys.argv) > 1 else "recipes/data"):
        print(p)
