"""ROUGE-L F exactly as Google's `rouge-score` computes it (`rougeL`, no stemmer), fast enough to compare a
candidate with a whole pool of instructions.

Tokens: `rouge_score.tokenize` lower-cases, turns every run of characters outside [a-z0-9] into a space and
keeps the non-empty pieces, which is exactly the maximal runs of [a-z0-9] in the lower-cased text.

LCS length: the bit-parallel algorithm of Allison and Dix (1986) / Hyyro (2004). Bit i of `v` is 0 when the
i-th token of the candidate ends a match of the LCS so far; one addition per token of the other text updates
all positions at once, so the LCS costs O(n) word operations instead of the O(m * n) table. `RougePool`
runs it for one candidate against every pool row at once with numpy (one uint64 word per row, so candidates
of up to 64 tokens; longer ones fall back to Python integers, which have no width limit).

F = 2 * p * r / (p + r), with p and r computed in the same order and precision as rouge-score, so scores
are bit-for-bit equal and keep/skip decisions at a threshold are identical.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np

TOKEN_RE = re.compile(r"[a-z0-9]+")
WORD = 64  # bits per uint64 lane
# A pool row can only beat the threshold if the length bound 2 * min(m, n) / (m + n) does; the margin keeps
# rows whose bound equals the threshold up to rounding, so the window never changes a decision.
BOUND_MARGIN = 1e-12


def rouge_tokens(text: str) -> list[str]:
    return TOKEN_RE.findall(text.lower())


@dataclass(frozen=True)
class RougeScore:
    precision: float
    recall: float
    fmeasure: float


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel, Python integers)."""
    if not a or not b:
        return 0
    masks: dict = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def fmeasure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_l(target: str, prediction: str) -> RougeScore:
    """rouge-score's `RougeScorer(["rougeL"]).score(target, prediction)["rougeL"]`."""
    return rouge_l_tokens(rouge_tokens(target), rouge_tokens(prediction))


def rouge_l_tokens(target: list[str], prediction: list[str]) -> RougeScore:
    if not target or not prediction:
        return RougeScore(0, 0, 0)
    lcs = lcs_length(target, prediction)
    precision, recall = lcs / len(prediction), lcs / len(target)
    return RougeScore(precision, recall, fmeasure(precision, recall))


class RougePool:
    """A growing pool of texts; `too_similar(text)` says whether some pool text has ROUGE-L F > threshold
    with `text` (the candidate is the target, the pool text the prediction, as in Self-Instruct)."""

    def __init__(self, texts: Iterable[str] = (), threshold: float = 0.7):
        self.threshold = threshold
        self._ids: dict[str, int] = {}  # token -> id; id 0 is padding and matches nothing
        self._rows = np.zeros((64, 8), dtype=np.int32)
        self._lens = np.zeros(64, dtype=np.int64)
        self._size = 0
        self._texts: list[str] = []
        self._masks = np.zeros(1024, dtype=np.uint64)  # per token id: candidate positions holding it
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return self._size

    @property
    def texts(self) -> list[str]:
        return list(self._texts)

    def add(self, text: str) -> None:
        ids = [self._id(t) for t in rouge_tokens(text)]
        if self._size == len(self._lens):
            self._rows = np.concatenate([self._rows, np.zeros_like(self._rows)])
            self._lens = np.concatenate([self._lens, np.zeros_like(self._lens)])
        if len(ids) > self._rows.shape[1]:
            wider = np.zeros((len(self._rows), max(len(ids), 2 * self._rows.shape[1])), dtype=np.int32)
            wider[:, : self._rows.shape[1]] = self._rows
            self._rows = wider
        self._rows[self._size, : len(ids)] = ids
        self._lens[self._size] = len(ids)
        self._size += 1
        self._texts.append(text)

    def add_if_novel(self, text: str) -> bool:
        """Add `text` unless it is too similar to the pool; True when added."""
        if self.too_similar(text):
            return False
        self.add(text)
        return True

    def too_similar(self, text: str) -> bool:
        tokens = rouge_tokens(text)
        m = len(tokens)
        if m == 0 or self._size == 0:
            return False  # rouge-score gives F = 0 to an empty side
        lens = self._lens[: self._size]
        bound = 2 * np.minimum(m, lens) / (m + lens)
        window = np.nonzero(bound > self.threshold - BOUND_MARGIN)[0]
        if len(window) == 0:
            return False
        return bool((self._fmeasures(tokens, window) > self.threshold).any())

    def scores(self, text: str) -> np.ndarray:
        """ROUGE-L F of `text` against every pool text, in pool order."""
        tokens = rouge_tokens(text)
        if not tokens:
            return np.zeros(self._size)
        return self._fmeasures(tokens, np.arange(self._size))

    def _id(self, token: str) -> int:
        found = self._ids.get(token)
        if found is None:
            found = self._ids[token] = len(self._ids) + 1
        return found

    def _fmeasures(self, tokens: list[str], window: np.ndarray) -> np.ndarray:
        lens = self._lens[window]
        lcs = self._lcs_words(tokens, window) if len(tokens) <= WORD else self._lcs_python(tokens, window)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = lcs / lens
            recall = lcs / len(tokens)
            f = 2 * precision * recall / (precision + recall)
        return np.where((lcs > 0) & (lens > 0), f, 0.0)

    def _lcs_words(self, tokens: list[str], window: np.ndarray) -> np.ndarray:
        """LCS of the candidate with each pool row in `window`, all rows at once in one uint64 lane each."""
        m = len(tokens)
        if len(self._masks) <= len(self._ids):
            self._masks = np.zeros(2 * len(self._ids) + 1, dtype=np.uint64)
        known = [(i, self._ids[t]) for i, t in enumerate(tokens) if t in self._ids]
        for i, tid in known:
            self._masks[tid] |= np.uint64(1 << i)
        try:
            full = np.uint64((1 << m) - 1)
            rows = self._rows[window, : int(self._lens[window].max())]
            v = np.full(len(window), full, dtype=np.uint64)
            for column in rows.T:  # padding (id 0) has an empty mask and leaves v unchanged
                u = v & self._masks[column]
                v = ((v + u) | (v - u)) & full  # uint64 arithmetic wraps, and the mask drops the carry-out
            return m - np.bitwise_count(v).astype(np.int64)
        finally:
            for _, tid in known:
                self._masks[tid] = 0

    def _lcs_python(self, tokens: list[str], window: np.ndarray) -> np.ndarray:
        ids = [self._ids.get(t, -1) for t in tokens]
        return np.array([lcs_length(ids, list(self._rows[k, : self._lens[k]])) for k in window], dtype=np.int64)
