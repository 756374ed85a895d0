"""ROUGE-L equals Google's rouge-score (rougeL, no stemmer) bit for bit, and the pool filter's keep/skip
decisions equal a plain loop over rouge-score."""
from __future__ import annotations

import random

import pytest
from rouge_score import rouge_scorer, tokenize

from tunesmith.datagen.rouge import RougePool, lcs_length, rouge_l, rouge_tokens

WORDS = "the a cat dog sat on mat write poem about sea give list of three fruits explain why sky is blue".split()
ODD = ["Hello,", "WORLD!", "e-mail", "naïve", "x2", "ÅB", "İstanbul", "---", "3.14", "don't", "\t", "\n"]


def _random_text(rng: random.Random, max_words: int) -> str:
    return " ".join(rng.choice(WORDS + ODD) for _ in range(rng.randint(0, max_words)))


@pytest.fixture(scope="module")
def scorer():
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def test_tokens_equal_rouge_score_tokenizer():
    rng = random.Random(0)
    for _ in range(500):
        text = _random_text(rng, 20)
        assert rouge_tokens(text) == tokenize.tokenize(text, None), text


def test_lcs_on_hand_computed_cases():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the CLRS example
    assert lcs_length(list("abc"), list("")) == 0
    assert lcs_length(list("aaaa"), list("aa")) == 2


def test_rouge_l_equals_rouge_score_on_random_pairs(scorer):
    rng = random.Random(1)
    for _ in range(2000):
        a, b = _random_text(rng, 30), _random_text(rng, 30)
        ref = scorer.score(a, b)["rougeL"]
        ours = rouge_l(a, b)
        assert abs(ours.fmeasure - ref.fmeasure) <= 1e-9 and abs(ours.precision - ref.precision) <= 1e-9
        assert abs(ours.recall - ref.recall) <= 1e-9, (a, b)


def test_pool_scores_equal_rouge_score_including_long_texts(scorer):
    """Pool rows of any length; candidates below and above the 64-token word width."""
    rng = random.Random(2)
    pool_texts = [_random_text(rng, 90) for _ in range(60)]
    pool = RougePool(pool_texts)
    for max_words in (12, 40, 150):
        cand = _random_text(rng, max_words)
        ref = [scorer.score(cand, p)["rougeL"].fmeasure for p in pool_texts]
        assert max(abs(x - y) for x, y in zip(pool.scores(cand), ref)) <= 1e-9


def test_filter_decisions_equal_a_rouge_score_loop(scorer):
    """Self-Instruct's rule: skip when max F against the pool (seeds and kept ones) exceeds 0.7, else keep and add.
    Candidates are near-copies of pool items, so many scores sit near the threshold. At exactly 7/10 the float
    decides: rouge-score's 2pr/(p+r) gives 0.7000000000000001 for LCS 7 of lengths 7 and 13 (skip) and 0.7 for
    LCS 7 of lengths 10 and 10 (keep); the filter must agree on both."""
    rng = random.Random(3)
    seeds = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(40)]
    candidates = []
    for _ in range(300):
        words = rng.choice(seeds).split()
        for _ in range(rng.randint(0, 4)):
            words.insert(rng.randint(0, len(words)), rng.choice(WORDS))
        candidates.append(" ".join(words))
    seeds += ["a b c d e f g h i j k l m", "a b c d e f g u v w"]
    candidates += ["a b c d e f g", "a b c d e f g x y z"]
    ref_pool, ref_kept = list(seeds), []
    for cand in candidates:
        if max(scorer.score(cand, p)["rougeL"].fmeasure for p in ref_pool) > 0.7:
            continue
        ref_pool.append(cand)
        ref_kept.append(cand)
    pool = RougePool(seeds, threshold=0.7)
    kept = [c for c in candidates if pool.add_if_novel(c)]
    assert kept == ref_kept
    assert 0 < len(kept) < len(candidates)
    assert "a b c d e f g" not in kept and "a b c d e f g x y z" in kept


@pytest.mark.parametrize("pool_text, candidate", [
    ("a b c d e f g h i j k l m", "a b c d e f g"),  # LCS 7 of 7 and 13: rouge-score's float is 0.7000000000000001
    ("a b c d e f g u v w", "a b c d e f g x y z"),  # LCS 7 of 10 and 10: exactly 0.7
    ("a b c d e f g h i j k l m n", "a b c d e f g"),  # bound 14/21 < 0.7
])
def test_decisions_at_the_threshold_follow_rouge_score(scorer, pool_text, candidate):
    """Where the length bound 2 min(m, n) / (m + n) sits at the threshold, the window must not change a decision."""
    expected = scorer.score(candidate, pool_text)["rougeL"].fmeasure > 0.7
    assert RougePool([pool_text], threshold=0.7).too_similar(candidate) == expected
