"""The Self-Instruct ROUGE-L filter: tunesmith's RougePool against a plain loop over Google's rouge-score.

Filters N candidates against a pool of N instructions (skip a candidate when its maximum ROUGE-L F against
the pool, kept candidates included, exceeds 0.7). Both run the same candidates in the same order; the keep/skip
decisions must be identical. rouge-score takes O(pool) Python LCS tables per candidate, so by default it runs
on a random subsample of the candidates (each judged against the exact pool tunesmith saw at that point) and
its time is scaled to all N; --full runs it on every candidate.

    flock /tmp/tunesmith-cpu.lock .venv/bin/python bench/rouge_filter.py [--n 5000] [--sample 200] [--full]
"""
from __future__ import annotations

import argparse
import random
import time

from rouge_score import rouge_scorer

from tunesmith.datagen.rouge import RougePool

VERBS = ("Write", "Explain", "List", "Describe", "Summarize", "Classify", "Translate", "Give", "Suggest", "Compare")
NOUNS = ("poem", "recipe", "email", "story", "function", "argument", "plan", "review", "headline", "question",
         "sentence", "paragraph", "list", "joke", "summary", "definition", "example", "tweet", "letter", "riddle")
TOPICS = ("the ocean", "climate change", "a job interview", "quantum computing", "a birthday party", "dogs",
          "the French revolution", "healthy breakfast", "a rainy day", "machine learning", "football",
          "space travel", "a small business", "friendship", "the stock market", "gardening", "coffee", "music")
EXTRAS = ("in three sentences", "for a ten year old", "using simple words", "in a formal tone", "with examples",
          "in bullet points", "in under fifty words", "as a haiku", "step by step", "from the opposite view")


def instruction(rng: random.Random) -> str:
    parts = [rng.choice(VERBS), "a", rng.choice(NOUNS), "about", rng.choice(TOPICS)]
    for _ in range(rng.randint(0, 3)):
        parts.append(rng.choice(EXTRAS))
    if rng.random() < 0.3:
        parts.append(f"mentioning {rng.choice(TOPICS)} and {rng.choice(NOUNS)}s")
    return " ".join(parts) + "."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="pool size and number of candidates")
    ap.add_argument("--sample", type=int, default=200, help="candidates rouge-score judges (unless --full)")
    ap.add_argument("--full", action="store_true", help="run rouge-score on every candidate")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    pool_texts = [instruction(rng) for _ in range(args.n)]
    candidates = [instruction(rng) for _ in range(args.n)]

    start = time.perf_counter()
    pool = RougePool(pool_texts, threshold=0.7)
    decisions = [pool.add_if_novel(c) for c in candidates]
    ours = time.perf_counter() - start

    sample = range(args.n) if args.full else sorted(rng.sample(range(args.n), min(args.sample, args.n)))
    kept_before = [0] * (args.n + 1)  # candidates kept before candidate i: the pool it was judged against
    for i, keep in enumerate(decisions):
        kept_before[i + 1] = kept_before[i] + keep
    kept_texts = [c for c, keep in zip(candidates, decisions) if keep]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    start = time.perf_counter()
    mismatches = 0
    for i in sample:
        against = pool_texts + kept_texts[: kept_before[i]]
        skip = max(scorer.score(candidates[i], p)["rougeL"].fmeasure for p in against) > 0.7
        mismatches += skip == decisions[i]
    reference = (time.perf_counter() - start) * args.n / len(sample)

    kept = sum(decisions)
    print(f"candidates {args.n}, pool {args.n} instructions: kept {kept}, skipped {args.n - kept}")
    print(f"tunesmith RougePool: {ours:.2f} s for all {args.n} candidates")
    how = "all candidates" if args.full else f"{len(sample)} random candidates, scaled to {args.n}"
    print(f"rouge-score loop:    {reference:.1f} s ({how})")
    print(f"decisions identical on the {len(sample)} compared: {mismatches == 0} ({mismatches} differ)")
    print(f"speed ratio: {reference / ours:.0f}x")


if __name__ == "__main__":
    main()
