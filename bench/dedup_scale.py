"""Dedup at scale: 100,000 synthetic instruction rows, a tenth of them near copies and a twentieth exact copies
(after normalising), through `tunesmith.datagen.dedup.dedup_rows` (MinHash LSH candidates, exact Jaccard).

    flock /tmp/tunesmith-cpu.lock .venv/bin/python bench/dedup_scale.py [--n 100000]
"""
from __future__ import annotations

import argparse
import random
import time

from tunesmith.datagen.dedup import DedupOptions, dedup_rows
from tunesmith.datagen.report import StepReport

WORDS = ("write explain list describe summarize classify translate give suggest compare poem recipe email story "
         "function argument plan review headline question ocean climate interview computing birthday dogs "
         "revolution breakfast rain learning football space business friendship market gardening coffee music "
         "simple formal examples bullet points fifty words haiku step opposite view morning evening city river "
         "mountain forest winter summer teacher student doctor garden kitchen train airport museum library").split()


def row(rng: random.Random, i: int) -> dict:
    return {"id": f"r{i}", "instruction": " ".join(rng.choices(WORDS, k=rng.randint(12, 30))),
            "input": "", "output": " ".join(rng.choices(WORDS, k=rng.randint(5, 40)))}


def near_copy(rng: random.Random, original: dict, i: int) -> dict:
    words = original["instruction"].split()
    words[rng.randrange(len(words))] = rng.choice(WORDS)  # one word changed
    return {**original, "id": f"r{i}", "instruction": " ".join(words)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rows: list[dict] = []
    for i in range(args.n):
        roll = rng.random()
        if rows and roll < 0.05:
            rows.append({**rng.choice(rows), "id": f"r{i}"})
        elif rows and roll < 0.15:
            rows.append(near_copy(rng, rng.choice(rows), i))
        else:
            rows.append(row(rng, i))
    report = StepReport("dedup", "-")
    start = time.perf_counter()
    kept = dedup_rows(rows, DedupOptions(), report)
    seconds = time.perf_counter() - start
    print(f"{args.n} rows -> {len(kept)} kept in {seconds:.1f} s; dropped {dict(report.dropped)}; "
          f"{report.extra['clusters']} clusters")


if __name__ == "__main__":
    main()
