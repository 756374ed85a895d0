"""A multi-turn demo task: the last answer depends on what the user said turns earlier.

Each row is ShareGPT with a system prompt. The user states a fact or a constraint in the first turn (a diet,
who travels with them, where they are flying, their name), the assistant acknowledges it, sometimes an
unrelated question and its answer follow, and the last question makes sense only with the first turn:

    system:    You are a personal assistant. Remember what the user tells you, and answer with the value only.
    human:     Just so you know, I'm allergic to nuts.
    gpt:       Noted.
    human:     What is the capital of Peru?
    gpt:       Lima
    human:     Pick one dish for my dinner from this menu: peanut noodles, beef stew, almond cake.
    gpt:       beef stew

Every menu holds exactly one dish the first turn allows, and a dish is allowed by some constraints and not
by others, so the last question alone does not tell the answer. The answers are short values, so the task
is scored by `exact_match` (whitespace-normalised), which `SCORER` names for recipes and `score` applies;
`recipes/multiturn.yaml` trains it. Training puts loss on every assistant turn (`data.train_on`'s default);
evaluation asks for the last one, with the earlier turns in the prompt.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..evaluation.scorers import exact_match
from . import concise
from .booking import CITIES, FIRST
from .files import unique_splits, write_task

SYSTEM = "You are a personal assistant. Remember what the user tells you, and answer with the value only."
SCORER = "exact_match"
ACKS = ["Noted.", "Got it.", "Understood, I'll keep that in mind.", "Thanks for telling me."]

# What each dish contains, and what each stated constraint rules out.
DISHES = {"beef stew": {"meat"}, "chicken curry": {"meat"}, "pork dumplings": {"meat"}, "salmon salad": {"fish"},
          "tuna pasta": {"fish"}, "cheese pizza": {"dairy"}, "mushroom risotto": {"dairy"},
          "peanut noodles": {"nuts"}, "almond cake": {"nuts", "dairy"}, "pesto pasta": {"nuts", "dairy"},
          "vegetable soup": set(), "bean chili": set(), "fruit salad": set(), "lentil curry": set()}
CONSTRAINTS = {"I'm vegetarian.": {"meat", "fish"}, "I'm allergic to nuts.": {"nuts"},
               "I don't eat dairy.": {"dairy"}, "I don't eat fish or seafood.": {"fish"}, "I'm vegan.": {"meat", "fish", "dairy"}}
FACT_OPENERS = ["Just so you know, {fact}", "Before we start: {fact}", "{fact}", "One thing to remember: {fact}"]


def _diet(rng: random.Random) -> tuple[str, str, str]:
    constraint = rng.choice(list(CONSTRAINTS))
    banned = CONSTRAINTS[constraint]
    allowed = [d for d, has in DISHES.items() if not has & banned]
    ruled_out = [d for d, has in DISHES.items() if has & banned]
    menu = [rng.choice(allowed), *rng.sample(ruled_out, 2)]
    rng.shuffle(menu)
    fact = rng.choice(FACT_OPENERS).format(fact=constraint)
    question = rng.choice(["Pick one dish for my dinner from this menu: {m}.",
                           "Which of these should I order tonight: {m}?"]).format(m=", ".join(menu))
    answer = next(d for d in menu if d in allowed)
    return fact, question, answer


def _party(rng: random.Random) -> tuple[str, str, str]:
    kids = rng.randrange(1, 6)
    plural = "child" if kids == 1 else "children"
    fact, people = rng.choice([(f"I'm travelling with my {kids} {plural}.", kids + 1),
                               (f"My partner and I are going with our {kids} {plural}.", kids + 2)])
    question = rng.choice(["How many train tickets do we need for all of us?",
                           "How many seats should I book at the restaurant for the whole group?"])
    return rng.choice(FACT_OPENERS).format(fact=fact), question, str(people)


def _destination(rng: random.Random) -> tuple[str, str, str]:
    city = rng.choice(CITIES)
    fact = rng.choice([f"I'm flying to {city} tomorrow.", f"My conference next week is in {city}."])
    question = rng.choice(["Which city should I check the weather forecast for?",
                           "Which city do I need a hotel in?"])
    return rng.choice(FACT_OPENERS).format(fact=fact), question, city


def _signature(rng: random.Random) -> tuple[str, str, str]:
    name = rng.choice(FIRST)
    note = rng.choice(["See you at eight,", "Thanks again,", "Talk soon,", "Best wishes,"])
    fact = rng.choice([f"My name is {name}.", f"I'm {name}, by the way."])
    return fact, f"Sign this note with my name: {note}", f"{note} {name}"


FAMILIES = [_diet, _party, _destination, _signature]


def _distractor(rng: random.Random) -> tuple[str, str]:
    """An unrelated question with a one-word answer, between the fact and the question that needs it."""
    question, answer, _ = rng.choice(list(dict.fromkeys(concise.KINDS)))(rng)
    return question, answer


def make_example(rng: random.Random) -> dict:
    fact, question, answer = rng.choice(FAMILIES)(rng)
    turns = [("system", SYSTEM), ("human", fact), ("gpt", rng.choice(ACKS))]
    for _ in range(rng.randrange(2)):
        turns += list(zip(("human", "gpt"), _distractor(rng)))
    turns += [("human", question), ("gpt", answer)]
    conversations = [{"from": who, "value": text} for who, text in turns]
    # "input" is what unique_splits keeps distinct: the whole conversation.
    return {"conversations": conversations, "input": json.dumps(conversations)}


def generate(n_train: int = 400, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out sets (no conversation appears in both)."""
    train, held_out = unique_splits(make_example, n_train, n_eval, seed)
    return [{"conversations": e["conversations"]} for e in train], [{"conversations": e["conversations"]} for e in held_out]


def score(prediction: str, reference: str) -> float:
    """1.0 when the last answer is exactly the reference, whitespace aside."""
    return exact_match(prediction, reference)


def write(out_dir: str | Path, n_train: int = 400, n_eval: int = 100, seed: int = 0) -> tuple[Path, Path]:
    return write_task(out_dir, "recall", *generate(n_train, n_eval, seed))


if __name__ == "__main__":
    import sys

    for p in write(sys.argv[1] if len(sys.argv) > 1 else "recipes/data"):
        print(p)
