"""Labels from rendered text: which characters carry loss, mapped to tokens through offsets.

We never guess token ids (pad == eos would then hide the real end of turn). Instead we render the
conversation with its chat template, find each message's character span by rendering growing
prefixes of the conversation, and map characters to tokens with the tokenizer's offset mapping.
That is right for any template that renders a conversation as a prefix of its continuation, which
covers ChatML, Llama-3, Mistral [INST], Gemma and the like; for templates that rewrite earlier
turns we fall back to finding each message's text in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TunesmithError
from .formats import Conversation
from .templates import render

IGNORE_INDEX = -100
# Categories of characters and tokens, used for labels and for `data inspect`'s "why" column.
SYSTEM, USER, ASSISTANT, TOOL, TEMPLATE, END_OF_TURN = "system", "user", "assistant", "tool", "template", "end_of_turn"
TRAIN_ON = ("all_assistant", "last_assistant", "everything")
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>", "<|end|>", "<|endoftext|>", "<|end_of_text|>")


@dataclass
class CharLabels:
    text: str
    category: list[str]
    trained: list[bool]


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    categories: list[str]
    where: str = ""
    truncated: bool = False
    conversation: Conversation = field(default_factory=list)

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def trained_turns(conv: Conversation, train_on: str) -> set[int]:
    assistant = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        return set(assistant[-1:])
    return set(assistant)


def label_characters(tokenizer, conv: Conversation, train_on: str = "all_assistant", where: str = "") -> CharLabels:
    full = render(tokenizer, conv, where=where)
    category = [TEMPLATE] * len(full)
    trained = [False] * len(full)
    turns = trained_turns(conv, train_on)
    spans = _spans_by_prefix(tokenizer, conv, full, where) or _spans_by_search(conv, full, where)
    for i, (msg, (start, end, answer_start)) in enumerate(zip(conv, spans)):
        role = msg["role"]
        content_start, content_end = _locate_content(full, msg["content"], answer_start, end)
        for c in range(content_start, content_end):
            category[c] = role
        if i in turns:
            # The answer region runs from after the generation prompt to the end of the turn, minus
            # the whitespace the template puts after its end-of-turn marker.
            stop = end
            while stop > answer_start and full[stop - 1].isspace() and stop > content_end:
                stop -= 1
            for c in range(answer_start, stop):
                trained[c] = True
                if c >= content_end:
                    category[c] = END_OF_TURN
    if train_on == "everything":
        trained = [True] * len(full)
    return CharLabels(full, category, trained)


def _spans_by_prefix(tokenizer, conv, full, where):
    """(start, end, answer_start) for each message from renders of growing prefixes; None if inconsistent."""
    spans = []
    prev = 0
    for i, msg in enumerate(conv):
        end = len(render(tokenizer, conv[: i + 1], where=where))
        if msg["role"] == "assistant" and i == 0:
            answer_start, found_end = _locate_content(full, msg["content"], prev, end)
            if found_end == answer_start:
                return None
        elif msg["role"] == "assistant":
            try:
                generation_prompt = render(tokenizer, conv[:i], add_generation_prompt=True, where=where)
            except TunesmithError:
                return None
            if not full.startswith(generation_prompt):
                return None
            answer_start = len(generation_prompt)
        else:
            answer_start = prev
        prefix_ok = full.startswith(render(tokenizer, conv[: i + 1], where=where))
        if not prefix_ok or not (prev <= answer_start <= end):
            return None
        spans.append((prev, end, answer_start))
        prev = end
    return spans


def _spans_by_search(conv, full, where):
    spans = []
    pos = 0
    for msg in conv:
        content = msg["content"]
        for needle in (content, content.strip()):
            idx = full.find(needle, pos) if needle else pos
            if idx >= 0:
                break
        else:
            raise TunesmithError(
                f"{where}: the chat template changes the text of a '{msg['role']}' message beyond trimming, "
                "so tunesmith cannot tell which tokens are the answer; use a template that renders messages verbatim"
            )
        end = idx + len(needle)
        for marker in END_MARKERS:
            if msg["role"] == "assistant" and full.startswith(marker, end):
                end += len(marker)
                break
        spans.append((pos, end, idx))
        pos = end
    return spans


def _locate_content(full: str, content: str, start: int, end: int) -> tuple[int, int]:
    for needle in (content, content.strip()):
        if not needle:
            continue
        idx = full.find(needle, start, end)
        if idx >= 0:
            return idx, idx + len(needle)
    return start, start


def tokenize_conversation(
    tokenizer,
    conv: Conversation,
    train_on: str = "all_assistant",
    max_length: int | None = None,
    truncation: str = "drop",
    where: str = "",
) -> TokenizedExample | None:
    """Token ids and labels for one conversation; None when it is too long and truncation is 'drop'."""
    if train_on not in TRAIN_ON:
        raise TunesmithError(f"data.train_on = '{train_on}' is unknown; use one of {', '.join(TRAIN_ON)}")
    if truncation not in ("drop", "truncate"):
        raise TunesmithError(f"data.truncation = '{truncation}' is unknown; use drop or truncate")
    chars = label_characters(tokenizer, conv, train_on, where)
    if not getattr(tokenizer, "is_fast", False):
        raise TunesmithError("loss masking needs a fast tokenizer (with offset mapping); load the model's tokenizer.json")
    enc = tokenizer(chars.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels, categories = [], []
    for tok_id, (s, e) in zip(ids, enc["offset_mapping"]):
        if e > s:
            supervised = any(chars.trained[s:e])
            cats = chars.category[s:e]
            cat = END_OF_TURN if END_OF_TURN in cats and supervised else max(set(cats), key=cats.count)
        else:
            supervised, cat = False, TEMPLATE
        labels.append(tok_id if supervised else IGNORE_INDEX)
        categories.append(cat)
    truncated = False
    if max_length is not None and len(ids) > max_length:
        if truncation == "drop":
            return None
        ids, labels, categories = ids[:max_length], labels[:max_length], categories[:max_length]
        truncated = True
    return TokenizedExample(ids, labels, categories, where, truncated, conv)
