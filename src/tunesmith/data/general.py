"""The general text corpus: what replay and EWC train on, and what `eval --forgetting` measures.

General English is the Python reference that ships with every Python install
(`pydoc_data.topics.topics`, about 465k characters in 79 topics), so it is there offline. The topics
are split once, by name: every fifth topic (sorted) is held out for measuring, the rest is what
`regularize.replay` and `regularize.ewc` may train on, so replay never trains on the measured text.
"""
from __future__ import annotations

from typing import Literal

from .masking import TokenizedExample

GENERAL_CORPUS = "pydoc_data.topics (Python reference)"
HELDOUT_EVERY, HELDOUT_OFFSET = 5, 2
DEFAULT_BLOCK_TOKENS = 256


def general_topics(split: Literal["train", "heldout"]) -> list[str]:
    """Topic names of the general corpus in one split (deterministic: by sorted name)."""
    from pydoc_data.topics import topics  # lazy: half a megabyte of text, read only when the corpus is used

    names = sorted(topics)
    held = {n for i, n in enumerate(names) if i % HELDOUT_EVERY == HELDOUT_OFFSET}
    if split == "heldout":
        return [n for n in names if n in held]
    if split == "train":
        return [n for n in names if n not in held]
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def general_text(split: Literal["train", "heldout"]) -> str:
    from pydoc_data.topics import topics  # lazy: half a megabyte of text, read only when the corpus is used

    return "\n\n".join(topics[n].strip() for n in general_topics(split))


def general_token_ids(tokenizer, split: Literal["train", "heldout"]) -> list[int]:
    return list(tokenizer(general_text(split), add_special_tokens=False, verbose=False)["input_ids"])


def general_blocks(
    tokenizer, split: Literal["train", "heldout"] = "heldout", block_tokens: int = DEFAULT_BLOCK_TOKENS,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Contiguous blocks of `block_tokens` tokens; with `max_tokens`, evenly spaced blocks up to that budget."""
    ids = general_token_ids(tokenizer, split)
    blocks = [ids[i : i + block_tokens] for i in range(0, len(ids) - block_tokens + 1, block_tokens)]
    if max_tokens is not None:
        want = max(1, min(len(blocks), max_tokens // block_tokens))
        blocks = [blocks[(k * len(blocks)) // want] for k in range(want)]
    return blocks


def general_chunks(tokenizer, chunk_tokens: int) -> list[TokenizedExample]:
    """Consecutive chunks of the train part as training examples, every token supervised (plain text)."""
    ids = general_token_ids(tokenizer, "train")
    chunks = []
    for start in range(0, len(ids) - chunk_tokens + 1, chunk_tokens):
        piece = ids[start : start + chunk_tokens]
        chunks.append(TokenizedExample(piece, list(piece), ["general"] * len(piece), f"general[{start}:{start + chunk_tokens}]"))
    return chunks
