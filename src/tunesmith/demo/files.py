"""Shared by the generated demo tasks: disjoint splits, and writing them as JSONL files."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable


def unique_splits(make_example: Callable[[random.Random], dict], n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out sets: no input appears twice."""
    rng = random.Random(seed)
    seen: set[str] = set()
    examples: list[dict] = []
    while len(examples) < n_train + n_eval:
        ex = make_example(rng)
        if ex["input"] not in seen:
            seen.add(ex["input"])
            examples.append(ex)
    return examples[:n_train], examples[n_train:]


def write_task(out_dir: str | Path, name: str, train: list[dict], held_out: list[dict]) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{name}-train.jsonl", out / f"{name}-eval.jsonl"
    for path, rows in zip(paths, (train, held_out)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths
