"""A deterministic generator for the booking-extraction task.

Each example is a sentence about a booking, in one of many phrasings; the answer is the booking as
JSON with keys name, city, date (YYYY-MM-DD) and guests (an integer). The base model answers in
prose or with its own keys, so it scores near zero; a few minutes of LoRA teach it the schema.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .files import unique_splits, write_task

INSTRUCTION = "Extract the booking as JSON with the keys name, city, date (YYYY-MM-DD) and guests."

FIRST = ["Maria", "John", "Aiko", "Liam", "Fatima", "Noah", "Chen", "Olivia", "Ravi", "Sofia", "Lucas", "Amara",
         "Ethan", "Ingrid", "Mateo", "Yuki", "Hannah", "Omar", "Elena", "Kwame", "Chloe", "Diego", "Priya", "Felix",
         "Leila", "Jonas", "Nadia", "Victor", "Zara", "Henrik", "Mei", "Samuel", "Anya", "Tomas", "Grace", "Emil"]
LAST = ["Lopez", "Smith", "Tanaka", "Murphy", "Khan", "Weber", "Wang", "Brown", "Patel", "Rossi", "Silva", "Okafor",
        "Novak", "Larsen", "Garcia", "Sato", "Fischer", "Haddad", "Petrova", "Mensah", "Dubois", "Castro", "Iyer",
        "Keller", "Farah", "Berg", "Ivanova", "Moreau", "Ali", "Nilsen", "Lin", "Adeyemi", "Kowalski", "Horvat"]
CITIES = ["Tokyo", "Paris", "Lisbon", "Nairobi", "Toronto", "Oslo", "Lima", "Seoul", "Cairo", "Vienna", "Dublin",
          "Madrid", "Sydney", "Prague", "Mumbai", "Berlin", "Chicago", "Athens", "Bogota", "Helsinki", "Rome",
          "Boston", "Dakar", "Hanoi", "Quito", "Zurich", "Denver", "Porto", "Krakow", "Manila"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
TEMPLATES = [
    "{name} booked a table for {guests} in {city} on {date}.",
    "Reservation for {guests} guests in {city} under the name {name}, on {date}.",
    "Please reserve a room in {city} for {name}, {guests} people, arriving {date}.",
    "On {date}, {name} is expecting a party of {guests} at our {city} branch.",
    "New booking: {name} / {city} / {date} / {guests} guests.",
    "{name} wants {guests} seats on the {city} tour for {date}.",
    "Could you confirm {name}'s booking in {city} for {date}? It is for {guests}.",
    "Hotel {city}: {guests} guests, check-in {date}, booked by {name}.",
]


def _date_text(rng: random.Random, year: int, month: int, day: int) -> str:
    style = rng.randrange(3)
    name = MONTHS[month - 1]
    if style == 0:
        return f"{day} {name} {year}"
    if style == 1:
        return f"{name} {day}, {year}"
    return f"{name} {day} {year}"


def make_example(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    city = rng.choice(CITIES)
    year, month, day = rng.randrange(2024, 2028), rng.randrange(1, 13), rng.randrange(1, 29)
    guests = rng.randrange(1, 13)
    sentence = rng.choice(TEMPLATES).format(name=name, city=city, date=_date_text(rng, year, month, day), guests=guests)
    answer = {"name": name, "city": city, "date": f"{year:04d}-{month:02d}-{day:02d}", "guests": guests}
    return {"instruction": INSTRUCTION, "input": sentence, "output": json.dumps(answer)}


def generate(n_train: int = 600, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out sets (no sentence appears in both)."""
    return unique_splits(make_example, n_train, n_eval, seed)


def write(out_dir: str | Path, n_train: int = 600, n_eval: int = 100, seed: int = 0) -> tuple[Path, Path]:
    return write_task(out_dir, "booking", *generate(n_train, n_eval, seed))


if __name__ == "__main__":
    import sys

    for p in write(sys.argv[1] if len(sys.argv) > 1 else "recipes/data"):
        print(p)
